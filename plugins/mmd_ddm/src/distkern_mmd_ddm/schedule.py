"""The DDPM noise schedule and the DDIM timestep subsequence, computed here (no scheduler package needed).

MMD-DDM fine-tunes a denoiser trained with the standard DDPM schedule of Ho et al. (linear betas
``1e-4 … 0.02`` over ``T = 1000`` steps) and samples it with DDIM (Song et al.) on a subsequence of
``num_steps`` of those ``T`` timesteps, as the DDIM code base (``ermongroup/ddim``) that MMD-DDM builds
on: ``"uniform"`` spacing ``t_i = i·⌊T/S⌋`` (``[0, 200, 400, 600, 800]`` for ``S = 5``; equal to
diffusers' ``"leading"`` spacing) or ``"quad"`` spacing ``t_i = ⌊(i·√(0.8T)/(S−1))²⌋``. The chain runs
from the largest timestep down; the last step goes to ``ā = 1`` (the clean sample), as DDIM's
``compute_alpha`` with ``t = −1`` and diffusers' ``set_alpha_to_one=True``.
"""
from __future__ import annotations

import math
import operator

import torch

__all__ = ["ddpm_alphas_cumprod", "ddim_timesteps", "ddim_alpha_pairs", "SPACINGS"]

SPACINGS = ("uniform", "quad", "trailing")


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                        schedule: str = "linear") -> torch.Tensor:
    """``ā_t = Π_{s≤t} (1 − β_s)`` for ``t = 0 … T−1`` as a float64 CPU tensor of shape ``(T,)``.

    ``schedule``: ``"linear"`` (DDPM: β evenly spaced from ``beta_start`` to ``beta_end``) or
    ``"scaled_linear"`` (√β evenly spaced, the latent-diffusion schedule)."""
    if int(num_train_timesteps) < 1:
        raise ValueError(f"mmd-ddm: num_train_timesteps must be >= 1; got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"mmd-ddm: need 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}")
    T = int(num_train_timesteps)
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"mmd-ddm: schedule must be 'linear' or 'scaled_linear'; got {schedule!r}")
    return torch.cumprod(1.0 - betas, 0)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "uniform") -> list[int]:
    """The ``num_steps`` DDIM timesteps, in sampling order (largest first).

    ``"uniform"``: ``i·⌊T/S⌋`` for ``i < S`` (DDIM's ``skip_type="uniform"``, which MMD-DDM uses; when
    ``S`` does not divide ``T`` DDIM's ``range(0, T, skip)`` would give more than ``S`` steps, here always
    exactly ``S``); ``"quad"``: DDIM's ``skip_type="quad"``; ``"trailing"``: ``round(T − i·T/S) − 1``
    (diffusers' ``"trailing"``, which starts at ``T − 1``)."""
    S, T = _check_steps(num_steps, num_train_timesteps)
    if spacing == "uniform":
        ts = [i * (T // S) for i in range(S)]
    elif spacing == "quad":
        ts = [int(v) for v in (torch.linspace(0, math.sqrt(T * 0.8), S, dtype=torch.float64) ** 2).tolist()]
        if len(set(ts)) != S:
            raise ValueError(f"mmd-ddm: quad spacing gives repeated timesteps for num_steps={S}, T={T}; "
                             "use 'uniform' or 'trailing'")
    elif spacing == "trailing":
        ts = sorted({int(round(T - i * T / S)) - 1 for i in range(S)})
    else:
        raise ValueError(f"mmd-ddm: spacing must be one of {SPACINGS}; got {spacing!r}")
    return sorted(ts, reverse=True)


def ddim_alpha_pairs(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> list[tuple[int, float, float]]:
    """``[(t, ā_t, ā_prev), …]`` for each step of the chain, as Python floats (float64); ``ā_prev`` of the
    last step is 1."""
    ac = alphas_cumprod.to(torch.float64).cpu().tolist()
    prev = list(timesteps[1:]) + [-1]
    return [(int(t), ac[t], 1.0 if p < 0 else ac[p]) for t, p in zip(timesteps, prev)]


def _check_steps(num_steps, num_train_timesteps) -> tuple[int, int]:
    try:
        S = operator.index(num_steps) if not isinstance(num_steps, bool) else None
    except TypeError:
        S = None
    if S is None or S < 1:
        raise ValueError(f"mmd-ddm: num_steps must be an int >= 1; got {num_steps!r}")
    T = int(num_train_timesteps)
    if S > T:
        raise ValueError(f"mmd-ddm: num_steps ({S}) must not exceed num_train_timesteps ({T})")
    return S, T
