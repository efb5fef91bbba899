"""Euler (Karras et al. 2022, "Algorithm 2" with churn) and Euler ancestral samplers on the fused step op."""
from __future__ import annotations

import numpy as np
import torch

from ..ops.diffusion import euler_step
from . import _schedule
from ._base import logger, register_config
from ._indexed import IndexedScheduler

__all__ = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]


def _euler_timesteps(owner: str, spacing: str, n_train: int, n: int, steps_offset: int) -> np.ndarray:
    """diffusers' Euler inference timesteps: ``(n,)`` float32, descending."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = n_train / n
        return (np.arange(n_train, 0, -ratio)).round().copy().astype(np.float32) - np.float32(1)
    raise ValueError(f"{owner}: timestep_spacing must be one of {list(_schedule.TIMESTEP_SPACINGS)}; got {spacing!r}")


class _SigmaBase(IndexedScheduler):
    """Shared parts of the two Euler schedulers: the σ schedule, ``init_noise_sigma``, input scaling, add_noise."""

    def _init_sigmas(self) -> None:
        self._init_alphas()
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
            self._ac64 = self.alphas_cumprod.to(torch.float64)
        self._train_sigmas, self._log_train_sigmas = _schedule.train_sigmas(self.alphas_cumprod)  # (N,) ascending
        n_train = int(self.config.num_train_timesteps)
        ts = np.linspace(0, n_train - 1, n_train, dtype=float)[::-1].copy().astype(np.float32)
        sig = np.concatenate([self._train_sigmas[::-1], [0.0]])
        self.num_inference_steps = None
        self._set_schedule(ts, sig, None)
        self.is_scale_input_called = False

    def _continuous_v(self) -> bool:
        return False

    def _set_schedule(self, ts: np.ndarray, sig: np.ndarray, device) -> None:
        if self._continuous_v():  # diffusers: 0.25 · log σ of its float32 σ's, by 0-dim torch ops (bit-identical)
            sig32 = torch.from_numpy(np.asarray(sig[:-1], dtype=np.float32))
            ts = torch.stack([0.25 * v.log() for v in sig32]).numpy() if len(sig32) else np.zeros(0, np.float32)
        self._ts = np.ascontiguousarray(ts, dtype=np.float32)
        self._sig64 = np.ascontiguousarray(sig, dtype=np.float64)
        self._sig64_t = torch.from_numpy(self._sig64)
        self.timesteps = torch.from_numpy(self._ts.copy()).to(device)
        self.sigmas = self._sig64_t.to(torch.float32)  # (n + 1,) float32 on the CPU, as diffusers keeps them
        self._dev = {}
        self._reset_index()

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the initial noise: ``max σ`` (linspace / trailing spacing) or ``√(max σ² + 1)``."""
        top = float(self._sig64.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return top
        return (top**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model input ``sample / √(σ² + 1)`` at ``timestep``.

        ``sample``: ``(B, ...)``; ``timestep``: the current timestep (a number / one-element tensor, which starts
        the step counter like diffusers) or a ``(B,)`` tensor of per-sample timesteps. Returns ``(B, ...)``."""
        if not isinstance(sample, torch.Tensor) or sample.dim() < 1:
            raise ValueError(f"{self._name}.scale_model_input: sample must be a (B, ...) tensor")
        host, per = self._parse_timestep(timestep, sample.shape[0], "scale_model_input",
                                         check_range=not self._continuous_v())
        self.is_scale_input_called = True
        if per is not None:
            sig = self._on("sig", self._sig64_t, per.device)[self._lookup(per, per.device)]
            return sample / self._expand((sig**2 + 1).sqrt().to(device=sample.device, dtype=sample.dtype), sample)
        i = self._current_index(host, "scale_model_input")
        return sample / ((float(self._sig64[i]) ** 2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``original_samples + σ_t·noise`` (``(B, ...)`` each; ``timesteps`` ``(B,)`` values of ``timesteps``, or
        the current / begin step once ``set_begin_index`` was called, as diffusers)."""
        if tuple(noise.shape) != tuple(original_samples.shape):
            raise ValueError(f"{self._name}.add_noise: noise must have the shape of original_samples "
                             f"{tuple(original_samples.shape)}; got {tuple(noise.shape)}")
        dev = original_samples.device
        idx = self._sigma_indices(timesteps, dev, "add_noise")
        sig = self._on("sig", self._sig64_t, dev)[idx].to(original_samples.dtype)
        return original_samples + noise.to(dev) * self._expand(sig, original_samples)

    def _refuse_index(self, timestep) -> None:
        """diffusers' guard: an integer is a loop index (``enumerate(timesteps)``), not one of the schedule's float
        timesteps. Without it ``step(eps, 0, x)`` would take timestep 0, the last step, silently."""
        if isinstance(timestep, (int, np.integer)) or (
                isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"{self._name}.step: got an integer timestep {timestep!r}; pass one of "
                             "scheduler.timesteps (floats), not a loop index such as from enumerate(timesteps)")

    def _finish(self, prev, x0, model_dtype, per, return_dict):
        if per is None:
            self._step_index += 1
        self._noise_offset += 1
        return self._output(prev.to(model_dtype), x0, return_dict)

    def _sigmas_for(self, host, per, what):
        if per is None:
            i = self._current_index(host, what)
            return float(self._sig64[i]), float(self._sig64[i + 1])
        sig = self._on("sig", self._sig64_t, per.device)
        idx = self._lookup(per, per.device)
        return sig[idx], sig[idx + 1]

    def _warn_unscaled(self) -> None:
        if not self.is_scale_input_called:
            logger.warning("%s: call scale_model_input before step (the model input must be sample / sqrt(sigma^2 + "
                           "1))", self._name)


class EulerDiscreteScheduler(_SigmaBase):
    r"""Euler sampler of the probability-flow ODE in σ-space (with optional churn), a drop-in for diffusers'
    ``EulerDiscreteScheduler`` (same constructor arguments and defaults, same results to ~1e-6), one fused kernel
    per step.

    Constructor arguments are diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
    ``trained_betas``, ``prediction_type`` (``epsilon`` / ``v_prediction`` / ``sample``), ``interpolation_type``
    (``linear`` / ``log_linear``), ``use_karras_sigmas``, ``use_exponential_sigmas`` and ``use_beta_sigmas``
    (``True`` raises: not supported), ``sigma_min`` / ``sigma_max`` (Karras range), ``timestep_spacing``,
    ``timestep_type`` (``discrete`` / ``continuous``), ``steps_offset``, ``rescale_betas_zero_snr``,
    ``final_sigmas_type`` (``zero`` / ``sigma_min``).

    Timesteps: as diffusers, the first ``step`` (or ``scale_model_input``) finds its index in ``timesteps``
    (see :class:`IndexedScheduler`); later steps follow the counter. An int timestep is a timestep *value*
    (diffusers refuses ints to catch ``enumerate`` indices; here a value not on the schedule raises).
    **Per-sample timesteps**: a ``(B,)`` tensor makes each sample step from its own timestep's index in
    ``timesteps`` (σ = ``sigmas[i_b]`` → ``sigmas[i_b + 1]``), by tensor ops on its device; the step counter is
    neither used nor advanced. ``step`` before ``set_timesteps`` raises (diffusers would use the training σ's).
    """

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        self._register(locals())
        owner = self._name
        if sum(bool(v) for v in (use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas)) > 1:
            raise ValueError(f"{owner}: only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be "
                             "True")
        for key, value in (("use_exponential_sigmas", use_exponential_sigmas), ("use_beta_sigmas", use_beta_sigmas)):
            if value:
                raise ValueError(f"{owner}: {key}=True is not supported (use use_karras_sigmas or the default σ's)")
        _schedule.check_choice(owner, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        _schedule.check_choice(owner, "timestep_spacing", timestep_spacing, _schedule.TIMESTEP_SPACINGS)
        _schedule.check_choice(owner, "timestep_type", timestep_type, ("discrete", "continuous"))
        _schedule.check_choice(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._init_sigmas()

    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[float] | None = None,
                      sigmas: list[float] | None = None):
        """Set ``timesteps`` (``(n,)`` float32, on ``device``) and ``sigmas`` (``(n + 1,)``).

        Exactly one of ``num_inference_steps`` (spaced by ``config.timestep_spacing``, then interpolated /
        Karras σ's), custom ``timesteps`` (σ's interpolated at them; not with Karras σ's) or custom ``sigmas``
        (``n + 1`` values, the last the final σ; timesteps found from them), as diffusers.
        """
        owner = f"{self._name}.set_timesteps"
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{owner}: give timesteps or sigmas, not both")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError(f"{owner}: give one of num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError(f"{owner}: give only one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError(f"{owner}: custom timesteps cannot be used with use_karras_sigmas=True")
        if timesteps is not None and self._continuous_v():
            raise ValueError(f"{owner}: custom timesteps cannot be used with timestep_type='continuous' and "
                             "prediction_type='v_prediction'")
        if sigmas is not None:
            sig32 = np.asarray(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float32)
            if sig32.ndim != 1 or sig32.size < 2:
                raise ValueError(f"{owner}: sigmas must be a list of n + 1 ≥ 2 noise levels (the last the final one)")
            ts = _schedule.sigma_to_t(sig32[:-1], self._log_train_sigmas)
            sig = sig32.astype(np.float64)
            n = sig.size - 1
        else:
            if timesteps is not None:
                ts = np.asarray(timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps,
                                dtype=np.float32)
                if ts.ndim != 1 or ts.size == 0:
                    raise ValueError(f"{owner}: timesteps must be a non-empty list")
                if np.any(ts < 0) or np.any(ts > n_train - 1):
                    raise ValueError(f"{owner}: timesteps must lie in [0, num_train_timesteps - 1] = "
                                     f"[0, {n_train - 1}]")
                n = ts.size
            else:
                n = self._check_num_steps(self._name, num_inference_steps, n_train)
                ts = _euler_timesteps(self._name, cfg.timestep_spacing, n_train, n, int(cfg.steps_offset))
            if cfg.interpolation_type == "linear":
                sig = np.interp(ts.astype(np.float64), np.arange(n_train), self._train_sigmas)
            else:  # log_linear (diffusers' recipe: n + 1 log-spaced σ's from the largest to the smallest)
                sig = np.exp(np.linspace(np.log(self._train_sigmas[-1]), np.log(self._train_sigmas[0]), n + 1))
            if cfg.use_karras_sigmas:
                lo = cfg.sigma_min if cfg.sigma_min is not None else float(sig[-1])
                hi = cfg.sigma_max if cfg.sigma_max is not None else float(sig[0])
                sig = _schedule.karras_sigmas(float(lo), float(hi), n)
                ts = _schedule.sigma_to_t(sig, self._log_train_sigmas)
            last = self._train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([sig, [last]])
        self.num_inference_steps = n
        self._set_schedule(np.asarray(ts, dtype=np.float64).astype(np.float32), sig, device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        r"""One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            model_output: ``(B, ...)`` the model's output for ``scale_model_input(sample, timestep)``.
            timestep: the current timestep (a value of ``timesteps``, as a number or one-element tensor) or a
                ``(B,)`` tensor of per-sample timesteps.
            sample: ``(B, ...)`` the current sample.
            s_churn, s_tmin, s_tmax, s_noise: churn as diffusers: ``γ = min(s_churn / n, √2 − 1)`` when
                ``s_tmin ≤ σ ≤ s_tmax`` (for per-sample timesteps, each sample's own σ), noise scaled by
                ``s_noise``.
            generator: a ``torch.Generator`` (or list of ``B``) drawing the churn noise exactly as diffusers does.
            return_dict: return a :class:`SchedulerOutput` (else ``(prev_sample, pred_original_sample)``).
            variance_noise: ``(B, ...)`` churn noise to use instead of drawing it (distkern extension).

        Returns: :class:`SchedulerOutput` with ``prev_sample`` (in the model output's dtype, as diffusers) and
        ``pred_original_sample``, both ``(B, ...)``.
        """
        self._require_timesteps()
        self._refuse_index(timestep)
        model_dtype = model_output.dtype if isinstance(model_output, torch.Tensor) else None
        model_output, sample = self._check_pair(model_output, sample)
        host, per = self._parse_timestep(timestep, sample.shape[0], "step", check_range=not self._continuous_v())
        self._warn_unscaled()
        sigma, sigma_next = self._sigmas_for(host, per, "step")
        gamma = 0.0
        if s_churn > 0:
            g0 = min(s_churn / (len(self._sig64) - 1), 2**0.5 - 1)
            if per is not None:  # per-sample σ: the s_tmin / s_tmax gate per sample, as tensor ops (no read-back)
                inside = (sigma >= s_tmin) & (sigma <= s_tmax)
                gamma = inside.to(torch.float64) * g0
            elif s_tmin <= sigma <= s_tmax:
                gamma = g0
        needed = isinstance(gamma, torch.Tensor) or gamma > 0
        noise_kw = self._noise_kwargs(model_output, sample, needed=needed, generator=generator,
                                      variance_noise=variance_noise)
        prev, x0 = euler_step(model_output, sample, sigma, sigma_next, prediction_type=self.config.prediction_type,
                              gamma=gamma, s_noise=float(s_noise), **noise_kw)
        return self._finish(prev, x0, model_dtype, per, return_dict)


class EulerAncestralDiscreteScheduler(_SigmaBase):
    r"""Euler ancestral sampler (Euler step to ``σ_down`` plus fresh noise ``σ_up``), a drop-in for diffusers'
    ``EulerAncestralDiscreteScheduler`` (same constructor arguments and defaults, same results), one fused kernel
    per step.

    Constructor arguments are diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
    ``trained_betas``, ``prediction_type`` (``epsilon`` / ``v_prediction``; also ``sample``, which diffusers
    does not implement), ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``.

    Timesteps, the step counter and per-sample ``(B,)`` timesteps behave as in :class:`EulerDiscreteScheduler`.
    """

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self._register(locals())
        _schedule.check_choice(self._name, "timestep_spacing", timestep_spacing, _schedule.TIMESTEP_SPACINGS)
        self._init_sigmas()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set ``timesteps`` (``(n,)`` float32 on ``device``, spaced by ``config.timestep_spacing``) and the
        ``(n + 1,)`` ``sigmas`` (interpolated, then 0). (diffusers' takes no custom timesteps either.)"""
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        n = self._check_num_steps(self._name, num_inference_steps, n_train)
        ts = _euler_timesteps(self._name, cfg.timestep_spacing, n_train, n, int(cfg.steps_offset))
        sig = np.interp(ts.astype(np.float64), np.arange(n_train), self._train_sigmas)
        self.num_inference_steps = n
        self._set_schedule(ts, np.concatenate([sig, [0.0]]), device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None):
        r"""One ancestral step: ``σ_up = √(σ'²(σ² − σ'²)/σ²)``, ``σ_down = √(σ'² − σ_up²)``,
        ``x' = x + (x − x̂0)/σ·(σ_down − σ) + σ_up·noise``.

        Args:
            model_output: ``(B, ...)`` the model's output for ``scale_model_input(sample, timestep)``.
            timestep: the current timestep (number / one-element tensor) or a ``(B,)`` tensor of per-sample ones.
            sample: ``(B, ...)`` the current sample.
            generator: a ``torch.Generator`` (or list of ``B``) drawing the noise exactly as diffusers does.
            return_dict: return a :class:`SchedulerOutput` (else ``(prev_sample, pred_original_sample)``).
            variance_noise: ``(B, ...)`` noise to use instead of drawing it (distkern extension).

        Without ``generator`` / ``variance_noise`` the noise is the in-kernel noise of :meth:`set_noise_seed`.
        Returns: :class:`SchedulerOutput`, ``prev_sample`` (model output's dtype) and ``pred_original_sample``.
        """
        self._require_timesteps()
        self._refuse_index(timestep)
        model_dtype = model_output.dtype if isinstance(model_output, torch.Tensor) else None
        model_output, sample = self._check_pair(model_output, sample)
        host, per = self._parse_timestep(timestep, sample.shape[0], "step")
        self._warn_unscaled()
        sigma, sigma_next = self._sigmas_for(host, per, "step")
        noise_kw = self._noise_kwargs(model_output, sample, needed=True, generator=generator,
                                      variance_noise=variance_noise)
        prev, x0 = euler_step(model_output, sample, sigma, sigma_next, prediction_type=self.config.prediction_type,
                              ancestral=True, eta=1.0, **noise_kw)
        return self._finish(prev, x0, model_dtype, per, return_dict)
