r"""Prompt flows: Gaussian base distributions over the prompt-token space pushed through planar flows.

As in Bayes-PFL (models/PFL.py, models/flows.py): a diagonal Gaussian ``q(z₀) = N(μ, diag σ²)`` from a small
MLP, ``K`` planar transforms ``z_{k} = z_{k-1} + u_k tanh(w_kᵀ z_{k-1} + b_k)`` with
``log|det ∂z_k/∂z_{k-1}| = log|1 + u_kᵀ ψ_k|``, ``ψ_k = (1 − tanh²(w_kᵀ z + b_k)) w_k``, and the
regulariser (the KL of the flow's density to the prior ``N(0, I)``, a single-sample estimate)

    KL ≈ (1/B) Σ_b [ log q(z₀) − log p(z_K) − Σ_k log|det| ]   (Gaussian constants dropped, as in loss.py).

Two kinds, as in the paper: :class:`ImageSpecificFlow` (μ, σ and the flow parameters ``u, w, b`` are
amortised from the global image embedding) and :class:`ImageAgnosticFlow` (a learnable state vector through
a Gaussian head that may be shared between flows; ``u, w, b`` are free parameters).

One change from the repository: the planar ``u`` is reparameterised to ``û = u + (softplus(wᵀu) − 1 − wᵀu)
w/‖w‖²`` (Rezende & Mohamed, 2015, appendix A), which keeps every transform invertible (``wᵀû > −1``, so
``1 + ψᵀû > 0`` and the log-det needs no ``abs`` / epsilon).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["planar_flow", "GaussianHead", "ImageSpecificFlow", "ImageAgnosticFlow", "flow_kl"]


def planar_flow(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply K planar transforms to ``z (..., D)``; ``u, w (..., K, D)`` and ``b (..., K)`` broadcast against
    ``z``'s leading dimensions. Returns ``(z_K (..., D), Σ_k log|det ∂z_k/∂z_{k-1}| (...))``."""
    logdet = z.new_zeros(())
    for k in range(u.shape[-2]):
        uk, wk, bk = u[..., k, :], w[..., k, :], b[..., k:k + 1]
        wu = (wk * uk).sum(-1, keepdim=True)
        uk = uk + (F.softplus(wu) - 1 - wu) * wk / (wk * wk).sum(-1, keepdim=True).clamp_min(1e-12)
        h = torch.tanh((wk * z).sum(-1, keepdim=True) + bk)
        z = z + uk * h
        psi_u = ((1 - h * h) * wk * uk).sum(-1)
        logdet = logdet + torch.log1p(psi_u.clamp_min(-1 + 1e-6))
    return z, logdet


def _mlp(inp: int, hid: int, out: int) -> nn.Sequential:
    # models/VPB.py InferenceBlock
    return nn.Sequential(nn.Linear(inp, hid), nn.Softplus(), nn.Linear(hid, hid), nn.Softplus(), nn.Linear(hid, out))


class GaussianHead(nn.Module):
    """``x ↦ (μ, log σ²)`` by two MLPs (the repository's ``Encoder``)."""

    def __init__(self, inp: int, hid: int, out: int):
        super().__init__()
        self.mean, self.logvar = _mlp(inp, hid, out), _mlp(inp, hid, out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), self.logvar(x)


def _log_normal(x, mean, logvar):
    return (-0.5 * (logvar + (x - mean) ** 2 * torch.exp(-logvar))).sum(-1)


def flow_kl(z0, zk, mu, logvar, logdet) -> torch.Tensor:
    """Single-sample KL estimate ``mean over samples of [log q(z₀) − log N(z_K; 0, I) − log|det|]`` (constants
    dropped, as Bayes-PFL's ``binary_loss_function``)."""
    log_q = _log_normal(z0, mu, logvar)
    log_p = _log_normal(zk, torch.zeros_like(zk), torch.zeros_like(zk))
    return (log_q - log_p - logdet).mean()


def _sample(mu, logvar, eps):
    return mu + torch.exp(0.5 * logvar) * eps


class ImageSpecificFlow(nn.Module):
    """Image-conditioned distribution: ``μ, log σ²`` and the flow parameters from the image embedding."""

    def __init__(self, embed_dim: int, hidden: int, dim: int, n_flows: int):
        super().__init__()
        self.dim, self.n_flows = dim, n_flows
        self.head = GaussianHead(embed_dim, hidden, dim)
        self.amor_u = nn.Linear(embed_dim, n_flows * dim)
        self.amor_w = nn.Linear(embed_dim, n_flows * dim)
        self.amor_b = nn.Linear(embed_dim, n_flows)

    def forward(self, image_embedding: torch.Tensor, eps: torch.Tensor):
        """``image_embedding (B, E)``, ``eps (S, B or 1, dim)`` standard normal → ``(z_K (S, B, dim), kl)``."""
        B = image_embedding.shape[0]
        mu, logvar = self.head(image_embedding)
        u = self.amor_u(image_embedding).view(B, self.n_flows, self.dim)
        w = self.amor_w(image_embedding).view(B, self.n_flows, self.dim)
        b = self.amor_b(image_embedding)
        z0 = _sample(mu, logvar, eps)
        zk, logdet = planar_flow(z0, u, w, b)
        return zk, flow_kl(z0, zk, mu, logvar, logdet)


class ImageAgnosticFlow(nn.Module):
    """Image-agnostic distribution: a learnable ``state`` through a (possibly shared) Gaussian head, and free
    planar parameters (the repository's ``PlanarPFL_state``)."""

    def __init__(self, embed_dim: int, dim: int, n_flows: int):
        super().__init__()
        self.state = nn.Parameter(torch.randn(1, embed_dim))
        self.u = nn.Parameter(torch.randn(1, n_flows, dim))
        self.w = nn.Parameter(torch.randn(1, n_flows, dim))
        self.b = nn.Parameter(torch.randn(1, n_flows))

    def forward(self, head: GaussianHead, eps: torch.Tensor):
        """``eps (S, 1, dim)`` → ``(z_K (S, 1, dim), kl)``; ``head`` maps the state to ``(μ, log σ²)``."""
        mu, logvar = head(self.state)
        z0 = _sample(mu, logvar, eps)
        zk, logdet = planar_flow(z0, self.u, self.w, self.b)
        return zk, flow_kl(z0, zk, mu, logvar, logdet)
