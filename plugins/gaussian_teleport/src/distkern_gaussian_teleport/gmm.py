r"""A Gaussian mixture whose optimal denoiser is known in closed form (the demo's "model").

For ``p(x0) = Σ_k π_k N(μ_k, Σ_k)`` and ``x = x0 + σ·ε``, the optimal (MMSE) denoiser is the posterior-weighted
mean of the components' own Gaussian denoisers::

    D(x, σ) = Σ_k w_k(x, σ) [μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x − μ_k)],   w_k ∝ π_k N(x; μ_k, Σ_k + σ²I)

so a sampler driven by it integrates the true probability-flow ODE of the mixture: every error left is the
sampler's (discretisation) error, which is what the demo measures.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture", "demo_mixture"]


class GaussianMixture:
    """``weights (K,)``, ``means (K, D)``, ``covs (K, D, D)`` (symmetric positive semi-definite), float64."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        weights, means, covs = (torch.as_tensor(t, dtype=torch.float64) for t in (weights, means, covs))
        if means.dim() != 2 or covs.shape != (means.shape[0], means.shape[1], means.shape[1]) or \
                weights.shape != (means.shape[0],):
            raise ValueError("GaussianMixture: weights (K,), means (K, D), covs (K, D, D)")
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        self._s, self._V = evals.clamp(min=0), evecs  # (K, D), (K, D, D)
        self._chol = torch.linalg.cholesky(covs + 1e-12 * torch.eye(means.shape[1], dtype=torch.float64))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, D)`` float64 samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        d = self.means - mu
        return (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact ``E[x0 | x0 + σε = x]``: ``x`` ``(B, D)``, ``sigma`` a float or ``(B,)``; returns ``(B, D)``
        in x's dtype (computed in float64)."""
        xd = x.to(torch.float64).reshape(x.shape[0], -1)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=xd.device)
        s2 = (s2.reshape(1, -1, 1) if s2.dim() else s2.reshape(1, 1, 1)) ** 2  # (1, B|1, 1)
        z = torch.bmm(xd[None] - self.means[:, None], self._V)  # (K, B, D): eigen-coordinates per component
        var = self._s[:, None] + s2  # (K, B, D)
        logw = torch.log(self.weights)[:, None] - 0.5 * (torch.log(var).sum(-1) + (z * z / var).sum(-1))
        w = torch.softmax(logw, dim=0)  # (K, B)
        comp = self.means[:, None] + torch.bmm(self._s[:, None] / var * z, self._V.transpose(1, 2))  # (K, B, D)
        return (w[:, :, None] * comp).sum(0).to(x.dtype).reshape(x.shape)


def demo_mixture(dim: int = 8, seed: int = 0) -> GaussianMixture:
    """The demo's mixture: 8 components with unequal weights (0.04 … 0.22); in 2-D, centres on a circle of radius
    2; in ``dim > 2``, centres ``2·e_k`` (``k < 8``; ``dim ≥ 8``) plus a small random offset. Each component is an
    anisotropic Gaussian with standard deviations log-uniform in [0.05, 0.4] along random axes."""
    if dim != 2 and dim < 8:
        raise ValueError(f"demo_mixture: dim must be 2 or ≥ 8; got {dim}")
    g = torch.Generator().manual_seed(int(seed))
    K = 8
    weights = torch.tensor([0.22, 0.18, 0.15, 0.12, 0.11, 0.09, 0.09, 0.04], dtype=torch.float64)
    if dim == 2:
        ang = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
        means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    else:
        means = torch.zeros(K, dim, dtype=torch.float64)
        means[torch.arange(K), torch.arange(K)] = 2.0
        means += 0.3 * torch.randn(K, dim, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(K):
        q, _r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        std = torch.exp(torch.empty(dim, dtype=torch.float64).uniform_(math.log(0.05), math.log(0.4), generator=g))
        covs.append(q @ torch.diag(std**2) @ q.T)
    return GaussianMixture(weights, means, torch.stack(covs))
