r"""Noise-schedule arithmetic shared by the schedulers (host side, no device work).

Precision policy (measured, see ``tests/test_schedulers.py``):

* ``betas`` → ``alphas = 1 − β`` → ``alphas_cumprod = cumprod(alphas)`` are computed **exactly as diffusers
  computes them, in float32** (float32 ``torch.linspace`` / cosine table, float32 ``1 − β``, float32 ``cumprod``),
  then widened to float64. This is deliberate: the float32 rounding of ``1 − β`` near ``t = 0``
  (``β ≈ 1e-4``) moves ``1 − ā`` by up to ~3e-4 relative and ``σ = √((1−ā)/ā)`` by up to ~1.5e-4 relative
  (8e-5 measured on the default linear schedule), so an "exact" float64 schedule would *not* reproduce diffusers
  to 1e-5. Downstream of ``ā`` the step arithmetic (DDPM/DDIM coefficients from ``ā``; σ interpolation, Karras
  σ's, λ, α_t, σ_t and the step coefficients of Euler / DPM-Solver) is float64.
* The σ-space schedulers start from diffusers' float32 training table ``σ = √((1−ā)/ā)`` (:func:`train_sigmas`,
  computed in float32 like diffusers, held in float64) and its float32 ``log σ``: the σ → t map of Karras /
  custom σ's then gives diffusers' timesteps bit for bit. This matters: with ``squaredcos_cap_v2`` + Karras σ's
  diffusers maps σ_max to t = 998.99999996 (float32 log table) and truncates it to 998 — a float64 table gives
  999, another timestep for the model and (diffusers then sees 998 six times) another first step index. The σ's
  the steps use stay in float64 (diffusers rounds them to float32 once more: ≤ 6e-8 relative).
* Timesteps are produced with diffusers' exact numpy recipe and dtype (int64 for DDPM/DDIM/DPM, float32 for
  Euler), because they are what the model sees.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BASE_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> torch.Tensor:
    """``(N,)`` float32 betas discretising ``ā(t)`` (``"cosine"``: the squaredcos_cap_v2 schedule, ``"laplace"``)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ValueError(f"alpha_transform_type must be 'cosine' or 'laplace'; got {alpha_transform_type!r}")
    n = num_diffusion_timesteps
    out = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(out, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``(N,)`` betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in the betas' dtype."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(cfg, owner: str, schedules=BASE_BETA_SCHEDULES) -> torch.Tensor:
    """``(N,)`` float32 betas of a scheduler config, bit-identical to diffusers'."""
    n = int(cfg["num_train_timesteps"])
    if n < 1:
        raise ValueError(f"{owner}: num_train_timesteps must be ≥ 1; got {n}")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(np.asarray(cfg["trained_betas"], dtype=np.float64), dtype=torch.float32)
        if betas.dim() != 1 or betas.shape[0] != n:
            raise ValueError(f"{owner}: trained_betas must have num_train_timesteps = {n} entries; got shape "
                             f"{tuple(betas.shape)}")
    else:
        name = cfg["beta_schedule"]
        if name not in schedules:
            raise ValueError(f"{owner}: beta_schedule must be one of {list(schedules)}; got {name!r}")
        bs, be = float(cfg["beta_start"]), float(cfg["beta_end"])
        if name == "linear":
            betas = torch.linspace(bs, be, n, dtype=torch.float32)
        elif name == "scaled_linear":
            betas = torch.linspace(bs**0.5, be**0.5, n, dtype=torch.float32) ** 2
        elif name == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(n)
        elif name == "laplace":
            betas = betas_for_alpha_bar(n, alpha_transform_type="laplace")
        else:  # sigmoid
            betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32)) * (be - bs) + bs
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def train_sigmas(alphas_cumprod32: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' training noise levels: ``(σ, log σ)``, each ``(N,)`` ascending in t, computed in float32 exactly as
    diffusers computes them (``((1 − ā)/ā)**0.5`` in torch, ``np.log`` of the float32 array); σ is returned as
    float64 (holding the float32 values), log σ as the float32 array diffusers' σ → t map uses."""
    sig32 = ((1 - alphas_cumprod32) / alphas_cumprod32) ** 0.5
    arr = sig32.numpy()
    return arr.astype(np.float64), np.log(arr)


def check_choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {list(allowed)}; got {value!r}")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """``(n,)`` float64 Karras et al. (2022) noise levels from ``sigma_max`` down to ``sigma_min``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of noise levels ``sigmas`` (piecewise-linear in ``log σ`` over the
    ``(N,)`` training ``log_sigmas``, ascending in t), as diffusers' ``_sigma_to_t`` (same numpy dtypes, so the
    same float64 results bit for bit)."""
    sigmas = np.asarray(sigmas)  # float64 (Karras) or float32 (custom σ's): numpy's promotion as in diffusers
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)
