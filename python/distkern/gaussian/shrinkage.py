"""Covariance estimators (float64), matching scikit-learn's on the same data.

The shrinkage formulas are written twice: for a data matrix (:func:`ledoit_wolf`, :func:`oas`)
and from sufficient statistics (:func:`ledoit_wolf_shrinkage`, :func:`oas_shrinkage`), batched
over leading dimensions, which is what the streaming :class:`~distkern.gaussian.GaussianStats`
uses. Both shrink towards a scaled identity: ``Σ = (1 − s)·S + s·(tr S / D)·I``.
"""
from __future__ import annotations

import torch

__all__ = ["empirical_covariance", "ledoit_wolf", "oas", "ledoit_wolf_shrinkage", "oas_shrinkage", "shrink"]


def _check_features(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name}: features must be a 2-D tensor of shape (N, D); got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples to estimate a covariance; got N={x.shape[0]}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name}: features must be a floating tensor; got {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = torch.nonzero(~torch.isfinite(x).all(1))[:5, 0].tolist()
        raise ValueError(f"{name}: features contain inf or NaN (rows {bad}{'...' if len(bad) == 5 else ''}); "
                         "a Gaussian fitted to them would be meaningless")
    return x


def _center(x: torch.Tensor, assume_centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if assume_centered else x.mean(0)
    return mean, x - mean


def empirical_covariance(x: torch.Tensor, *, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood mean and covariance (divides by N, like scikit-learn). Returns float64 ``(mean (D,), cov (D, D))``."""
    x = _check_features("empirical_covariance", x)
    mean, xc = _center(x, assume_centered)
    return mean, (xc.T @ xc) / x.shape[0]


def ledoit_wolf_shrinkage(count: torch.Tensor | float, emp_cov: torch.Tensor, sum_norm4: torch.Tensor | float) -> torch.Tensor:
    r"""Ledoit-Wolf shrinkage from sufficient statistics, as ``sklearn.covariance.ledoit_wolf_shrinkage``.

    Args:
        count: ``(...)`` number of samples ``n``.
        emp_cov: ``(..., D, D)`` empirical (divide-by-``n``) covariance ``S`` of the centered data.
        sum_norm4: ``(...)`` :math:`\sum_n \lVert x_n - \mu\rVert^4` over the same centered data.

    Returns:
        ``(...)`` float64 shrinkage in ``[0, 1]`` (0 when ``D == 1``). With ``μ = tr S / D``:
        ``β = (Σ‖x−μ‖⁴/n − ‖S‖²_F) / (D n)``, ``δ = (‖S‖²_F − 2μ tr S + Dμ²) / D``,
        ``s = min(β, δ) / δ`` (0 when that is 0). Rounding-level negatives are clamped to 0.
    """
    S = emp_cov.to(torch.float64)
    n = torch.as_tensor(count, dtype=torch.float64, device=S.device)
    m4 = torch.as_tensor(sum_norm4, dtype=torch.float64, device=S.device)
    d = S.shape[-1]
    if d == 1:
        return torch.zeros(S.shape[:-2], dtype=torch.float64, device=S.device)
    tr = S.diagonal(dim1=-2, dim2=-1).sum(-1)
    mu = tr / d
    delta_ = (S * S).sum((-2, -1))
    beta = (m4 / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * tr + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    s = torch.where(beta > 0, beta / torch.where(delta > 0, delta, 1.0), 0.0)
    return s.clamp(0.0, 1.0)


def oas_shrinkage(count: torch.Tensor | float, emp_cov: torch.Tensor) -> torch.Tensor:
    r"""Oracle Approximating Shrinkage coefficient, as ``sklearn.covariance.oas`` (scikit-learn ≥ 1.2).

    With ``α = mean(S²)`` (the mean of the squared entries), ``μ = tr S / D``:
    ``s = min((α + μ²) / ((n + 1)(α − μ²/D)), 1)``, and 1 when the denominator is 0 (Chen et al.
    2010, Eq. 23, with scikit-learn's omission of the ``2/D`` factor). 0 when ``D == 1``.

    Args:
        count: ``(...)`` number of samples ``n``; emp_cov: ``(..., D, D)`` empirical covariance.

    Returns:
        ``(...)`` float64 shrinkage.
    """
    S = emp_cov.to(torch.float64)
    n = torch.as_tensor(count, dtype=torch.float64, device=S.device)
    d = S.shape[-1]
    if d == 1:
        return torch.zeros(S.shape[:-2], dtype=torch.float64, device=S.device)
    alpha = (S * S).mean((-2, -1))
    mu2 = (S.diagonal(dim1=-2, dim2=-1).sum(-1) / d) ** 2
    num = alpha + mu2
    den = (n + 1) * (alpha - mu2 / d)
    return torch.where(den == 0, 1.0, torch.minimum(num / torch.where(den == 0, 1.0, den), torch.ones_like(num)))


def shrink(emp_cov: torch.Tensor, shrinkage: torch.Tensor | float) -> torch.Tensor:
    """``(1 − s)·S + s·(tr S / D)·I``, batched: ``emp_cov (..., D, D)``, ``shrinkage`` scalar or ``(...)``. float64."""
    S = emp_cov.to(torch.float64)
    s = torch.as_tensor(shrinkage, dtype=torch.float64, device=S.device)
    mu = S.diagonal(dim1=-2, dim2=-1).mean(-1)
    out = (1.0 - s)[..., None, None] * S
    out.diagonal(dim1=-2, dim2=-1).add_((s * mu)[..., None])
    return out


def ledoit_wolf(x: torch.Tensor, *, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance, as ``sklearn.covariance.LedoitWolf``.

    ``Σ = (1 − s)·S + s·(tr S / D)·I`` with ``S`` the empirical covariance and the shrinkage ``s``
    from Ledoit & Wolf (2004), computed in float64 (see :func:`ledoit_wolf_shrinkage`).

    Args:
        x: ``(N, D)`` features, N ≥ 2, finite.

    Returns:
        ``(mean (D,), cov (D, D), shrinkage)`` in float64.
    """
    x = _check_features("ledoit_wolf", x)
    mean, xc = _center(x, assume_centered)
    emp = (xc.T @ xc) / x.shape[0]
    s = ledoit_wolf_shrinkage(x.shape[0], emp, ((xc * xc).sum(1) ** 2).sum())
    return mean, shrink(emp, s), float(s)


def oas(x: torch.Tensor, *, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Oracle Approximating Shrinkage covariance, as ``sklearn.covariance.OAS`` (scikit-learn ≥ 1.2 formula).

    Args:
        x: ``(N, D)`` features, N ≥ 2, finite.

    Returns:
        ``(mean (D,), cov (D, D), shrinkage)`` in float64; see :func:`oas_shrinkage`.
    """
    x = _check_features("oas", x)
    mean, xc = _center(x, assume_centered)
    emp = (xc.T @ xc) / x.shape[0]
    s = oas_shrinkage(x.shape[0], emp)
    return mean, shrink(emp, s), float(s)
