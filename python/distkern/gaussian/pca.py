r"""PCA / NPCA whitening of a fitted Gaussian (Rippel et al., "Modeling the Distribution of Normal
Data in Pre-Trained Deep Features for Anomaly Detection", ICPR 2020).

With ``Σ = U diag(λ) Uᵀ`` (eigenvalues descending, float64), the Mahalanobis distance splits over
components: ``d² = Σᵢ (uᵢᵀ(x − μ))² / λᵢ``. Keeping a subset ``R`` of components gives
``W = U_R diag(λ_R^{-1/2})`` (``(D, |R|)``) and ``d²_R = ‖Wᵀ(x − μ)‖²`` =
``distkern.mahalanobis(x, mean, W, lower=False)``.

* ``mode="pca"`` keeps the leading (high-variance) components: the smallest ``r`` such that the
  first ``r`` explain at least ``variance_ratio`` of ``tr Σ`` (all ``D`` for ``variance_ratio=1``).
* ``mode="npca"`` keeps the complementary low-variance tail (components ``r … D−1``), which the
  paper found to carry the anomaly signal.

So for one ``variance_ratio`` the two keep a partition of the components and
``d²_pca + d²_npca = d²``; ``variance_ratio=1`` makes PCA keep everything (``d²_pca = d²``) and
``variance_ratio=0`` does the same for NPCA.

The reference implementation (ORippler/gaussian-ad-mvtec, ``Mahalanobis.compute_pca``) fits
``sklearn.decomposition.PCA`` to the features, takes ``k = argmax(cumsum(ratio) > t)`` (the first
index where the cumulative ratio *strictly* exceeds ``t``) and keeps components ``[0, k]`` for
PCA but ``[k − 1, D)`` for NPCA — both keep components ``k − 1`` and ``k`` ("the true variance
lies somewhere in between"); it then refits a Ledoit-Wolf Gaussian in the reduced space.
``paper=True`` reproduces that selection (with ``k − 1`` clamped at 0, where the reference's
negative index would keep only the last component). The refit is not done here: pass the
covariance you want to whiten (empirical, as the reference's PCA uses, or shrunk).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .factor import NotPositiveDefiniteError, check_ridge

__all__ = ["PCAWhitening", "eigendecomposition", "pca_whitening"]


class PCAWhitening(NamedTuple):
    """Result of :func:`pca_whitening`."""

    whitening: torch.Tensor
    """``(D, R)`` ``W = U_R diag((λ_R + ridge)^{-1/2})``, in the requested dtype: pass with ``lower=False``."""
    components: torch.Tensor
    """``(D, R)`` float64 orthonormal eigenvectors kept (columns, in descending-eigenvalue order)."""
    eigenvalues: torch.Tensor
    """``(R,)`` float64 eigenvalues kept (descending, before the ridge)."""
    explained_variance_ratio: torch.Tensor
    """``(D,)`` float64 ``λ / Σλ`` of *all* components (negative rounding noise clamped to 0)."""


def eigendecomposition(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(..., D)`` descending and eigenvectors ``(..., D, D)`` (columns) of a symmetric ``cov``, float64.

    Signs are made deterministic: each eigenvector's largest-magnitude entry is positive.
    """
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"eigendecomposition: cov must be (..., D, D); got shape {tuple(cov.shape)}")
    c = cov.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("eigendecomposition: cov has non-finite (inf or NaN) entries")
    lam, U = torch.linalg.eigh(0.5 * (c + c.transpose(-1, -2)))
    lam, U = lam.flip(-1), U.flip(-1)
    pivot = U.gather(-2, U.abs().argmax(-2, keepdim=True))
    return lam, U * torch.where(pivot < 0, -1.0, 1.0)


def pca_whitening(cov: torch.Tensor, variance_ratio: float = 0.99, mode: Literal["pca", "npca"] = "pca", *,
                  ridge: float = 0.0, paper: bool = False, dtype: torch.dtype | None = torch.float32) -> PCAWhitening:
    """PCA or NPCA whitening matrix of a ``(D, D)`` covariance (see the module docstring for the selection).

    Args:
        cov: ``(D, D)`` symmetric covariance (any float dtype; decomposed in float64).
        variance_ratio: in ``[0, 1]``; the share of ``tr Σ`` that the leading components must explain.
        mode: ``"pca"`` keeps those leading components, ``"npca"`` keeps the rest.
        ridge: added to the kept eigenvalues before ``λ^{-1/2}`` (≥ 0), for a near-singular tail.
        paper: use the reference implementation's selection (overlapping PCA / NPCA sets).
        dtype: dtype of ``whitening`` (``None``: float64).

    Returns:
        :class:`PCAWhitening` ``(whitening (D, R), components (D, R), eigenvalues (R,), explained_variance_ratio (D,))``.

    Raises:
        ValueError: bad shape / mode / ratio / ridge, or a selection with no component.
        NotPositiveDefiniteError: a kept eigenvalue (+ ridge) is not positive; names the smallest.
    """
    if cov.dim() != 2:
        raise ValueError(f"pca_whitening: cov must be a (D, D) matrix; got shape {tuple(cov.shape)}")
    if mode not in ("pca", "npca"):
        raise ValueError(f"pca_whitening: mode must be 'pca' or 'npca'; got {mode!r}")
    if not 0.0 <= variance_ratio <= 1.0:
        raise ValueError(f"pca_whitening: variance_ratio must lie in [0, 1]; got {variance_ratio}")
    ridge = check_ridge(ridge, "pca_whitening")
    lam, U = eigendecomposition(cov)
    D = lam.shape[0]
    pos = lam.clamp_min(0.0)
    total = float(pos.sum())
    if total <= 0:
        raise ValueError("pca_whitening: the covariance has no positive variance")
    ratio = pos / total
    cum = ratio.cumsum(0)
    cum[-1] = 1.0  # exact, so that variance_ratio=1 selects every component
    if paper:
        above = torch.nonzero(cum > variance_ratio)
        k = int(above[0, 0]) if above.numel() else D - 1
        lo, hi = (0, k + 1) if mode == "pca" else (max(k - 1, 0), D)
    else:
        # smallest r with Σ_{i<r} ratio_i ≥ t; t = 1 means every component, even zero-variance ones
        r = D if variance_ratio >= 1 else int((cum < variance_ratio).sum()) + 1 if variance_ratio > 0 else 0
        lo, hi = (0, r) if mode == "pca" else (r, D)
    if hi <= lo:
        raise ValueError(f"pca_whitening: mode={mode!r} with variance_ratio={variance_ratio} keeps no component "
                         f"(D={D}); use a {'larger' if mode == 'pca' else 'smaller'} variance_ratio")
    kept, comp = lam[lo:hi], U[:, lo:hi]
    shifted = kept + ridge
    if float(shifted.min()) <= 0:
        raise NotPositiveDefiniteError(
            f"pca_whitening: kept eigenvalue {float(kept.min()):.6g} (+ ridge {ridge}) is not positive; pass ridge > 0 "
            f"(the largest eigenvalue is {float(lam[0]):.6g})", index=None, min_eigenvalue=float(kept.min()))
    W = comp * shifted.rsqrt()
    return PCAWhitening(W if dtype is None else W.to(dtype), comp, kept, ratio)
