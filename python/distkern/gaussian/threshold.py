r"""Thresholds on Mahalanobis distances under the Gaussian assumption, without scipy.

If ``x ~ N(μ, Σ)`` in ``D`` dimensions, ``d² = (x − μ)ᵀ Σ⁻¹ (x − μ) ~ χ²(D)``. The threshold for a
false-positive rate ``fpr`` is the upper quantile ``t`` with ``P(χ²_D > t) = fpr``, i.e.
``Q(D/2, t/2) = fpr`` with ``Q`` the regularized upper incomplete gamma function
computed here in float64 (:func:`_gammaincc`; ``torch.special.gammaincc`` is off by up to
~1e-9 relative for large ``a`` near ``x = a``, where it switches to an asymptotic series). ``t``
is found by a safeguarded Newton iteration on ``log Q`` (bracketing interval, bisection whenever a
Newton step leaves it), started from the Wilson–Hilferty approximation, to about 1e-13 relative.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["chi2_threshold", "distance_threshold"]

_Num = float | int | torch.Tensor
_EPS = 2.0 ** -53


def _log_prefactor(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log(xᵃ e⁻ˣ / Γ(a))``; for ``a ≥ 10`` via Stirling, ``−a (u − log1p u) + ½ log(a/2π) − stirling(a)`` with
    ``u = (x − a)/a``, which avoids the cancellation of ``a log x − x − lgamma(a)`` (absolute error ~``|x − a|·ε``)."""
    big = a >= 10
    ab = torch.where(big, a, 10.0)
    u = (x - ab) / ab
    r = 1.0 / (ab * ab)
    stirling = (1.0 / 12 - r * (1.0 / 360 - r * (1.0 / 1260 - r * (1.0 / 1680 - r / 1188)))) / ab
    large = -ab * (u - torch.log1p(u)) + 0.5 * torch.log(ab / (2 * math.pi)) - stirling
    return torch.where(big, large, a * torch.log(x) - x - torch.lgamma(a))


def _gammaincc(a: torch.Tensor, x: torch.Tensor, max_iter: int = 100_000) -> torch.Tensor:
    """Regularized upper incomplete gamma ``Q(a, x)`` in float64 (``x > 0``): the power series of ``P``
    for ``x < a + 1`` (``Q = 1 − P``), the continued fraction of ``Q`` (modified Lentz) otherwise."""
    a, x = torch.broadcast_tensors(a, x)
    pre = _log_prefactor(a, x)
    ser = x < a + 1
    # series: P = xᵃe⁻ˣ/Γ(a+1) · Σₙ xⁿ / ((a+1)…(a+n))
    term = torch.ones_like(x)
    total = torch.ones_like(x)
    # continued fraction (Numerical Recipes' gcf): Q = xᵃe⁻ˣ/Γ(a) · 1/(x+1−a− 1·(1−a)/(x+3−a− …))
    tiny = 1e-300
    b = x + 1.0 - a
    c = torch.full_like(x, 1.0 / tiny)
    d = 1.0 / torch.where(b.abs() < tiny, tiny, b)
    h = d.clone()
    done = torch.zeros_like(x, dtype=torch.bool)
    for i in range(1, max_iter + 1):
        term = term * x / (a + i)
        total = total + term
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = 1.0 / torch.where(d.abs() < tiny, tiny, d)
        c = b + an / c
        c = torch.where(c.abs() < tiny, tiny, c)
        delta = d * c
        h = torch.where(done | ser, h, h * delta)
        done = done | torch.where(ser, term < total * _EPS, (delta - 1.0).abs() < _EPS)
        if i % 16 == 0 and bool(done.all()):
            break
    p_series = torch.exp(pre - torch.log(a)) * total
    return torch.where(ser, 1.0 - p_series, torch.exp(pre) * h)


def chi2_threshold(dof: _Num, fpr: _Num, *, rtol: float = 1e-14, max_iter: int = 200) -> float | torch.Tensor:
    """Squared-distance threshold ``t`` with ``P(χ²_dof > t) = fpr`` (= ``scipy.stats.chi2.isf(fpr, dof)``).

    Args:
        dof: degrees of freedom (the dimension ``D``), ``> 0``; a number or a tensor.
        fpr: false-positive rate in ``(0, 1)``; a number or a tensor (broadcast with ``dof``).
            The Gaussian AD paper's ``chi2.ppf(p, k)`` is ``chi2_threshold(k, 1 - p)``.
        rtol: relative tolerance on ``t``; max_iter: iteration cap (a few tens are typical).

    Returns:
        A ``float`` for number inputs, else a float64 tensor of the broadcast shape.
    """
    scalar = not isinstance(dof, torch.Tensor) and not isinstance(fpr, torch.Tensor)
    k = torch.as_tensor(dof, dtype=torch.float64)
    p = torch.as_tensor(fpr, dtype=torch.float64, device=k.device)
    k, p = torch.broadcast_tensors(k, p)
    if not bool(((k > 0) & torch.isfinite(k)).all()):
        raise ValueError(f"chi2_threshold: dof must be finite and > 0; got {dof}")
    if not bool(((p > 0) & (p < 1)).all()):
        raise ValueError(f"chi2_threshold: fpr must lie in (0, 1); got {fpr}")
    a = 0.5 * k
    log_p = torch.log(p)
    log_f0 = -a * math.log(2.0) - torch.lgamma(a)  # χ² density f(t) = exp(log_f0 + (a − 1) log t − t/2)

    def newton(q: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.zeros_like(t), torch.full_like(t, math.inf)
        done = torch.zeros_like(t, dtype=torch.bool)
        for _ in range(max_iter):
            lq = torch.log(q(a, 0.5 * t))
            g = lq - log_p  # decreasing in t
            lo = torch.where(g > 0, t, lo)
            hi = torch.where(g < 0, t, hi)
            # d/dt log Q(k/2, t/2) = −f(t)/Q(t): the Newton step is g·Q/f, taken in logs.
            new = t + g * torch.exp(lq - log_f0 - (a - 1.0) * torch.log(t) + 0.5 * t)
            bad = ~((new > lo) & (new < hi)) | ~torch.isfinite(new)
            new = torch.where(bad, torch.where(torch.isfinite(hi), 0.5 * (lo + hi), 2.0 * t), new)
            new = torch.where(done | (g == 0), t, new)
            done = done | (g == 0) | ((new - t).abs() <= rtol * t) | ((hi - lo) <= rtol * t)
            t = new
            if bool(done.all()):
                break
        return t

    # Wilson–Hilferty start: χ²_k ≈ k (1 − 2/(9k) + z √(2/(9k)))³, z the upper normal quantile.
    z = -torch.special.ndtri(p)
    c = 2.0 / (9.0 * k)
    t = (k * (1.0 - c + z * torch.sqrt(c)).clamp_min(1e-3) ** 3).clamp_min(1e-300)
    # Converge cheaply on torch's Q (≤ ~1e-9 off), then polish with the accurate one (1–3 steps).
    t = newton(torch.special.gammaincc, t)
    t = newton(_gammaincc, t)
    return float(t) if scalar else t


def distance_threshold(dof: _Num, fpr: _Num) -> float | torch.Tensor:
    """Distance (not squared) threshold ``√chi2_threshold(dof, fpr)``, for scores from ``sqrt(mahalanobis(...))``."""
    t = chi2_threshold(dof, fpr)
    return math.sqrt(t) if isinstance(t, float) else t.sqrt()
