"""Covariance estimators (float64), matching scikit-learn's on the same data."""
from __future__ import annotations

import torch

__all__ = ["empirical_covariance", "ledoit_wolf"]


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


def empirical_covariance(x: torch.Tensor, *, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood mean and covariance (divides by N, like scikit-learn). Returns float64 ``(mean (D,), cov (D, D))``."""
    x = _check_features("empirical_covariance", x)
    mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if assume_centered else x.mean(0)
    xc = x - mean
    return mean, (xc.T @ xc) / x.shape[0]


def ledoit_wolf(x: torch.Tensor, *, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance, as ``sklearn.covariance.LedoitWolf``.

    ``Σ = (1 − s)·S + s·(tr S / D)·I`` with ``S`` the empirical covariance and the shrinkage ``s``
    from Ledoit & Wolf (2004), computed in float64.

    Args:
        x: ``(N, D)`` features, N ≥ 2, finite.

    Returns:
        ``(mean (D,), cov (D, D), shrinkage)`` in float64.
    """
    x = _check_features("ledoit_wolf", x)
    n, d = x.shape
    mean = torch.zeros(d, dtype=x.dtype, device=x.device) if assume_centered else x.mean(0)
    xc = x - mean
    emp = (xc.T @ xc) / n
    mu = float(torch.trace(emp)) / d
    if d == 1:
        return mean, emp, 0.0
    x2 = xc * xc
    beta_ = float((x2.sum(1) ** 2).sum())  # = sum of (X²)ᵀX²
    delta_ = float((emp * emp).sum())  # = sum of (XᵀX)² / n²
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(x2.sum(0).sum()) / n + d * mu * mu) / d
    beta = min(beta, delta)
    s = 0.0 if beta == 0 else beta / delta
    cov = (1.0 - s) * emp
    cov.diagonal().add_(s * mu)
    return mean, cov, s
