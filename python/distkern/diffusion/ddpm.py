"""DDPM (Ho et al. 2020) ancestral sampling on the fused ``distkern`` step op."""
from __future__ import annotations

import numpy as np
import torch

from ..ops.diffusion import ddpm_step
from . import _schedule
from ._base import SchedulerBase, logger, register_config

__all__ = ["DDPMScheduler"]

_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def _discrete_timesteps(owner: str, spacing: str, n_train: int, n: int, steps_offset: int) -> np.ndarray:
    """diffusers' DDPM/DDIM inference timesteps (``(n,)`` int64, descending)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = n_train / n
        return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"{owner}: timestep_spacing must be one of {list(_schedule.TIMESTEP_SPACINGS)}; got {spacing!r}")


class DDPMScheduler(SchedulerBase):
    r"""Denoising diffusion probabilistic model sampler, a drop-in for diffusers' ``DDPMScheduler``
    (same constructor arguments and defaults, same results to ~1e-6), whose step is one fused kernel.

    Constructor arguments are diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule`` (``linear`` / ``scaled_linear`` / ``squaredcos_cap_v2`` / ``sigmoid`` / ``laplace``),
    ``trained_betas``, ``variance_type``, ``clip_sample``, ``prediction_type`` (``epsilon`` / ``v_prediction`` /
    ``sample``), ``thresholding``, ``dynamic_thresholding_ratio``, ``clip_sample_range``, ``sample_max_value``,
    ``timestep_spacing`` (``linspace`` / ``leading`` / ``trailing``), ``steps_offset``, ``rescale_betas_zero_snr``.

    Supported ``variance_type``: ``fixed_small``, ``fixed_small_log`` (both ``β̃_t``), ``fixed_large`` (``β_t``)
    and ``fixed_large_log`` (``β_t`` — diffusers 0.42 returns NaN for this one, taking the square root of
    ``log β_t``; we use the variance the name means and log a warning). ``learned`` / ``learned_range`` need the
    model's variance channels and raise ``ValueError``.

    Differences from diffusers: ``step`` before ``set_timesteps`` raises (diffusers falls back to the full
    training schedule); a timestep that is not on the schedule steps to the largest schedule timestep below it
    (diffusers raises ``IndexError``); per-sample ``(B,)`` timesteps are supported.
    """

    _beta_schedules = _schedule.BASE_BETA_SCHEDULES + ("sigmoid", "laplace")

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        self._register(locals())
        _schedule.check_choice(self._name, "variance_type", variance_type, _VARIANCE_TYPES)
        if variance_type in ("learned", "learned_range"):
            raise ValueError(f"{self._name}: variance_type={variance_type!r} (a learned variance read from extra model "
                             "output channels) is not supported; use fixed_small, fixed_small_log, fixed_large or "
                             "fixed_large_log")
        if variance_type == "fixed_large_log":
            logger.warning("%s: variance_type='fixed_large_log' uses the variance beta_t (diffusers 0.42 returns NaN "
                           "for it: it takes the square root of log(beta_t))", self._name)
        _schedule.check_choice(self._name, "timestep_spacing", timestep_spacing, _schedule.TIMESTEP_SPACINGS)
        self._init_alphas()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.variance_type = variance_type
        self._ts = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        self.timesteps = torch.from_numpy(self._ts.copy())

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Returns ``sample`` (``(B, ...)``) unchanged; DDPM does not scale the model input."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """Set the ``(n,)`` int64 inference timesteps (``self.timesteps``, on ``device``).

        Either ``num_inference_steps`` (spaced by ``config.timestep_spacing``) or custom ``timesteps`` (strictly
        descending ints below ``num_train_timesteps``), as diffusers.
        """
        owner = self._name
        n_train = int(self.config.num_train_timesteps)
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{owner}.set_timesteps: give num_inference_steps or timesteps, not both")
        if timesteps is not None:
            ts = np.asarray([int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor)
                                              else timesteps)], dtype=np.int64)
            if ts.size == 0:
                raise ValueError(f"{owner}.set_timesteps: timesteps must not be empty")
            if np.any(ts[1:] >= ts[:-1]):
                raise ValueError(f"{owner}.set_timesteps: custom timesteps must be strictly descending")
            if ts[0] >= n_train or ts[-1] < 0:
                raise ValueError(f"{owner}.set_timesteps: timesteps must lie in [0, num_train_timesteps) = "
                                 f"[0, {n_train})")
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError(f"{owner}.set_timesteps: give num_inference_steps or timesteps")
            n = self._check_num_steps(owner, num_inference_steps, n_train)
            ts = _discrete_timesteps(owner, self.config.timestep_spacing, n_train, n, int(self.config.steps_offset))
            self.custom_timesteps = False
        self._ts = ts
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._dev = {}

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` lands on: the next one of the schedule (``-1`` after the last).

        ``timestep``: int (returns an int) or a tensor (returns a long tensor of its shape, same device)."""
        if isinstance(timestep, torch.Tensor):
            sched = self._on("ts", torch.from_numpy(self._ts), timestep.device)
            t = timestep.long()
            lower = torch.where(sched < t.unsqueeze(-1), sched, torch.full_like(sched, -1))
            return lower.amax(-1)
        lower = self._ts[self._ts < int(timestep)]
        return int(lower.max()) if lower.size else -1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        r"""One DDPM step from ``timestep`` to the previous timestep of the schedule.

        Args:
            model_output: ``(B, ...)`` the model's output at ``(sample, timestep)``.
            timestep: an int / 0-dim tensor (one timestep for the batch) or a ``(B,)`` tensor of per-sample
                timesteps (schedule lookups then stay tensor ops on its device: no host sync).
            sample: ``(B, ...)`` the current noisy sample.
            generator: a ``torch.Generator`` (or list of ``B``) to draw the noise exactly as diffusers does.
            return_dict: return a :class:`SchedulerOutput` (else the tuple ``(prev_sample, pred_original_sample)``).
            variance_noise: ``(B, ...)`` noise to use instead of drawing it (distkern extension).

        Noise is added for ``t > 0`` (per sample). Without ``generator`` / ``variance_noise`` it comes from the
        scheduler's in-kernel noise seed (:meth:`set_noise_seed`).

        Returns: :class:`SchedulerOutput` with ``prev_sample`` and ``pred_original_sample``, both ``(B, ...)``.
        """
        self._require_timesteps()
        model_output, sample = self._check_pair(model_output, sample)
        cfg = self.config
        host, per = self._timestep(timestep, sample.shape[0])
        if per is None:
            prev_t = self.previous_timestep(host)
            alpha_t = float(self._ac64[host])
            alpha_prev = float(self._ac64[prev_t]) if prev_t >= 0 else 1.0
            add_noise = host > 0
            needed = add_noise
            self._check_alpha(alpha_t)
        else:
            ac = self._on("ac", self._ac64, per.device)
            prev_t = self.previous_timestep(per)
            alpha_t = ac[per]
            alpha_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.ones_like(alpha_t))
            add_noise = per > 0
            needed = True
        noise_kw = self._noise_kwargs(model_output, sample, needed=needed, generator=generator,
                                      variance_noise=variance_noise)
        prev, x0 = ddpm_step(model_output, sample, alpha_t, alpha_prev, prediction_type=cfg.prediction_type,
                             variance_type=self.variance_type, add_noise=add_noise, **self._clip_kwargs(), **noise_kw)
        self._noise_offset += 1
        return self._output(prev, x0, return_dict)

    def _clip_kwargs(self) -> dict:
        cfg = self.config
        if cfg.thresholding:
            return {"thresholding": (float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)),
                    "clip_sample": None}
        return {"thresholding": None, "clip_sample": float(cfg.clip_sample_range) if cfg.clip_sample else None}

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process ``√ā_t·x0 + √(1−ā_t)·noise``: ``original_samples``, ``noise`` ``(B, ...)``,
        ``timesteps`` ``(B,)`` ints (or one int). Returns ``(B, ...)`` in the samples' dtype."""
        return self._vp_add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target ``√ā_t·noise − √(1−ā_t)·sample`` (``(B, ...)``)."""
        return self._vp_velocity(sample, noise, timesteps)
