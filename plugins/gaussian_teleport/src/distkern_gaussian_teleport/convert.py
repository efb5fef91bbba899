r"""Noise-level conventions and denoiser → model-output adapters.

Two latent conventions meet in :mod:`distkern.diffusion`:

* **VE** (variance exploding; Euler, Euler ancestral, EDM / k-diffusion): ``x = x0 + σ·ε``.
* **VP** (variance preserving; DDPM, DDIM, DPM-Solver++): ``x_t = √ā·x0 + √(1−ā)·ε``.

They are the same point up to a scale: ``x_VE = x_VP / √ā`` at ``σ = √((1−ā)/ā)``, i.e. ``√ā = 1/√(σ²+1)`` and
``x_VP = x_VE / √(σ²+1)`` (which is also what the Euler schedulers' ``scale_model_input`` feeds the model).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["sigma_from_alpha_bar", "alpha_bar_from_sigma", "vp_to_ve", "ve_to_vp", "train_sigmas",
           "sigma_at", "epsilon_model"]


def sigma_from_alpha_bar(alpha_bar):
    """VE noise level ``σ = √((1−ā)/ā)`` of a VP cumulative ``ā`` (float or tensor)."""
    if isinstance(alpha_bar, torch.Tensor):
        return ((1 - alpha_bar) / alpha_bar).sqrt()
    return float(np.sqrt((1 - alpha_bar) / alpha_bar))


def alpha_bar_from_sigma(sigma):
    """VP cumulative ``ā = 1/(σ²+1)`` of a VE noise level (float or tensor)."""
    return 1 / (sigma**2 + 1)


def _scale(sigma, x: torch.Tensor) -> torch.Tensor | float:
    """``√(σ²+1)`` as a float, or a ``(B, 1, …)`` tensor broadcasting against ``x`` for a ``(B,)`` σ."""
    if isinstance(sigma, torch.Tensor):
        s = (sigma.to(torch.float64) ** 2 + 1).sqrt()
        if s.dim() == 0:
            return float(s)
        return s.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return float(np.sqrt(float(sigma) ** 2 + 1))


def vp_to_ve(x: torch.Tensor, sigma) -> torch.Tensor:
    """``x_VE = x_VP·√(σ²+1)`` (``= x_VP/√ā``) at the VE level ``σ`` (float, 0-d or ``(B,)`` tensor)."""
    return x * _scale(sigma, x)


def ve_to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """``x_VP = x_VE/√(σ²+1)`` (``= √ā·x_VE``) at the VE level ``σ``."""
    return x / _scale(sigma, x)


def train_sigmas(scheduler) -> np.ndarray:
    """``(num_train_timesteps,)`` float64 VE σ of every training timestep, from ``scheduler.alphas_cumprod``."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: cannot map timesteps to noise levels")
    ac = ac.detach().cpu().double().numpy() if isinstance(ac, torch.Tensor) else np.asarray(ac, dtype=np.float64)
    return np.sqrt((1 - ac) / ac)


def sigma_at(timestep, sigmas: np.ndarray, interpolation: str = "linear") -> torch.Tensor:
    """VE σ at (possibly fractional) training timesteps: ``(B,)`` or 0-d float64 CPU tensor. ``"linear"``
    interpolates σ linearly in ``t`` (the Euler schedulers' default σ's at fractional timesteps); ``"log"``
    interpolates log σ (the inverse of their σ → t map for Karras σ's)."""
    t = timestep.detach().cpu().double().numpy() if isinstance(timestep, torch.Tensor) else np.asarray(
        timestep, dtype=np.float64)
    grid = np.arange(len(sigmas))
    if interpolation == "log":
        return torch.from_numpy(np.asarray(np.exp(np.interp(t, grid, np.log(sigmas))), dtype=np.float64))
    return torch.from_numpy(np.asarray(np.interp(t, grid, sigmas), dtype=np.float64))


def epsilon_model(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                  prediction_type: str | None = None, interpolation: str = "auto"
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""Turn a VE denoiser ``denoise(x_VE (B, ...), σ (B,) float64) -> x̂0`` into a diffusers-style model
    ``model(x_in, t) -> model_output`` for ``scheduler`` (any of :mod:`distkern.diffusion`'s).

    The model input of every scheduler there is the VP latent (DDIM / DDPM / DPM-Solver++ latents, and the
    Euler schedulers' ``scale_model_input`` output ``x/√(σ²+1)``), so ``x_VE = x_in·√(σ²+1)`` with
    ``σ = σ(t)`` from the scheduler's training ``ā`` (for fractional ``t``: ``interpolation="log"`` when the
    scheduler uses Karras σ's, whose timesteps are found by log-σ interpolation, else ``"linear"``). The output is
    ``ε = (x_VE − x̂0)/σ``, ``x̂0`` or ``v = α·ε − σ_VP·x̂0`` (``α = 1/√(σ²+1)``, ``σ_VP = σ·α``) for the
    ``prediction_type`` (default: the scheduler's).
    """
    if not callable(denoise):
        raise TypeError(f"epsilon_model: denoise must be a callable (x, sigma) -> x0; got {type(denoise).__name__}")
    sig = train_sigmas(scheduler)
    cfg = getattr(scheduler, "config", None)
    pt = prediction_type or (cfg.get("prediction_type", "epsilon") if cfg is not None else "epsilon")
    if interpolation == "auto":
        interpolation = "log" if cfg is not None and cfg.get("use_karras_sigmas") else "linear"
    if interpolation not in ("linear", "log"):
        raise ValueError(f"epsilon_model: interpolation must be 'auto', 'linear' or 'log'; got {interpolation!r}")
    if pt not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"epsilon_model: prediction_type must be epsilon, sample or v_prediction; got {pt!r}")

    def model(x_in: torch.Tensor, t) -> torch.Tensor:
        B = x_in.shape[0]
        s = sigma_at(t, sig, interpolation)
        s = s.expand(B) if s.dim() == 0 else s
        col = s.to(device=x_in.device, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.dim() - 1)))
        x = vp_to_ve(x_in, s)
        x0 = denoise(x, s.to(x_in.device))
        if pt == "sample":
            return x0
        eps = (x - x0) / col
        if pt == "epsilon":
            return eps
        alpha = 1 / (col**2 + 1).sqrt()
        return alpha * eps - col * alpha * x0

    return model
