"""From a covariance to the whitening factor the Mahalanobis op takes."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["NotPositiveDefiniteError", "whitening_factor"]


def check_ridge(ridge, who: str) -> float:
    """``ridge`` as a float, or a clear error naming ``who``: a real number (not a bool or a string, as
    ``--set ridge=...`` might pass), finite and ``>= 0``."""
    if isinstance(ridge, torch.Tensor) and ridge.numel() == 1:
        ridge = ridge.item()
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise TypeError(f"{who}: ridge must be a number >= 0; got {ridge!r} ({type(ridge).__name__})")
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{who}: ridge must be >= 0; got {ridge}")
    return ridge


class NotPositiveDefiniteError(ValueError):
    """A covariance that has no Cholesky factorisation (not positive definite)."""

    def __init__(self, message: str, index: tuple[int, ...] | None = None, min_eigenvalue: float | None = None):
        super().__init__(message)
        self.index = index
        self.min_eigenvalue = min_eigenvalue


def whitening_factor(cov: torch.Tensor, *, ridge: float = 0.0, dtype: torch.dtype | None = torch.float32,
                     assume_symmetric: bool = False, scale: float = 1.0, release: bool = False) -> torch.Tensor:
    r"""Lower-triangular ``L`` with ``(scale·Σ + ridge·I)⁻¹ = L Lᵀ``, for :func:`distkern.mahalanobis`.

    Computed in float64 without forming the inverse: with ``J`` the reversal permutation and
    ``JΣJ = C Cᵀ`` (Cholesky), ``Σ = U Uᵀ`` with ``U = JCJ`` upper-triangular, and
    ``L = U⁻ᵀ`` is lower-triangular with ``L Lᵀ = Σ⁻¹``; then ``Lᵀ(x − μ) = U⁻¹(x − μ)``.

    Args:
        cov: ``(..., D, D)`` symmetric covariance(s); a batch gives one factor per matrix.
        ridge: added to the diagonal before factorising (diagonal loading), ``≥ 0``.
        dtype: dtype of the returned factor (``None``: float64).
        assume_symmetric: ``cov`` is symmetric to the bit (as :meth:`GaussianStats.covariance
            <distkern.gaussian.GaussianStats.covariance>` returns it): skip averaging it with its
            transpose, a pass over all of it. Otherwise ``½(Σ + Σᵀ)`` is factorised.
        scale: ``Σ`` is multiplied by it (``> 0``) as it is loaded, e.g. ``1/n`` to factorise a scatter
            matrix ``Σ z zᵀ`` as the covariance it gives, without materialising that covariance.
        release: ``cov`` is not needed afterwards, and its contents are then undefined. On the CPU
            (Linux), with ``cov`` contiguous float64, the memory of each matrix that factorised goes back to
            the operating system as soon as it is loaded, so the factors take the place of ``cov`` instead
            of adding to it (``distkern.whitening_factors_release_``). A matrix that fails is kept as it was.

    Raises:
        NotPositiveDefiniteError: a covariance is not positive definite; the message names its
            batch index and its smallest eigenvalue, and suggests a ridge.
        ValueError: wrong shape, non-finite entries, or a negative ridge.
    """
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"whitening_factor: cov must be a (..., D, D) square matrix; got shape {tuple(cov.shape)}")
    ridge = check_ridge(ridge, "whitening_factor")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) < math.inf:
        raise ValueError(f"whitening_factor: scale must be a finite number > 0; got {scale!r}")
    c = cov if cov.dtype == torch.float64 else cov.to(torch.float64)
    # the sum of the entries is finite exactly when they all are, unless finite ones overflow it: one
    # read, and the elementwise scan only then (PaDiM's covariances are 3136 × D² float64)
    if not bool(torch.isfinite(c.sum())) and not bool(torch.isfinite(c).all()):
        raise ValueError("whitening_factor: cov has non-finite (inf or NaN) entries")
    D = c.shape[-1]
    batch = c.shape[:-2]
    # the factorisation itself: distkern's op (csrc/mahalanobis/factor.cpp), chunked and parallel on the CPU
    op = torch.ops.distkern.whitening_factors_release_ if release else torch.ops.distkern.whitening_factors
    L, info = op(c.reshape(-1, D, D), ridge, not assume_symmetric, torch.float64 if dtype is None else dtype,
                 float(scale))
    bad = torch.nonzero(info > 0)
    if bad.numel():
        flat = int(bad[0, 0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), batch)) if batch else ()
        m = c.reshape(-1, D, D)[flat]
        m = m if assume_symmetric else 0.5 * (m + m.T)
        eig = torch.linalg.eigvalsh(scale * m + ridge * torch.eye(D, dtype=m.dtype, device=m.device))
        where = f" at batch index {index}" if index else ""
        raise NotPositiveDefiniteError(
            f"whitening_factor: covariance{where} is not positive definite: smallest eigenvalue "
            f"{float(eig[0]):.6g} (largest {float(eig[-1]):.6g}). Use shrinkage (Ledoit-Wolf, OAS; with very few "
            f"samples they may not shrink enough) or pass ridge > 0 (e.g. ridge={max(1e-6, 1e-6 * abs(float(eig[-1]))):.1g}).",
            index=index,
            min_eigenvalue=float(eig[0]),
        )
    return L.reshape(c.shape)


@torch.library.register_fake("distkern::whitening_factors")
def _whitening_factors_fake(cov, ridge=0.0, symmetrize=True, dtype=None, scale=1.0):
    torch._check(cov.dim() == 3 and cov.shape[1] == cov.shape[2],
                 lambda: f"distkern.whitening_factors: cov must be (G, D, D); got {tuple(cov.shape)}")
    return cov.new_empty(cov.shape, dtype=dtype or torch.float64), cov.new_empty(cov.shape[:1], dtype=torch.int32)


@torch.library.register_fake("distkern::whitening_factors_release_")
def _whitening_factors_release_fake(cov, ridge=0.0, symmetrize=True, dtype=None, scale=1.0):
    return _whitening_factors_fake(cov, ridge, symmetrize, dtype, scale)
