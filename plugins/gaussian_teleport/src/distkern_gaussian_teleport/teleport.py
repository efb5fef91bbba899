r"""``gaussian-teleport``: analytical teleportation (Wang & Vastola, "The Unreasonable Effectiveness of Gaussian
Score Approximation for Diffusion Models and its Applications", TMLR 2024; code:
github.com/Animadversio/GaussianTeleportationDiffusion) as a distkern sampler.

At high noise the score of the data is close to that of a Gaussian fitted to the data, and the probability-flow ODE
of a Gaussian ``N(μ, U diag(λ) Uᵀ)`` has a closed-form solution. So the first part of sampling can be skipped: the
initial noise ``x_T`` at ``σ_T`` is moved along the Gaussian's flow to ``σ_skip`` at no model cost
(:func:`distkern.ops.diffusion.gaussian_teleport`), and a usual sampler continues from there. In VE form
(``x = x0 + σ·ε``)::

    x(σ_skip) = μ + U diag(√((σ_skip² + λ)/(σ_T² + λ))) Uᵀ(x_T − μ) + (σ_skip/σ_T)·(I − UUᵀ)(x_T − μ)

The paper's scripts continue with EDM's Heun sampler on a Karras σ grid starting at ``σ_skip``; here any
:mod:`distkern.diffusion` scheduler continues, on the tail of its own schedule (see :class:`GaussianTeleport`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

import distkern
from distkern.io import check_device
from distkern.ops.diffusion import LowRankGaussian, fit_lowrank_gaussian, gaussian_denoise, gaussian_teleport

from .convert import epsilon_model, train_sigmas, ve_to_vp, vp_to_ve

__all__ = ["GaussianTeleport", "LATENT_CONVENTIONS", "detect_latent_convention", "schedule_sigmas"]

LATENT_CONVENTIONS = ("ve", "vp")
# schedulers whose latents are x0 + σ·ε (k-diffusion / EDM style); the others with an ``alphas_cumprod`` are VP
_VE_SCHEDULERS = frozenset({"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                            "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                            "DPMSolverSDEScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})
_FORMAT_VERSION = 1


def detect_latent_convention(scheduler) -> str:
    """``"ve"`` for the Euler-type schedulers (latents ``x0 + σ·ε``), ``"vp"`` for DDIM / DDPM / DPM-Solver++
    (latents ``√ā·x0 + √(1−ā)·ε``)."""
    if type(scheduler).__name__ in _VE_SCHEDULERS:
        return "ve"
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "vp"
    raise TypeError(f"gaussian-teleport: cannot tell the latent convention of {type(scheduler).__name__}; pass "
                    "latent_convention='ve' or 'vp'")


def schedule_sigmas(scheduler) -> np.ndarray:
    """``(n,)`` float64 VE noise level of each of ``scheduler.timesteps`` (after ``set_timesteps``): its
    ``sigmas[:n]`` when it keeps ``n + 1`` of them (Euler, DPM-Solver++), else ``√((1−ā_t)/ā_t)`` (DDIM, DDPM)."""
    ts = scheduler.timesteps
    n = len(ts)
    sig = getattr(scheduler, "sigmas", None)
    if sig is not None and len(sig) == n + 1:
        sig = sig.detach().cpu().double().numpy() if isinstance(sig, torch.Tensor) else np.asarray(sig, np.float64)
        return sig[:n].copy()
    idx = ts.detach().cpu().numpy() if isinstance(ts, torch.Tensor) else np.asarray(ts)
    if np.any(idx != np.round(idx)):
        return np.interp(idx.astype(np.float64), np.arange(len(train_sigmas(scheduler))), train_sigmas(scheduler))
    return train_sigmas(scheduler)[idx.astype(np.int64)]


def _as_gaussian(g) -> LowRankGaussian:
    if isinstance(g, LowRankGaussian):
        mean, U, lam = g
    elif isinstance(g, Mapping):
        mean, U, lam = g["mean"], g["U"], g["lam"]
    elif isinstance(g, Sequence) and len(g) == 3:
        mean, U, lam = g
    else:
        raise TypeError("gaussian-teleport: gaussian must be a LowRankGaussian, a (mean, U, lam) triple or a dict "
                        f"with mean, U, lam; got {type(g).__name__}")
    if not all(isinstance(t, torch.Tensor) for t in (mean, U, lam)):
        raise TypeError("gaussian-teleport: mean, U and lam must be tensors")
    mean = mean.reshape(-1)
    if U.dim() != 2 or U.shape[0] != mean.numel() or lam.dim() != 1 or lam.shape[0] != U.shape[1]:
        raise ValueError("gaussian-teleport: the Gaussian must be mean (D,), U (D, r), lam (r,); got "
                         f"{tuple(mean.shape)}, {tuple(U.shape)}, {tuple(lam.shape)}")
    if not bool(((lam >= 0) & torch.isfinite(lam)).all()):
        raise ValueError("gaussian-teleport: the variances lam must be finite and ≥ 0")
    if not bool(torch.isfinite(mean).all() and torch.isfinite(U).all()):
        raise ValueError("gaussian-teleport: mean and U must be finite")
    return LowRankGaussian(mean.detach(), U.detach(), lam.detach())


def _flat_batches(batches):
    """``(B, D)`` batches from an iterable of ``(B, ...)`` tensors or ``(x, y, ...)`` tuples (a DataLoader)."""
    for b in batches:
        if isinstance(b, (tuple, list)):
            b = b[0]
        if not isinstance(b, torch.Tensor) or b.dim() < 1:
            raise TypeError("gaussian-teleport.fit: a data batch must be a (B, ...) tensor or an (x, y) pair; got "
                            f"{type(b).__name__}")
        yield b.reshape(b.shape[0], -1)


def _output_tensor(out, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError("gaussian-teleport: the denoiser must return a tensor (or an object with .sample, or a "
                        f"tuple); got {type(out).__name__}")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"gaussian-teleport: the denoiser returned shape {tuple(out.shape)} for a sample of shape "
                         f"{tuple(like.shape)}")
    return out


class GaussianTeleport:
    r"""Analytical teleportation followed by a usual sampler.

    Args:
        scheduler: a :mod:`distkern.diffusion` scheduler (``EulerDiscreteScheduler``,
            ``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ``DDIMScheduler``,
            ``DDPMScheduler``; default ``EulerDiscreteScheduler()``).
        gaussian: the Gaussian ``(mean (D,), U (D, r), lam (r,))`` of the data (a
            :class:`~distkern.ops.diffusion.LowRankGaussian`), or ``None`` and :meth:`fit` it.
        skip_fraction: the fraction of a full schedule's steps replaced by the teleport: ``set_timesteps(n)`` sets
            the scheduler's ``N = round(n / (1 − skip_fraction))``-step schedule and keeps its last ``n`` steps.
            In ``[0, 1)``; 0 is the plain sampler. Default 0.3 when ``sigma_skip`` is not given either.
        sigma_skip: instead, the VE noise level to teleport to: ``N`` is the smallest step count whose schedule has
            ``n`` steps at ``σ ≤ sigma_skip``, of which the last ``n`` are kept (the teleport goes to the first kept
            step's σ, the largest schedule σ ≤ ``sigma_skip``). Must lie inside the scheduler's training σ range.
        latent_convention: ``"auto"`` (from the scheduler's type), ``"ve"`` or ``"vp"``.

    **Latent conventions.** :meth:`teleport` takes and returns latents in the scheduler's own convention. VE
    (Euler-type schedulers): ``x = x0 + σ·ε``, teleported as is. VP (DDIM, DDPM, DPM-Solver++):
    ``x_t = √ā·x0 + √(1−ā)·ε`` is ``x_VE/√(σ²+1)`` at ``σ = √((1−ā)/ā)``, so the teleport is
    ``ve_to_vp(gaussian_teleport(vp_to_ve(x_T, σ_T), σ_T, σ_skip), σ_skip)``. ``σ_T`` is the noise level of the
    full schedule's first step (:attr:`sigma_from`), ``σ_skip`` that of the first kept step (:attr:`sigma_to`).

    The sampler contract: :meth:`set_timesteps` (the remaining schedule), :attr:`timesteps` (its timesteps),
    :meth:`step` and :meth:`scale_model_input` (the wrapped scheduler's; the first kept step is the scheduler's
    begin index), :attr:`init_noise_sigma`. The whole loop: :meth:`sample`.
    """

    name = "gaussian-teleport"
    kind = "sampler"
    distkern_api = distkern.methods.API_VERSION

    def __init__(self, scheduler=None, gaussian=None, *, skip_fraction: float | None = None,
                 sigma_skip: float | None = None, latent_convention: str = "auto"):
        if scheduler is None:
            from distkern.diffusion import EulerDiscreteScheduler

            scheduler = EulerDiscreteScheduler()
        if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step") and hasattr(scheduler, "timesteps")):
            raise TypeError("gaussian-teleport: scheduler must be a scheduler object (set_timesteps, timesteps, step), "
                            f"e.g. distkern.diffusion.EulerDiscreteScheduler(); got {type(scheduler).__name__}")
        self.scheduler = scheduler
        if latent_convention == "auto":
            latent_convention = detect_latent_convention(scheduler)
        elif latent_convention not in LATENT_CONVENTIONS:
            raise ValueError(f"gaussian-teleport: latent_convention must be 'auto', 've' or 'vp'; got "
                             f"{latent_convention!r}")
        self.latent_convention = latent_convention
        if skip_fraction is not None and sigma_skip is not None:
            raise ValueError("gaussian-teleport: give skip_fraction or sigma_skip, not both")
        if sigma_skip is None:
            f = 0.3 if skip_fraction is None else skip_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) < 1.0:
                raise ValueError(f"gaussian-teleport: skip_fraction must lie in [0, 1); got {f!r}")
            self.skip_fraction, self.sigma_skip = float(f), None
        else:
            s = float(sigma_skip)
            lo, hi = self._train_range()
            if not (math.isfinite(s) and lo < s < hi):
                raise ValueError(f"gaussian-teleport: sigma_skip = {sigma_skip} lies outside the scheduler's noise "
                                 f"levels ({lo:.4g}, {hi:.4g}): nothing to teleport to")
            self.skip_fraction, self.sigma_skip = None, s
        self._gaussian: LowRankGaussian | None = None
        self._cast: dict = {}
        if gaussian is not None:
            self.gaussian = gaussian
        self.num_inference_steps: int | None = None
        self.full_num_inference_steps: int | None = None
        self.begin_index = 0
        self.sigma_from: float | None = None
        self.sigma_to: float | None = None
        self.nfe = 0

    def _train_range(self) -> tuple[float, float]:
        sig = train_sigmas(self.scheduler)
        return float(sig.min()), float(sig.max())

    # ------------------------------------------------------------------ the Gaussian
    @property
    def gaussian(self) -> LowRankGaussian | None:
        """The fitted ``LowRankGaussian(mean (D,), U (D, r), lam (r,))`` (``None`` before :meth:`fit`)."""
        return self._gaussian

    @gaussian.setter
    def gaussian(self, g) -> None:
        self._gaussian = None if g is None else _as_gaussian(g)
        self._cast = {}

    def fit(self, data, rank: int | None = None, *, energy: float | None = None, min_variance: float = 0.0,
            progress: bool = False) -> "GaussianTeleport":
        """Fit the Gaussian to training data in the model's data space (VE ``x0``): a ``(N, ...)`` tensor (samples
        flattened to ``D`` features), an iterable of such batches or of ``(x, y)`` pairs (a DataLoader, streamed
        in float64), keeping ``rank`` leading directions or the fewest that explain ``energy`` of the variance
        (:func:`distkern.ops.diffusion.fit_lowrank_gaussian`). Returns ``self``."""
        if isinstance(data, torch.Tensor):
            if data.dim() < 2 or data.shape[0] < 2:
                raise ValueError(f"gaussian-teleport.fit: data must be (N, ...) with N ≥ 2 samples; got "
                                 f"{tuple(data.shape)}")
        elif not hasattr(data, "update"):  # an iterable of batches (not a fitted GaussianStats)
            data = _flat_batches(data)
        self.gaussian = fit_lowrank_gaussian(data, rank, energy=energy, min_variance=min_variance, progress=progress,
                                             dtype=torch.float64)
        return self

    def _require_gaussian(self, what: str) -> LowRankGaussian:
        if self._gaussian is None:
            raise RuntimeError(f"gaussian-teleport.{what}: no Gaussian: call fit(data) first or pass gaussian=")
        return self._gaussian

    def _gaussian_like(self, x: torch.Tensor) -> LowRankGaussian:
        g = self._require_gaussian("teleport")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        key = (x.device, dtype)
        hit = self._cast.get(key)
        if hit is None:
            hit = self._cast[key] = g.to(device=x.device, dtype=dtype)
        return hit

    @property
    def dim(self) -> int | None:
        """The number of features ``D`` per sample of the fitted Gaussian."""
        return None if self._gaussian is None else int(self._gaussian.mean.numel())

    def to(self, device) -> "GaussianTeleport":
        device = check_device(device, self.name)
        if self._gaussian is not None:
            self._gaussian = self._gaussian.to(device)
            self._cast = {}
        return self

    def denoiser(self, prediction_type: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The Gaussian score approximation itself as a diffusers-style model ``(x_in, t) -> model_output`` for
        the scheduler (the optimal denoiser of the fitted Gaussian, :func:`distkern.ops.diffusion.gaussian_denoise`)."""
        g = self._require_gaussian("denoiser")

        def denoise(x, sigma):
            return gaussian_denoise(x, sigma.to(x.dtype), g.to(device=x.device, dtype=x.dtype))

        return epsilon_model(denoise, self.scheduler, prediction_type)

    # ------------------------------------------------------------------ the schedule
    def _n_train(self) -> int:
        return int(self.scheduler.config["num_train_timesteps"])

    def _full_steps(self, n: int) -> int:
        n_train = self._n_train()
        if self.sigma_skip is None:
            N = int(round(n / (1.0 - self.skip_fraction)))
            if N > n_train:
                raise ValueError(f"gaussian-teleport.set_timesteps: {n} remaining steps at skip_fraction "
                                 f"{self.skip_fraction} need a {N}-step schedule, more than num_train_timesteps = "
                                 f"{n_train}")
            return max(N, n)
        probe = type(self.scheduler).from_config(self.scheduler.config)
        tol = self.sigma_skip * (1 + 1e-9)
        for N in range(n, n_train + 1):
            probe.set_timesteps(N)
            if int((schedule_sigmas(probe) <= tol).sum()) >= n:
                return N
        raise ValueError(f"gaussian-teleport.set_timesteps: no schedule of ≤ {n_train} steps has {n} steps at "
                         f"σ ≤ sigma_skip = {self.sigma_skip:.4g}; use fewer steps or a larger sigma_skip")

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the remaining schedule: ``num_inference_steps`` (``n``) scheduler steps after the teleport.

        Sets the wrapped scheduler's ``N``-step schedule (see ``skip_fraction`` / ``sigma_skip``), its begin index
        to ``N − n`` when it has one, and :attr:`sigma_from` / :attr:`sigma_to` (VE σ of the first step of the
        full schedule and of the first kept step)."""
        n = num_inference_steps
        if n is None or isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ValueError(f"gaussian-teleport.set_timesteps: num_inference_steps must be a positive int; got {n!r}")
        n = int(n)
        N = self._full_steps(n)
        self.scheduler.set_timesteps(N, device=device)
        sig = schedule_sigmas(self.scheduler)
        k = len(sig) - n
        if k < 0:
            raise ValueError(f"gaussian-teleport.set_timesteps: the scheduler set {len(sig)} steps for {N} asked")
        if k > 0:
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(k)
        self.num_inference_steps, self.full_num_inference_steps, self.begin_index = n, N, k
        self.sigma_from, self.sigma_to = float(sig[0]), float(sig[k])

    def _require_timesteps(self, what: str) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"gaussian-teleport.{what}: call set_timesteps(num_inference_steps) first")

    @property
    def timesteps(self) -> torch.Tensor:
        """The ``(n,)`` timesteps of the remaining schedule (the tail of the scheduler's)."""
        return self.scheduler.timesteps[self.begin_index:]

    @property
    def init_noise_sigma(self) -> float:
        """The scheduler's initial-noise scale (``x_T = randn·init_noise_sigma``, as a diffusers pipeline draws it)."""
        return float(self.scheduler.init_noise_sigma)

    @property
    def config(self):
        return self.scheduler.config

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs):
        """The wrapped scheduler's step (returns its output, ``.prev_sample``)."""
        return self.scheduler.step(model_output, timestep, sample, **kwargs)

    # ------------------------------------------------------------------ teleport and sample
    def teleport(self, x_T: torch.Tensor, sigma_from: float | None = None, sigma_to: float | None = None
                 ) -> torch.Tensor:
        """Move ``x_T`` (``(B, ...)``, ``D`` features per sample, in the scheduler's latent convention) along the
        Gaussian's probability-flow ODE from ``sigma_from`` (default :attr:`sigma_from`) to ``sigma_to`` (default
        :attr:`sigma_to`, the first kept step's level), in closed form. Returns the latent there, same convention,
        shape and dtype. σ's are VE noise levels (for VP schedulers ``σ = √((1−ā)/ā)``)."""
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"gaussian-teleport.teleport: x_T must be a tensor; got {type(x_T).__name__}")
        g = self._require_gaussian("teleport")
        if sigma_from is None or sigma_to is None:
            self._require_timesteps("teleport")
        s_from = float(self.sigma_from if sigma_from is None else sigma_from)
        s_to = float(self.sigma_to if sigma_to is None else sigma_to)
        if not (s_from > 0 and math.isfinite(s_from) and s_to >= 0 and math.isfinite(s_to)):
            raise ValueError(f"gaussian-teleport.teleport: noise levels must be finite, sigma_from > 0, sigma_to ≥ 0; "
                             f"got {s_from}, {s_to}")
        if x_T.dim() < 2 or x_T[0].numel() != g.mean.numel():
            raise ValueError(f"gaussian-teleport.teleport: x_T must be (B, ...) with the Gaussian's D = "
                             f"{g.mean.numel()} features per sample; got shape {tuple(x_T.shape)}")
        if s_from == s_to:
            return x_T
        gl = self._gaussian_like(x_T)
        x = x_T if x_T.dtype in (torch.float32, torch.float64) else x_T.float()
        if self.latent_convention == "vp":
            y = ve_to_vp(gaussian_teleport(vp_to_ve(x, s_from), s_from, s_to, gl), s_to)
        else:
            y = gaussian_teleport(x, s_from, s_to, gl)
        return y.to(x_T.dtype)

    def sample(self, denoiser: Callable, latents, num_inference_steps: int | None = None, *, generator=None,
               dtype: torch.dtype = torch.float32, device=None, progress: bool = False,
               callback: Callable | None = None) -> torch.Tensor:
        """Teleport, then run the remaining ``num_inference_steps`` scheduler steps with ``denoiser``.

        Args:
            denoiser: a diffusers-style model ``(model_input, t) -> model_output`` (the scheduler's
                ``prediction_type``; a tensor, an object with ``.sample`` or a tuple).
            latents: the initial noise ``(B, ...)`` in the scheduler's convention (as a pipeline draws it:
                ``randn·init_noise_sigma``), or a shape to draw it (with ``generator``, ``dtype``, ``device``).
            num_inference_steps: the model evaluations after the teleport (default: the schedule already set).
            generator: for the initial noise and the scheduler's noise (ancestral / DDPM / SDE steps).
            progress: a tqdm bar when tqdm is installed. ``callback(i, t, latents)`` after each step.

        Returns the final ``(B, ...)`` sample; :attr:`nfe` holds the number of model calls.
        """
        if not callable(denoiser):
            raise TypeError(f"gaussian-teleport.sample: denoiser must be a callable (x, t) -> model_output; got "
                            f"{type(denoiser).__name__}")
        n = num_inference_steps if num_inference_steps is not None else self.num_inference_steps
        if n is None:
            raise ValueError("gaussian-teleport.sample: give num_inference_steps (or call set_timesteps first)")
        if isinstance(latents, torch.Tensor):
            x = latents
            device = x.device
        elif isinstance(latents, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in latents):
            x = None
        else:
            raise TypeError("gaussian-teleport.sample: latents must be a tensor or a shape (tuple of ints); got "
                            f"{type(latents).__name__}")
        self.set_timesteps(n, device=device)  # also resets the scheduler's step counter and history
        if x is None:
            gen_dev = generator.device if generator is not None else (device or "cpu")
            x = torch.randn(tuple(latents), generator=generator, dtype=dtype, device=gen_dev).to(device or gen_dev)
            x = x * self.init_noise_sigma
        if self.begin_index > 0:
            x = self.teleport(x)
        step_kw = {"generator": generator} if generator is not None else {}
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=self.num_inference_steps, desc="gaussian-teleport", unit="step", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        self.nfe = 0
        for i, t in enumerate(self.timesteps):
            out = _output_tensor(denoiser(self.scheduler.scale_model_input(x, t), t), x)
            self.nfe += 1
            x = self.scheduler.step(out, t, x, **step_kw).prev_sample
            if callback is not None:
                callback(i, t, x)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return x

    __call__ = sample

    # ------------------------------------------------------------------ save / load
    def save(self, path) -> None:
        """Write the fitted Gaussian (``mean``, ``U``, ``lam``) and the configuration (skip, latent convention, the
        scheduler's class and config) as one safetensors file with JSON metadata (no pickle)."""
        from distkern.io import write_model

        g = self._require_gaussian("save")
        sched_cfg = {k: v for k, v in dict(self.scheduler.config).items()}
        try:
            json.dumps(sched_cfg)
        except TypeError:
            sched_cfg = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in sched_cfg.items()}
        config = {"skip_fraction": self.skip_fraction, "sigma_skip": self.sigma_skip,
                  "latent_convention": self.latent_convention,
                  "scheduler": {"class": type(self.scheduler).__name__, "config": sched_cfg}}
        write_model(path, self.name, {"mean": g.mean, "U": g.U, "lam": g.lam}, config=config,
                    fitted={"dim": int(g.mean.numel()), "rank": int(g.lam.numel())}, format_version=_FORMAT_VERSION)

    @classmethod
    def load(cls, path, device="cpu", scheduler=None) -> "GaussianTeleport":
        """Read a file written by :meth:`save`. The scheduler is rebuilt from :mod:`distkern.diffusion` by class
        name and config, unless one is given."""
        from distkern.io import read_model

        config, _fitted, tensors = read_model(path, cls.name, format_version=_FORMAT_VERSION,
                                              package="distkern-gaussian-teleport")
        if scheduler is None:
            import distkern.diffusion as dd

            spec = config.get("scheduler") or {}
            klass = getattr(dd, str(spec.get("class", "")), None)
            if klass is None or not hasattr(klass, "from_config"):
                raise ValueError(f"gaussian-teleport.load: {path!r} names scheduler {spec.get('class')!r}, which "
                                 "distkern.diffusion does not have; pass scheduler=")
            scheduler = klass.from_config(spec.get("config", {}))
        obj = cls(scheduler, LowRankGaussian(tensors["mean"], tensors["U"], tensors["lam"]),
                  skip_fraction=config.get("skip_fraction"), sigma_skip=config.get("sigma_skip"),
                  latent_convention=config.get("latent_convention", "auto"))
        return obj.to(device)

    def __repr__(self) -> str:
        skip = f"sigma_skip={self.sigma_skip}" if self.sigma_skip is not None else f"skip_fraction={self.skip_fraction}"
        return (f"GaussianTeleport({type(self.scheduler).__name__}, {skip}, latent_convention="
                f"{self.latent_convention!r}, dim={self.dim})")
