"""DDIM (Song et al. 2021) sampling and DDIM inversion on the fused ``distkern`` step op."""
from __future__ import annotations

import numpy as np
import torch

from ..ops.diffusion import ddim_step
from . import _schedule
from ._base import SchedulerBase, register_config
from .ddpm import _discrete_timesteps

__all__ = ["DDIMScheduler", "DDIMInverseScheduler"]


class DDIMScheduler(SchedulerBase):
    r"""Denoising diffusion implicit model sampler, a drop-in for diffusers' ``DDIMScheduler`` (same constructor
    arguments and defaults, same results to ~1e-6), whose step is one fused kernel.

    Constructor arguments are diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``
    (``linear`` / ``scaled_linear`` / ``squaredcos_cap_v2``), ``trained_betas``, ``clip_sample``,
    ``set_alpha_to_one``, ``steps_offset``, ``prediction_type`` (``epsilon`` / ``v_prediction`` / ``sample``),
    ``thresholding``, ``dynamic_thresholding_ratio``, ``clip_sample_range``, ``sample_max_value``,
    ``timestep_spacing`` (``linspace`` / ``leading`` / ``trailing``), ``rescale_betas_zero_snr``.

    As in diffusers, the step from ``t`` lands on ``t − num_train_timesteps // num_inference_steps`` whatever the
    spacing (``ā`` of a negative timestep is ``final_alpha_cumprod``). ``timestep`` may be a ``(B,)`` tensor of
    per-sample timesteps.
    """

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._register(locals())
        _schedule.check_choice(self._name, "timestep_spacing", timestep_spacing, _schedule.TIMESTEP_SPACINGS)
        self._init_alphas()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final64 = 1.0 if set_alpha_to_one else float(self._ac64[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Returns ``sample`` (``(B, ...)``) unchanged; DDIM does not scale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set the ``(n,)`` int64 inference timesteps (``self.timesteps``, on ``device``), spaced by
        ``config.timestep_spacing``. (diffusers' DDIM takes no custom timesteps either.)"""
        n_train = int(self.config.num_train_timesteps)
        n = self._check_num_steps(self._name, num_inference_steps, n_train)
        ts = _discrete_timesteps(self._name, self.config.timestep_spacing, n_train, n, int(self.config.steps_offset))
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(ts).to(device)
        self._dev = {}

    def _alphas(self, host, per):
        """``(ā_t, ā_prev)`` as floats (host timestep) or ``(B,)`` float64 tensors (per-sample timesteps)."""
        ratio = int(self.config.num_train_timesteps) // self.num_inference_steps
        if per is None:
            prev = host - ratio
            return float(self._ac64[host]), (float(self._ac64[prev]) if prev >= 0 else self._final64)
        ac = self._on("ac", self._ac64, per.device)
        prev = per - ratio
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(ac[per], self._final64))
        return ac[per], alpha_prev

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        r"""One DDIM step from ``timestep`` to ``timestep − num_train_timesteps // num_inference_steps``.

        Args:
            model_output: ``(B, ...)`` the model's output at ``(sample, timestep)``.
            timestep: an int / 0-dim tensor, or a ``(B,)`` tensor of per-sample timesteps (tensor lookups on its
                device, no host sync).
            sample: ``(B, ...)`` the current noisy sample.
            eta: the DDIM noise weight ``η ≥ 0`` (0: deterministic DDIM, 1: DDPM-like).
            use_clipped_model_output: recompute ε from the clipped / thresholded ``x̂0`` (diffusers' option).
            generator: a ``torch.Generator`` (or list of ``B``) drawing the noise exactly as diffusers does.
            variance_noise: ``(B, ...)`` noise to use instead (not together with ``generator``).
            return_dict: return a :class:`SchedulerOutput` (else ``(prev_sample, pred_original_sample)``).

        With ``eta > 0`` and neither ``generator`` nor ``variance_noise``, the noise is the scheduler's in-kernel
        counter-based noise (:meth:`set_noise_seed`).

        Returns: :class:`SchedulerOutput` with ``prev_sample`` and ``pred_original_sample``, both ``(B, ...)``.
        """
        self._require_timesteps()
        model_output, sample = self._check_pair(model_output, sample)
        eta = float(eta)
        if not eta >= 0:
            raise ValueError(f"{self._name}.step: eta must be ≥ 0; got {eta}")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError(f"{self._name}.step: give generator or variance_noise, not both")
        host, per = self._timestep(timestep, sample.shape[0])
        alpha_t, alpha_prev = self._alphas(host, per)
        if per is None:
            self._check_alpha(alpha_t)
        cfg = self.config
        noise_kw = self._noise_kwargs(model_output, sample, needed=eta > 0, generator=generator,
                                      variance_noise=variance_noise)
        if cfg.thresholding:
            clip = {"thresholding": (float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value))}
        else:
            clip = {"clip_sample": float(cfg.clip_sample_range) if cfg.clip_sample else None}
        prev, x0 = ddim_step(model_output, sample, alpha_t, alpha_prev, eta=eta, prediction_type=cfg.prediction_type,
                             use_clipped_model_output=bool(use_clipped_model_output), **clip, **noise_kw)
        self._noise_offset += 1
        return self._output(prev, x0, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process ``√ā_t·x0 + √(1−ā_t)·noise``: ``original_samples``, ``noise`` ``(B, ...)``,
        ``timesteps`` ``(B,)`` ints (or one int). Returns ``(B, ...)`` in the samples' dtype."""
        return self._vp_add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target ``√ā_t·noise − √(1−ā_t)·sample`` (``(B, ...)``)."""
        return self._vp_velocity(sample, noise, timesteps)


class DDIMInverseScheduler(SchedulerBase):
    r"""DDIM inversion (data → noise along the deterministic DDIM path), a drop-in for diffusers'
    ``DDIMInverseScheduler`` (same constructor arguments and defaults, same results), one fused kernel per step.

    Constructor arguments are diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``clip_sample``, ``set_alpha_to_one``, ``steps_offset``,
    ``prediction_type``, ``clip_sample_range``, ``timestep_spacing`` (``leading`` / ``trailing``),
    ``rescale_betas_zero_snr`` (and the deprecated ``set_alpha_to_zero``, read as ``set_alpha_to_one``).

    ``timesteps`` ascend. As in diffusers, stepping at ``t`` goes from the noise level of
    ``min(t − ratio, N − 1)`` (``initial_alpha_cumprod`` when negative) to that of ``t``; ``x̂0`` is clipped when
    ``clip_sample`` but ε is the model's. ``timestep`` may be a ``(B,)`` tensor of per-sample timesteps.
    """

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, **kwargs):
        if kwargs.get("set_alpha_to_zero") is not None:  # diffusers' deprecated alias
            set_alpha_to_one = kwargs.pop("set_alpha_to_zero")
            self._given_args = self._given_args | {"set_alpha_to_one"}
        if kwargs:
            raise TypeError(f"DDIMInverseScheduler: unexpected argument(s) {sorted(kwargs)}")
        self._register(locals())
        _schedule.check_choice(self._name, "timestep_spacing", timestep_spacing, ("leading", "trailing"))
        self._init_alphas()
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._initial64 = 1.0 if set_alpha_to_one else float(self._ac64[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps).copy().astype(np.int64))

    @classmethod
    def _translate_legacy(cls, cfg: dict) -> dict:
        if cfg.get("set_alpha_to_zero") is not None:
            cfg = dict(cfg)
            cfg["set_alpha_to_one"] = cfg.pop("set_alpha_to_zero")
        return cfg

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Returns ``sample`` (``(B, ...)``) unchanged."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set the ``(n,)`` int64 ascending inference timesteps (``leading`` or ``trailing`` spacing)."""
        n_train = int(self.config.num_train_timesteps)
        n = self._check_num_steps(self._name, num_inference_steps, n_train)
        if self.config.timestep_spacing == "leading":
            ratio = n_train // n
            ts = (np.arange(0, n) * ratio).round().copy().astype(np.int64) + int(self.config.steps_offset)
        else:
            ratio = n_train / n
            ts = np.round(np.arange(n_train, 0, -ratio)[::-1]).astype(np.int64) - 1
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(ts).to(device)
        self._dev = {}

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        r"""One inversion step, to the noise level of ``timestep``.

        Args:
            model_output: ``(B, ...)`` the model's output at ``(sample, timestep)``.
            timestep: an int / 0-dim tensor, or a ``(B,)`` tensor of per-sample timesteps.
            sample: ``(B, ...)`` the current (less noisy) sample.
            return_dict: return a :class:`SchedulerOutput` (else ``(prev_sample, pred_original_sample)``).

        Returns: :class:`SchedulerOutput`: ``prev_sample`` ``(B, ...)`` the noisier sample, and
        ``pred_original_sample`` ``(B, ...)``.
        """
        self._require_timesteps()
        model_output, sample = self._check_pair(model_output, sample)
        n_train = int(self.config.num_train_timesteps)
        ratio = n_train // self.num_inference_steps
        host, per = self._timestep(timestep, sample.shape[0])
        if per is None:
            cur = min(host - ratio, n_train - 1)
            alpha_t = float(self._ac64[cur]) if cur >= 0 else self._initial64
            alpha_next = float(self._ac64[host])
            self._check_alpha(alpha_t)
        else:
            ac = self._on("ac", self._ac64, per.device)
            cur = (per - ratio).clamp(max=n_train - 1)
            alpha_next = ac[per]
            alpha_t = torch.where(cur >= 0, ac[cur.clamp(min=0)], torch.full_like(alpha_next, self._initial64))
        cfg = self.config
        clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
        prev, x0 = ddim_step(model_output, sample, alpha_t, alpha_next, eta=0.0, prediction_type=cfg.prediction_type,
                             clip_sample=clip)
        return self._output(prev, x0, return_dict)
