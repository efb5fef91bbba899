"""DPM-Solver++ (Lu et al. 2022) multistep sampler, first and second order, ODE and SDE, on the fused step op."""
from __future__ import annotations

import numpy as np
import torch

from ..ops.diffusion import dpmpp_2m_step
from . import _schedule
from ._base import register_config
from ._indexed import IndexedScheduler

__all__ = ["DPMSolverMultistepScheduler"]


class DPMSolverMultistepScheduler(IndexedScheduler):
    r"""DPM-Solver++ multistep sampler (``"DPM++ 2M"`` / ``"DPM++ 2M SDE"``), a drop-in for diffusers'
    ``DPMSolverMultistepScheduler`` (same constructor arguments and defaults, same results to ~1e-6), one fused
    kernel per step (the second-order update reads the previous data prediction in the same kernel).

    Constructor arguments are diffusers'. Supported: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``solver_order`` 1 or 2, ``prediction_type`` (``epsilon`` /
    ``v_prediction`` / ``sample``), ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``,
    ``algorithm_type`` ``dpmsolver++`` / ``sde-dpmsolver++`` (``deis`` is read as ``dpmsolver++``, as diffusers
    does), ``solver_type`` ``midpoint`` / ``heun`` (``logrho`` / ``bh1`` / ``bh2`` read as ``midpoint``),
    ``lower_order_final``, ``euler_at_final``, ``use_karras_sigmas``, ``final_sigmas_type`` (``zero`` /
    ``sigma_min``), ``lambda_min_clipped``, ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``.

    Refused with a ``ValueError`` naming the argument (rather than giving other numbers): ``solver_order=3``,
    ``algorithm_type`` ``dpmsolver`` / ``sde-dpmsolver``, ``variance_type`` ``learned`` / ``learned_range``,
    ``prediction_type="flow_prediction"``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``,
    ``use_flow_sigmas``, ``use_dynamic_shifting`` (and ``set_timesteps(mu=...)``). ``flow_shift`` and
    ``time_shift_type`` only matter for those and are ignored.

    Timesteps: the step counter works as diffusers' (see :class:`IndexedScheduler`; a timestep not on the
    schedule starts at the last step, as diffusers). Per-sample ``(B,)`` timesteps are refused: the multistep
    history (the previous step's data prediction and σ) is one for the whole batch.
    ``step(...).pred_original_sample`` is the data prediction ``x̂0`` of the step (diffusers only keeps it in
    ``model_outputs``; ``return_dict=False`` returns ``(prev_sample,)`` as diffusers).
    """

    @register_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._register(locals())
        owner = self._name
        if sum(bool(v) for v in (use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas)) > 1:
            raise ValueError(f"{owner}: only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be "
                             "True")
        if algorithm_type == "deis":  # diffusers maps it (and records the mapped value)
            self._set_config(algorithm_type="dpmsolver++")
        elif algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(f"{owner}: algorithm_type={algorithm_type!r} (the deprecated noise-prediction DPM-Solver) "
                             "is not supported; use 'dpmsolver++' or 'sde-dpmsolver++'")
        else:
            _schedule.check_choice(owner, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        if solver_type in ("logrho", "bh1", "bh2"):
            self._set_config(solver_type="midpoint")
        else:
            _schedule.check_choice(owner, "solver_type", solver_type, ("midpoint", "heun"))
        if solver_order not in (1, 2) or isinstance(solver_order, bool):
            raise ValueError(f"{owner}: solver_order must be 1 or 2 (third order is not supported); got "
                             f"{solver_order!r}")
        if variance_type is not None:
            raise ValueError(f"{owner}: variance_type={variance_type!r} (learned variances in extra model channels) "
                             "is not supported; leave it None")
        for key, value in (("use_exponential_sigmas", use_exponential_sigmas), ("use_beta_sigmas", use_beta_sigmas),
                           ("use_lu_lambdas", use_lu_lambdas), ("use_flow_sigmas", use_flow_sigmas),
                           ("use_dynamic_shifting", use_dynamic_shifting)):
            if value:
                raise ValueError(f"{owner}: {key}=True is not supported")
        _schedule.check_choice(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _schedule.check_choice(owner, "timestep_spacing", timestep_spacing, _schedule.TIMESTEP_SPACINGS)
        self._init_alphas()
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
            self._ac64 = self.alphas_cumprod.to(torch.float64)
        ac = self._ac64.numpy()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self._train_sigmas, self._log_train_sigmas = _schedule.train_sigmas(self.alphas_cumprod)  # (N,) ascending
        self._lambda64 = 0.5 * np.log(ac) - 0.5 * np.log1p(-ac)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.timesteps = torch.from_numpy(self._ts.copy())
        self._sig64 = self._train_sigmas.copy()
        self.sigmas = torch.from_numpy(self._sig64).to(torch.float32)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        """Set ``timesteps`` (``(n,)`` int64 on ``device``) and ``sigmas`` (``(n + 1,)``), and reset the multistep
        history. Either ``num_inference_steps`` (spaced by ``config.timestep_spacing`` up to the
        ``lambda_min_clipped`` limit, or Karras σ's) or custom ``timesteps`` (not with Karras σ's), as diffusers.
        ``mu`` (dynamic shifting of flow-matching schedules) is not supported.
        """
        owner = f"{self._name}.set_timesteps"
        cfg = self.config
        n_train = int(cfg.num_train_timesteps)
        if mu is not None:
            raise ValueError(f"{owner}: mu (dynamic shifting for flow-matching schedules) is not supported")
        if num_inference_steps is None and timesteps is None:
            raise ValueError(f"{owner}: give num_inference_steps or timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{owner}: give num_inference_steps or timesteps, not both")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError(f"{owner}: custom timesteps cannot be used with use_karras_sigmas=True")
        if timesteps is not None:
            ts = np.asarray(timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps).astype(np.int64)
            if ts.ndim != 1 or ts.size == 0:
                raise ValueError(f"{owner}: timesteps must be a non-empty list of ints")
            if np.any(ts < 0) or np.any(ts >= n_train):
                raise ValueError(f"{owner}: timesteps must lie in [0, num_train_timesteps) = [0, {n_train})")
        else:
            n = self._check_num_steps(self._name, num_inference_steps, n_train)
            clipped = int(np.searchsorted(self._lambda64[::-1], cfg.lambda_min_clipped, side="left"))
            last = n_train - clipped
            if cfg.timestep_spacing == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif cfg.timestep_spacing == "leading":
                ratio = last // (n + 1)
                ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + int(cfg.steps_offset)
            else:
                ratio = n_train / n
                ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
        if cfg.use_karras_sigmas:
            desc = self._train_sigmas[::-1]
            sig = _schedule.karras_sigmas(float(desc[-1]), float(desc[0]), int(num_inference_steps))
            tf = _schedule.sigma_to_t(sig, self._log_train_sigmas)
            if cfg.beta_schedule != "squaredcos_cap_v2":
                tf = tf.round()
            ts = tf.astype(np.int64)
        else:
            sig = np.interp(ts.astype(np.float64), np.arange(n_train), self._train_sigmas)
        last_sigma = self._train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._sig64 = np.concatenate([sig, [last_sigma]]).astype(np.float64)
        self.sigmas = torch.from_numpy(self._sig64).to(torch.float32)
        self._ts = ts.astype(np.int64)
        self.timesteps = torch.from_numpy(self._ts.copy()).to(device)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * int(cfg.solver_order)
        self.lower_order_nums = 0
        self._dev = {}
        self._reset_index()

    _missing = "last"

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Returns ``sample`` (``(B, ...)``) unchanged; DPM-Solver does not scale the model input."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        r"""One DPM-Solver++ step from ``sigmas[i]`` to ``sigmas[i + 1]``: first order at the first step (and at
        the last one when ``lower_order_final`` with < 15 steps, ``euler_at_final`` or ``final_sigmas_type="zero"``),
        else second order ("2M") with the previous step's data prediction, as diffusers.

        Args:
            model_output: ``(B, ...)`` the model's output at ``(sample, timestep)``.
            timestep: the current timestep (a number or one-element tensor; only the first step reads it).
            sample: ``(B, ...)`` the current sample.
            generator: a ``torch.Generator`` (or list of ``B``) drawing the SDE noise exactly as diffusers does
                (float32, then cast to the sample's dtype).
            variance_noise: ``(B, ...)`` SDE noise to use instead of drawing it.
            return_dict: return a :class:`SchedulerOutput` (else ``(prev_sample,)``, as diffusers).

        Returns: :class:`SchedulerOutput`: ``prev_sample`` and ``pred_original_sample`` (the step's data
        prediction), both ``(B, ...)``. ``prev_sample`` has the dtype diffusers gives it, that of its converted data
        prediction: the model output's for ``prediction_type="sample"``, else the promotion of the sample's and the
        model output's (float32 latents stay float32 under a float16 model).
        """
        self._require_timesteps()
        model_dtype = model_output.dtype if isinstance(model_output, torch.Tensor) else None
        model_output, sample = self._check_pair(model_output, sample)
        out_dtype = model_dtype if self.config.prediction_type == "sample" else sample.dtype
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.shape[0] > 1:
            raise ValueError(f"{self._name}.step: per-sample timesteps (a (B,) tensor) are not supported: the "
                             "multistep history is shared by the batch; pass one timestep")
        host, _ = self._parse_timestep(timestep, sample.shape[0], "step")
        i = self._current_index(host, "step")
        cfg = self.config
        n = len(self._ts)
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        first = cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        noise_kw = self._noise_kwargs(model_output, sample, needed=sde, generator=generator,
                                      variance_noise=variance_noise, draw_dtype=torch.float32)
        history = {}
        if not first:
            prev_x0 = self.model_outputs[-1]
            if prev_x0 is None or tuple(prev_x0.shape) != tuple(sample.shape):
                raise ValueError(f"{self._name}.step: the previous step's data prediction is missing or has another "
                                 "shape; call set_timesteps before a new loop")
            history = {"prev_x0": prev_x0.to(sample.dtype), "sigma_prev": float(self._sig64[i - 1])}
        thresholding = ((float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value))
                        if cfg.thresholding else None)
        prev, x0 = dpmpp_2m_step(model_output, sample, float(self._sig64[i]), float(self._sig64[i + 1]),
                                 prediction_type=cfg.prediction_type, solver_type=cfg.solver_type,
                                 algorithm_type=cfg.algorithm_type, thresholding=thresholding, **history, **noise_kw)
        self.model_outputs = self.model_outputs[1:] + [x0]
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        self._noise_offset += 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return self._output(prev, x0, True)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``α_t·x0 + σ_t·noise`` with ``α_t = 1/√(σ²+1)``, ``σ_t = σ·α_t`` at the σ of each timestep
        (``(B, ...)`` samples and noise, ``(B,)`` timesteps of ``timesteps``; the current / begin step once
        ``set_begin_index`` was called, as diffusers)."""
        if tuple(noise.shape) != tuple(original_samples.shape):
            raise ValueError(f"{self._name}.add_noise: noise must have the shape of original_samples "
                             f"{tuple(original_samples.shape)}; got {tuple(noise.shape)}")
        dev, dtype = original_samples.device, original_samples.dtype
        idx = self._sigma_indices(timesteps, dev, "add_noise")
        sig = self._on("sig", torch.from_numpy(self._sig64), dev)[idx]
        alpha = 1 / (sig**2 + 1).sqrt()
        a = self._expand(alpha.to(dtype), original_samples)
        s = self._expand((sig * alpha).to(dtype), original_samples)
        return a * original_samples + s * noise.to(dev)

