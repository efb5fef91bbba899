r"""``w2sd``: Weak-to-Strong Diffusion with Reflection (Bai et al., 2025; code:
github.com/xie-lab-ml/Weak-to-Strong-Diffusion-with-Reflection, ``utils/pipeline_stable_diffusion_xl.py``,
``reflection_operation`` and ``w2sd_lora``) as a distkern sampler on :mod:`distkern.diffusion`'s DDIM schedulers.

Before every denoising step but the last, the latent is *reflected*: one deterministic DDIM step with the strong
model, then one DDIM inversion step with the weak model. The difference between the two models' denoising
directions is thereby added to the latent, steering the sample toward what the strong model prefers over the weak
one (the paper's weak-to-strong difference); then the usual step with the normal model follows. Three model calls
per step, two in the last: ``3n − 2`` for ``n`` steps.

The indexing (``Δ = num_train_timesteps // num_inference_steps``; ``ā(s)`` the scheduler's cumulative α at
timestep ``s``, and ``ā(s < 0)`` its final α: 1 with ``set_alpha_to_one``, else ``ā(0)``). At step ``i``,
``t = timesteps[i]``, ``t⁺ = timesteps[i + 1]`` (``= t − Δ`` with ``"leading"`` spacing)::

    x̃ = DDIM(x,  ε = strong(x, t),        ā(t)     → ā(t − Δ))      # DDIMScheduler.step(ε, t, x)
    official:   ε_w = weak(x̃, t)
                x̂  = DDIMInverse(x̃, ε_w,  ā(t⁺ − Δ) → ā(t⁺))        # DDIMInverseScheduler.step(ε_w, t⁺, x̃)
    consistent: ε_w = weak(x̃, t − Δ)
                x̂  = DDIMInverse(x̃, ε_w,  ā(t − Δ)  → ā(t))         # DDIMInverseScheduler.step(ε_w, t, x̃)
    x ← x + strength·(x̂ − x)
    x ← DDIM(x, ε = model(x, t), ā(t) → ā(t − Δ))                     # the plain step

The official code calls ``inv_scheduler.step(noise_pred, timesteps[i + 1], latents)``, and diffusers'
``DDIMInverseScheduler.step(ε, s, x)`` moves *from* the level of ``s − Δ`` *to* the level of ``s``. With the
default ``"leading"`` spacing that is ``ā(t − 2Δ) → ā(t − Δ)``: the inversion reads ``x̃`` (which lies at
``ā(t − Δ)``) as if it were one step less noisy, and returns a latent at ``ā(t − Δ)``, which the plain step then
treats as lying at ``ā(t)``; and the weak model is asked for its noise at ``t`` although ``x̃`` is at ``t − Δ``.
Both shifts are part of the published method (its results were obtained with them) and are reproduced exactly
by ``indexing="official"`` (the default). ``indexing="consistent"`` is the self-consistent variant: the weak model
is evaluated at ``x̃``'s own level ``t − Δ`` and the inversion goes from ``ā(t − Δ)`` back to ``ā(t)``, so that
``x̂`` lies at the level of ``x``, and with ``weak == strong`` and an ``x``-independent ε the reflection is exactly
the identity (the official one is not: it moves the latent even then). Under ``"consistent"`` the last step may be
reflected too (``t − Δ < 0`` then: the weak model is called at timestep 0 and the inversion starts from the final
α); under ``"official"`` it cannot (there is no ``timesteps[n]``).

Noise: the two DDIM steps use ``eta`` (and the ``generator``) as the official pipeline does (``extra_step_kwargs``;
``eta = 0``, deterministic, by default); the inversion is deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping

import torch

import distkern
from distkern.diffusion import DDIMInverseScheduler, DDIMScheduler

__all__ = ["W2SD", "INDEXINGS"]

INDEXINGS = ("official", "consistent")

Denoiser = Callable[[torch.Tensor, torch.Tensor], object]


def _check_denoiser(name: str, fn, *, required: bool = False):
    if fn is None:
        if required:
            raise ValueError(f"w2sd: {name} is required: a denoiser callable (x, t) -> model_output")
        return None
    if not callable(fn):
        raise TypeError(f"w2sd: {name} must be a callable (x, t) -> model_output (e.g. a UNet wrapper); got "
                        f"{type(fn).__name__}")
    return fn


def _output_tensor(name: str, out, like: torch.Tensor) -> torch.Tensor:
    """A denoiser's output as a tensor: a tensor, an object with ``.sample`` (diffusers' UNet output) or a tuple."""
    if not isinstance(out, torch.Tensor):
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"w2sd: the {name} model must return a tensor (or an object with .sample, or a tuple); got "
                        f"{type(out).__name__}")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"w2sd: the {name} model returned shape {tuple(out.shape)} for a sample of shape "
                         f"{tuple(like.shape)}")
    return out


def _as_ddim(scheduler) -> DDIMScheduler:
    if scheduler is None:
        return DDIMScheduler()
    if isinstance(scheduler, DDIMScheduler):
        return scheduler
    if isinstance(scheduler, Mapping) or hasattr(scheduler, "config"):
        # a config, or another scheduler (ours or diffusers'): the official code does
        # DDIMScheduler.from_config(pipe.scheduler.config) the same way
        return DDIMScheduler.from_config(scheduler)
    raise TypeError("w2sd: scheduler must be a distkern.diffusion.DDIMScheduler, a scheduler config (a mapping) or "
                    f"a scheduler with a .config; got {type(scheduler).__name__}")


def _as_inverse(inverse, scheduler: DDIMScheduler) -> DDIMInverseScheduler:
    if inverse is None:
        inverse = scheduler.config
    elif isinstance(inverse, DDIMInverseScheduler):
        return inverse
    elif not (isinstance(inverse, Mapping) or hasattr(inverse, "config")):
        raise TypeError("w2sd: inverse_scheduler must be a distkern.diffusion.DDIMInverseScheduler or a config; got "
                        f"{type(inverse).__name__}")
    cfg = dict(inverse.config if hasattr(inverse, "config") and not isinstance(inverse, Mapping) else inverse)
    # only num_inference_steps of the inverse scheduler's own timesteps is used, so a spacing it does not
    # take ("linspace") can be replaced
    if cfg.get("timestep_spacing", "leading") not in ("leading", "trailing"):
        cfg["timestep_spacing"] = "leading"
    return DDIMInverseScheduler.from_config(cfg)


class W2SD:
    r"""Weak-to-Strong Diffusion with Reflection on a DDIM schedule (see the module docstring for the exact
    indexing of the reflection).

    Args:
        scheduler: a :class:`distkern.diffusion.DDIMScheduler`, a scheduler config (a mapping, e.g. a diffusers
            pipeline's ``scheduler.config``) or another scheduler (converted with ``DDIMScheduler.from_config``,
            as the official code converts the SDXL pipeline's scheduler). Default: ``DDIMScheduler()``.
        strong, weak: denoisers ``(x, t) -> model_output`` (the scheduler's ``prediction_type``; a tensor, an
            object with ``.sample`` or a tuple), ``x`` ``(B, ...)`` and ``t`` a 0-dim int64 tensor. In the paper:
            e.g. the model with a DPO LoRA at scale +1.5 and at −1.5, or CFG 5.5 and CFG 1.0.
        model: the denoiser of the plain step (default ``strong``); the official LoRA script uses a third one
            (the LoRA at 0.8).
        reflection_steps: the step indices that get a reflection: ``None`` (all but the last, the official
            choice), a set / range / iterable of indices, or a callable ``i -> bool``. Indices the indexing
            cannot reflect (the last under ``"official"``) raise in a set and are never asked of a callable.
        strength: multiplier of the reflection's displacement, ``x ← x + strength·(x̂ − x)``; 1.0 is the
            official method, 0.0 the plain sampler (no reflection model calls are made then).
        indexing: ``"official"`` (the published code's indexing) or ``"consistent"`` (see the module docstring).
        eta: DDIM's η for the reflection's strong step and the plain step (0: deterministic, the official
            default).
        inverse_scheduler: the :class:`distkern.diffusion.DDIMInverseScheduler` (or its config) of the inversion;
            default: built from ``scheduler``'s config (as the official code loads the same pretrained config).

    The sampler contract: :meth:`set_timesteps`, :attr:`timesteps`, :meth:`step` (the scheduler's plain DDIM step,
    returning an output with ``prev_sample``), :meth:`scale_model_input`, :attr:`init_noise_sigma`. The whole
    loop: ``w2sd(latents, num_inference_steps)`` (:meth:`sample`); one reflection: :meth:`reflect`.
    ``nfe`` holds the number of model calls of the last :meth:`sample`.
    """

    name = "w2sd"
    kind = "sampler"
    distkern_api = distkern.methods.API_VERSION

    def __init__(self, scheduler=None, strong: Denoiser | None = None, weak: Denoiser | None = None,
                 model: Denoiser | None = None, *, reflection_steps=None, strength: float = 1.0,
                 indexing: str = "official", eta: float = 0.0, inverse_scheduler=None):
        self.scheduler = _as_ddim(scheduler)
        self.inverse_scheduler = _as_inverse(inverse_scheduler, self.scheduler)
        n_train, n_inv = int(self.scheduler.config.num_train_timesteps), int(
            self.inverse_scheduler.config.num_train_timesteps)
        if n_train != n_inv:
            raise ValueError(f"w2sd: the scheduler has {n_train} training timesteps but the inverse scheduler {n_inv}")
        self.strong = _check_denoiser("strong", strong)
        self.weak = _check_denoiser("weak", weak)
        self.model = _check_denoiser("model", model)
        if indexing not in INDEXINGS:
            raise ValueError(f"w2sd: indexing must be one of {list(INDEXINGS)}; got {indexing!r}")
        self.indexing = indexing
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError(f"w2sd: strength must be a finite number; got {strength}")
        self.strength = strength
        eta = float(eta)
        if not eta >= 0:
            raise ValueError(f"w2sd: eta must be ≥ 0; got {eta}")
        self.eta = eta
        if not (reflection_steps is None or callable(reflection_steps) or isinstance(reflection_steps, Iterable)
                or isinstance(reflection_steps, Container)):
            raise TypeError("w2sd: reflection_steps must be None, a set / range / iterable of step indices or a "
                            f"callable i -> bool; got {type(reflection_steps).__name__}")
        if reflection_steps is not None and not callable(reflection_steps) and not isinstance(reflection_steps, range):
            if isinstance(reflection_steps, (str, bytes)):
                raise TypeError(f"w2sd: reflection_steps must hold step indices (ints), not a string; got "
                                f"{reflection_steps!r}")
            steps = list(reflection_steps)
            bad = [i for i in steps if isinstance(i, bool) or not float(i).is_integer()]
            if bad:
                raise ValueError(f"w2sd: reflection_steps must be integer step indices; got {bad}")
            reflection_steps = frozenset(int(i) for i in steps)
        self.reflection_steps = reflection_steps
        self.nfe = 0

    @classmethod
    def from_config(cls, config=None, **kwargs) -> "W2SD":
        """A W2SD on ``DDIMScheduler.from_config(config, **overrides)``: keyword arguments of :class:`W2SD`
        (``strong``, ``weak``, ``model``, ``reflection_steps``, ``strength``, ``indexing``, ``eta``,
        ``inverse_scheduler``) go to it, the others override config entries."""
        own = {k: kwargs.pop(k) for k in ("strong", "weak", "model", "reflection_steps", "strength", "indexing",
                                          "eta", "inverse_scheduler") if k in kwargs}
        return cls(DDIMScheduler.from_config(config, **kwargs), **own)

    # ------------------------------------------------------------------ the sampler contract
    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the ``(n,)`` int64 DDIM timesteps of both the scheduler and the inverse scheduler."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.inverse_scheduler.set_timesteps(num_inference_steps, device=device)

    @property
    def timesteps(self) -> torch.Tensor:
        """The scheduler's ``(n,)`` descending int64 timesteps."""
        return self.scheduler.timesteps

    @property
    def num_inference_steps(self) -> int | None:
        return self.scheduler.num_inference_steps

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    @property
    def config(self):
        """The DDIM scheduler's config."""
        return self.scheduler.config

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs):
        """The plain DDIM step (``DDIMScheduler.step``; ``eta`` defaults to this sampler's): returns a
        :class:`~distkern.diffusion.SchedulerOutput` with ``prev_sample`` (or a tuple with ``return_dict=False``)."""
        kwargs.setdefault("eta", self.eta)
        return self.scheduler.step(model_output, timestep, sample, **kwargs)

    # ------------------------------------------------------------------ reflection
    def _require_timesteps(self, what: str) -> int:
        n = self.scheduler.num_inference_steps
        if n is None:
            raise ValueError(f"w2sd.{what}: call set_timesteps(num_inference_steps) first")
        if self.inverse_scheduler.num_inference_steps != n:
            self.inverse_scheduler.set_timesteps(n, device=self.scheduler.timesteps.device)
        return n

    def _reflectable(self, i: int, n: int) -> bool:
        return 0 <= i < (n - 1 if self.indexing == "official" else n)

    def reflection_indices(self, num_inference_steps: int | None = None) -> list[int]:
        """The step indices that get a reflection in an ``n``-step loop (default: the current schedule's ``n``)."""
        n = int(num_inference_steps) if num_inference_steps is not None else self._require_timesteps(
            "reflection_indices")
        if self.strength == 0.0:
            return []
        rs = self.reflection_steps
        if rs is None:
            return list(range(n - 1))
        if callable(rs):
            return [i for i in range(n) if self._reflectable(i, n) and bool(rs(i))]
        bad = sorted(i for i in rs if not self._reflectable(i, n))
        if bad:
            top = n - 2 if self.indexing == "official" else n - 1
            why = " (the official indexing needs timesteps[i + 1], so the last step cannot be reflected)" \
                if self.indexing == "official" else ""
            raise ValueError(f"w2sd: reflection_steps {bad} outside 0 … {top} for {n} steps{why}")
        return sorted(i for i in range(n) if i in rs)

    def _call(self, name: str, fn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = _output_tensor(name, fn(self.scheduler.scale_model_input(x, t), t), x)
        self.nfe += 1
        return out

    def reflect(self, sample: torch.Tensor, i: int, *, generator=None) -> torch.Tensor:
        """The reflection before step ``i`` (an index of :attr:`timesteps`): returns
        ``sample + strength·(x̂ − sample)`` (``(B, ...)``), with ``x̂`` as in the module docstring. Two model
        calls (none when ``strength == 0``)."""
        n = self._require_timesteps("reflect")
        if self.strong is None or self.weak is None:
            raise ValueError("w2sd.reflect: the reflection needs both strong= and weak= denoisers")
        if isinstance(i, bool) or int(i) != i:
            raise TypeError(f"w2sd.reflect: i must be a step index (int); got {i!r}")
        i = int(i)
        if not self._reflectable(i, n):
            extra = " (the official indexing needs timesteps[i + 1]: the last step has no reflection)" \
                if self.indexing == "official" and i == n - 1 else ""
            raise ValueError(f"w2sd.reflect: step index {i} out of range for {n} steps{extra}")
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"w2sd.reflect: sample must be a tensor; got {type(sample).__name__}")
        if self.strength == 0.0:
            return sample
        ts = self.scheduler.timesteps
        t = ts[i]
        eps = self._call("strong", self.strong, sample, t)
        x1 = self.scheduler.step(eps, t, sample, eta=self.eta, generator=generator).prev_sample
        if self.indexing == "official":
            eps_w = self._call("weak", self.weak, x1, t)
            x2 = self.inverse_scheduler.step(eps_w, ts[i + 1], x1).prev_sample
        else:
            ratio = int(self.scheduler.config.num_train_timesteps) // n
            t_prev = (t - ratio).clamp(min=0)
            eps_w = self._call("weak", self.weak, x1, t_prev)
            x2 = self.inverse_scheduler.step(eps_w, t, x1).prev_sample
        x2 = x2.to(sample.dtype)
        if self.strength == 1.0:
            return x2
        return sample + self.strength * (x2 - sample)

    # ------------------------------------------------------------------ the loop
    def sample(self, latents: torch.Tensor, num_inference_steps: int | None = None, *, generator=None,
               progress: bool = False, callback: Callable | None = None) -> torch.Tensor:
        """Run the whole W2SD loop from ``latents`` (``(B, ...)``, already scaled by ``init_noise_sigma``) and
        return the final ``(B, ...)`` sample. ``num_inference_steps``: set the schedule (default: the one set
        by :meth:`set_timesteps`). ``generator``: for ``eta > 0``. ``progress``: a tqdm bar (when tqdm is
        installed). ``callback(i, t, latents)`` after each step. Sets :attr:`nfe`."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"w2sd.sample: latents must be a tensor; got {type(latents).__name__}")
        normal = self.model if self.model is not None else self.strong
        if normal is None:
            raise ValueError("w2sd.sample: no denoiser: give model= or strong= (and weak= for the reflection)")
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps, device=latents.device)
        n = self._require_timesteps("sample")
        reflect_at = set(self.reflection_indices(n))
        if reflect_at and (self.strong is None or self.weak is None):
            raise ValueError("w2sd.sample: the reflection needs both strong= and weak= denoisers (or strength=0)")
        self.nfe = 0
        x = latents
        steps = enumerate(self.scheduler.timesteps)
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=n, desc="w2sd", unit="step", leave=False)
            except ImportError:  # pragma: no cover - tqdm is optional
                bar = None
        for i, t in steps:
            if i in reflect_at:
                x = self.reflect(x, i, generator=generator)
            eps = self._call("model", normal, x, t)
            x = self.scheduler.step(eps, t, x, eta=self.eta, generator=generator).prev_sample
            if callback is not None:
                callback(i, t, x)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return x

    __call__ = sample

    def __repr__(self) -> str:
        return (f"W2SD(indexing={self.indexing!r}, strength={self.strength}, eta={self.eta}, "
                f"reflection_steps={self.reflection_steps!r}, scheduler={self.scheduler!r})")
