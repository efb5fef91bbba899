"""Shared machinery of the :mod:`distkern.diffusion` schedulers: config, output, timesteps, noise."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ..ops.diffusion import randn_tensor  # noqa: F401  (re-exported: distkern.diffusion.randn_tensor)
from . import _schedule

logger = logging.getLogger("distkern.diffusion")

__all__ = ["SchedulerConfig", "SchedulerOutput", "SchedulerBase", "randn_tensor"]


class SchedulerConfig(dict):
    """The constructor arguments of a scheduler: a read-only ``dict`` with attribute access
    (``scheduler.config.prediction_type`` or ``scheduler.config["prediction_type"]``), like diffusers' ``FrozenDict``.
    Build a changed scheduler with ``type(s).from_config(s.config, key=value)``.

    The ``_use_default_values`` key (also ``config.use_default_values``) lists the arguments that were not given
    and took their default; ``from_config`` of another scheduler class, ours or diffusers', leaves those to that
    class's defaults, as diffusers does with its own key of that name."""

    def __init__(self, *args, use_default_values=None, **kwargs):
        super().__init__(*args, **kwargs)
        if use_default_values is not None or "_use_default_values" not in self:
            dict.__setitem__(self, "_use_default_values", list(use_default_values or ()))

    @property
    def use_default_values(self) -> tuple:
        return tuple(self.get("_use_default_values", ()))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, key=value) for a changed scheduler")

    __setattr__ = __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _frozen

    def __reduce__(self):
        return (SchedulerConfig, (dict(self),))


def register_config(init):
    """Decorate a scheduler's ``__init__``: records which arguments the caller gave (the rest are defaults), and
    drops private keywords (``_class_name``, ``_use_default_values``, …) as diffusers' constructors do, so that
    ``Scheduler(**scheduler.config)`` works."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        self._given_args = frozenset(bound.arguments) - {"self", "kwargs"}
        init(self, *args, **kwargs)

    return inner


@dataclasses.dataclass
class SchedulerOutput:
    """What ``step`` returns (``return_dict=True``).

    ``prev_sample``: ``(B, ...)`` the sample at the next (less noisy) timestep, the next model input.
    ``pred_original_sample``: ``(B, ...)`` the data prediction ``x̂0`` of this step (after clipping / thresholding).
    Indexing works as for diffusers' outputs: ``out[0]`` / ``out["prev_sample"]``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class SchedulerBase:
    """Base of the schedulers: config handling, the training noise schedule, timestep parsing, noise sources.

    Not used directly. Public attributes shared by all schedulers: ``config`` (:class:`SchedulerConfig`),
    ``betas`` / ``alphas`` / ``alphas_cumprod`` (``(N,)`` float32, bit-identical to diffusers'), ``timesteps``
    (``(n,)`` tensor, set by ``set_timesteps``), ``num_inference_steps``, ``init_noise_sigma``, ``order``.
    """

    order = 1
    _prediction_types = ("epsilon", "v_prediction", "sample")
    _beta_schedules = _schedule.BASE_BETA_SCHEDULES

    # ------------------------------------------------------------------ config
    def _register(self, args: dict) -> None:
        params = inspect.signature(type(self).__init__).parameters
        cfg = {k: args[k] for k, p in params.items()
               if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        given = getattr(self, "_given_args", frozenset(cfg))
        self._config = SchedulerConfig(cfg, use_default_values=[k for k in cfg if k not in given])
        self._dev: dict = {}
        self._noise_seed: int | None = None
        self._noise_offset = 0
        self._noise_seed_set = False  # set_noise_seed was called (else every step draws its own seed)

    def _set_config(self, **changes) -> None:
        self._config = SchedulerConfig({**self._config, **changes}, use_default_values=[
            k for k in self._config.use_default_values if k not in changes])

    @property
    def config(self) -> SchedulerConfig:
        """Every constructor argument and its value (read-only dict with attribute access)."""
        return self._config

    @classmethod
    def _config_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    @classmethod
    def _translate_legacy(cls, cfg: dict) -> dict:
        return cfg

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build a scheduler from a config: ours, a diffusers scheduler's ``.config`` (``FrozenDict``), a plain
        dict, or a scheduler object (its ``.config`` is used). ``kwargs`` override config entries.

        As diffusers' ``from_config``, entries the source scheduler took as defaults (diffusers'
        ``_use_default_values``, our ``config.use_default_values``) are left to this class's defaults (so a DDIM
        config's default ``timestep_spacing="leading"`` does not override Euler's ``"linspace"``). Keys this
        scheduler does not take (``_class_name``, ``_diffusers_version``, keys of other schedulers) are
        ignored, like diffusers does (the ignored non-private keys are logged at INFO level on
        ``distkern.diffusion``). Keys it takes but values it does not support (``variance_type="learned"``,
        ``use_exponential_sigmas=True``, …) raise a ``ValueError`` naming the key rather than giving numbers
        different from diffusers'. An override in ``kwargs`` this scheduler does not take is ignored with a
        ``UserWarning`` naming it (diffusers ignores it silently); ``return_unused_kwargs=True`` returns
        ``(scheduler, {ignored overrides})``, as diffusers.
        """
        if config is None:
            config = {}
        elif not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config: config must be a mapping (a scheduler's .config or a "
                            f"dict); got {type(config).__name__}")
        keys = set(cls._config_keys())
        defaulted = set(config.get("_use_default_values", ()) or ()) | set(getattr(config, "use_default_values", ()))
        cfg = cls._translate_legacy({k: v for k, v in config.items()
                                     if k not in defaulted and k != "_use_default_values"})
        unused = {k: kwargs.pop(k) for k in [k for k in kwargs if k not in keys]}
        if unused:
            warnings.warn(f"{cls.__name__}.from_config: ignoring argument(s) this scheduler does not take: "
                          f"{sorted(unused)} (known: {sorted(keys)})", UserWarning, stacklevel=2)
        ignored = sorted(k for k in cfg if k not in keys and not str(k).startswith("_"))
        if ignored:
            logger.info("%s.from_config: ignoring config keys this scheduler does not take: %s", cls.__name__,
                        ", ".join(ignored))
        args = {k: v for k, v in cfg.items() if k in keys}
        args.update(kwargs)
        scheduler = cls(**args)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    # diffusers' pipelines rewrite outdated configs in place (StableDiffusionPipeline forces steps_offset=1 and
    # clip_sample=False through ``scheduler._internal_dict = FrozenDict(new_config)``): a config assigned here
    # rebuilds the scheduler from it, so such fix-ups take effect as they do on diffusers' schedulers.
    @property
    def _internal_dict(self) -> SchedulerConfig:
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, config: Mapping) -> None:
        keys = self._config_keys()
        fresh = type(self)(**{k: v for k, v in config.items() if k in keys})  # every value, as assigned
        old = self._config
        fresh._config = SchedulerConfig(fresh._config, use_default_values=[  # still defaults: those left as they were
            k for k in config.get("_use_default_values", ()) if k in keys and config.get(k) == old.get(k)])
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)

    # ------------------------------------------------------------------ files
    config_name = "scheduler_config.json"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write the config as ``save_directory/scheduler_config.json`` in diffusers' format (``_class_name`` +
        the constructor arguments), which ``from_pretrained`` of this class or of diffusers' class of the same
        name reads back. ``push_to_hub`` is not supported (upload the folder with ``huggingface_hub``)."""
        if push_to_hub:
            raise NotImplementedError(f"{self._name}.save_config: push_to_hub is not supported; save locally and "
                                      "upload the folder with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"{self._name}.save_config: {os.fspath(save_directory)!r} is a file, not a directory")
        from .. import __version__

        os.makedirs(save_directory, exist_ok=True)
        doc = {"_class_name": type(self).__name__, "_distkern_version": __version__}
        doc.update({k: v for k, v in self.config.items() if not k.startswith("_")})
        for k, v in doc.items():  # trained_betas: a tensor / array / list
            if isinstance(v, (torch.Tensor, np.ndarray)):
                doc[k] = v.tolist()
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        logger.info("%s: config written to %s", self._name, path)

    save_pretrained = save_config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                    return_unused_kwargs: bool = False, **kwargs):
        """The config dict of a saved scheduler: ``pretrained_model_name_or_path`` is a directory holding
        ``[subfolder/]scheduler_config.json`` (or that file itself), or a Hugging Face Hub repository id, fetched
        through ``huggingface_hub`` (an optional dependency; its cache, ``HF_HUB_OFFLINE`` and these keywords
        apply: ``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``force_download``).
        With ``return_unused_kwargs=True`` returns ``(config, the other kwargs)``."""
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            file = path
        elif os.path.isdir(path):
            file = os.path.join(path, subfolder or "", cls.config_name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{cls.__name__}.load_config: no {cls.config_name} in "
                                        f"{os.path.join(path, subfolder or '')!r}"
                                        + ("" if subfolder else " (a pipeline folder keeps it in subfolder='scheduler')"))
        else:
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise FileNotFoundError(
                    f"{cls.__name__}.load_config: {path!r} is not a local file or directory, and huggingface_hub "
                    "is not installed to fetch it from the Hub (pip install huggingface_hub)") from None
            file = hf_hub_download(path, cls.config_name, subfolder=subfolder, **hub)
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{cls.__name__}.load_config: cannot read {file!r} as a scheduler config: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{cls.__name__}.load_config: {file!r} holds a {type(config).__name__}, not a config "
                             "object")
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Build the scheduler from a saved config, ours or diffusers' (``load_config`` says where it is read
        from), as diffusers' ``X.from_pretrained(repo, subfolder="scheduler")``; the other ``kwargs`` override
        config entries (see :meth:`from_config`)."""
        config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas" and k[0] != "_")
        return f"{type(self).__name__}({items})"

    # ------------------------------------------------------------------ schedule
    def _init_alphas(self) -> None:
        cfg = self.config
        _schedule.check_choice(self._name, "prediction_type", cfg.prediction_type, self._prediction_types)
        self.betas = _schedule.make_betas(cfg, self._name, self._beta_schedules)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._ac64 = self.alphas_cumprod.to(torch.float64)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _on(self, name: str, value: torch.Tensor, device) -> torch.Tensor:
        """``value`` (a host tensor) on ``device``, cached until the next ``set_timesteps``."""
        device = torch.device(device)
        if device.type == "cpu":
            return value
        key = (name, device)
        hit = self._dev.get(key)
        if hit is None:
            hit = self._dev[key] = value.to(device)
        return hit

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{self._name}.step: the number of inference steps is not set; call "
                             "set_timesteps(num_inference_steps) before step")

    @staticmethod
    def _check_num_steps(owner: str, n, limit: int) -> int:
        if n is None or isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ValueError(f"{owner}.set_timesteps: num_inference_steps must be a positive int; got {n!r}")
        if int(n) > limit:
            raise ValueError(f"{owner}.set_timesteps: num_inference_steps = {n} cannot be larger than "
                             f"num_train_timesteps = {limit}")
        return int(n)

    # ------------------------------------------------------------------ inputs
    def _check_pair(self, model_output, sample):
        """Validate ``model_output`` / ``sample``; return them in a common floating dtype."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"{self._name}.step: sample must be a tensor; got {type(sample).__name__}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"{self._name}.step: model_output must be a tensor; got {type(model_output).__name__}")
        if sample.dim() < 1:
            raise ValueError(f"{self._name}.step: sample must be (B, ...) with a batch dimension; got a 0-dim tensor")
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(f"{self._name}.step: model_output must have the sample's shape {tuple(sample.shape)}; "
                             f"got {tuple(model_output.shape)}")
        if sample.dtype == model_output.dtype and sample.is_floating_point():
            return model_output, sample  # the common case: no promotion, no .to() call (≈µs per step)
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"{self._name}.step: sample and model_output must be floating point; got {dtype}")
        return model_output.to(dtype), sample.to(dtype)

    def _timestep(self, timestep, batch: int, *, integral: bool = True, check_range: bool = True,
                  what: str = "step"):
        """Parse a timestep argument.

        Returns ``(host, per_sample)``: ``host`` a Python number (one timestep for the batch: an ``int``, a float,
        a 0-dim or 1-element CPU tensor) or ``None``; ``per_sample`` a ``(B,)`` tensor on its own device (a
        ``(B,)`` tensor, or a 0-dim device tensor expanded to ``(B,)`` so that it is never read back) or ``None``.
        CPU values are range-checked against ``[0, num_train_timesteps)``; device tensors cannot be checked
        without a sync and are clamped into range instead.
        """
        owner = f"{self._name}.{what}"
        n_train = int(self.config.num_train_timesteps)
        if isinstance(timestep, torch.Tensor):
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
                raise ValueError(f"{owner}: timestep must be a number, a 0-dim tensor or a (B,) = ({batch},) tensor "
                                 f"of per-sample timesteps; got shape {tuple(timestep.shape)}")
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"{owner}: timestep must be an integer or floating tensor; got {timestep.dtype}")
            if timestep.numel() == 1 and timestep.device.type == "cpu":
                return self._host_timestep(timestep.reshape(()).item(), owner, n_train, integral, check_range), None
            t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
            if integral and t.is_floating_point():
                t = t.round().long()
            if check_range:
                if t.device.type == "cpu":
                    bad = (t < 0) | (t >= n_train)
                    if bool(bad.any()):
                        raise ValueError(f"{owner}: timestep must lie in [0, num_train_timesteps) = [0, {n_train}); "
                                         f"got {t[bad][0].item()}")
                else:
                    t = t.clamp(0, n_train - 1)
            return None, t
        if isinstance(timestep, (bool, np.bool_)) or not isinstance(timestep, (int, float, np.integer, np.floating)):
            raise TypeError(f"{owner}: timestep must be an int, a float, a 0-dim tensor or a (B,) tensor; got "
                            f"{type(timestep).__name__}")
        return self._host_timestep(timestep, owner, n_train, integral, check_range), None

    @staticmethod
    def _host_timestep(t, owner, n_train, integral, check_range):
        if isinstance(t, (float, np.floating)):
            if not math.isfinite(float(t)):
                raise ValueError(f"{owner}: timestep must be finite; got {t}")
            if integral:
                if float(t) != round(float(t)):
                    raise ValueError(f"{owner}: timestep must be an integer timestep of the schedule; got {t}")
                t = int(round(float(t)))
            else:
                t = float(t)
        else:
            t = int(t)
        if check_range and not 0 <= t < n_train:
            raise ValueError(f"{owner}: timestep must lie in [0, num_train_timesteps) = [0, {n_train}); got {t}")
        return t

    def _timestep_tensor(self, timesteps, device, what: str) -> torch.Tensor:
        """``(B,)`` long timesteps (for ``add_noise``) on ``device``; CPU values are range-checked."""
        owner = f"{self._name}.{what}"
        n_train = int(self.config.num_train_timesteps)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        t = timesteps.reshape(-1)
        if t.is_floating_point():
            t = t.round()
        t = t.long()
        if t.device.type == "cpu":
            bad = (t < 0) | (t >= n_train)
            if bool(bad.any()):
                raise ValueError(f"{owner}: timesteps must lie in [0, num_train_timesteps) = [0, {n_train}); got "
                                 f"{t[bad][0].item()}")
        else:
            t = t.clamp(0, n_train - 1)
        return t.to(device)

    @staticmethod
    def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A ``(B,)`` per-sample value shaped ``(B, 1, ..., 1)`` to broadcast against ``like`` ``(B, ...)``."""
        return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))

    def _check_alpha(self, alpha_t: float, what: str = "step") -> None:
        """Refuse the two host-side schedule points where the data prediction divides by zero (diffusers returns
        inf / NaN there): ε-prediction at ``ā_t = 0`` and sample-prediction at ``ā_t = 1``."""
        pt = self.config.prediction_type
        if pt == "epsilon" and alpha_t <= 0.0:
            raise ValueError(f"{self._name}.{what}: prediction_type='epsilon' is undefined where alphas_cumprod is 0 "
                             "(the zero-terminal-SNR timestep of rescale_betas_zero_snr=True); use "
                             "prediction_type='v_prediction'")
        if pt == "sample" and alpha_t >= 1.0:
            raise ValueError(f"{self._name}.{what}: prediction_type='sample' is undefined where alphas_cumprod is 1 "
                             "(noise-free, e.g. set_alpha_to_one=True at the first inversion step): ε = (x − x̂0)/0")

    # ------------------------------------------------------------------ noise
    def set_noise_seed(self, seed: int, offset: int = 0) -> None:
        """Seed the in-kernel noise used when ``step`` gets neither ``generator`` nor ``variance_noise``.

        Step ``k`` after this call draws the counter-based (Philox) normals of ``(seed, offset + k)``: every step
        call advances the offset by one, so a loop is reproducible from its seed and the same on CPU and CUDA.
        ``set_timesteps`` does not reset the offset (a second loop gets fresh noise); call this to replay.
        Without a call, every step that needs noise draws a fresh seed from torch's default CPU generator (no
        device sync), so ``torch.manual_seed(s)`` before a loop replays it, as it does with diffusers'
        schedulers and pipelines (the numbers differ from diffusers', which draws them with ``torch.randn``).
        Element ``i`` of the ``(B, ...)`` batch gets the normal of counter ``i``: a sample's noise depends on its
        position in the batch (pass ``generator`` / ``variance_noise`` for noise tied to the sample).
        """
        if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0 or int(seed) >= 2**63:
            raise ValueError(f"{self._name}.set_noise_seed: seed must be an int in [0, 2**63); got {seed!r}")
        if isinstance(offset, bool) or int(offset) != offset or int(offset) < 0:
            raise ValueError(f"{self._name}.set_noise_seed: offset must be an int ≥ 0; got {offset!r}")
        self._noise_seed, self._noise_offset = int(seed), int(offset)
        self._noise_seed_set = True

    @property
    def noise_seed(self) -> int | None:
        """The in-kernel noise seed: the one set by :meth:`set_noise_seed`, else the seed the last noisy step drew
        (``None`` before)."""
        return self._noise_seed

    @property
    def noise_offset(self) -> int:
        """The Philox offset the next step uses for in-kernel noise seeded by :meth:`set_noise_seed` (steps count
        it up; without a seed each step's fresh seed is used at offset 0)."""
        return self._noise_offset

    def _noise_kwargs(self, model_output, sample, *, needed: bool, generator, variance_noise,
                      draw_dtype=None) -> dict:
        """Noise arguments for a step op. ``needed``: diffusers would draw noise at this step (so a generator is
        consumed exactly as diffusers consumes it). ``variance_noise`` wins, then ``generator`` (drawn like
        diffusers' ``randn_tensor`` with ``draw_dtype``, default the model output's), else the in-kernel seed."""
        if not needed:
            return {}
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor) or tuple(variance_noise.shape) != tuple(sample.shape):
                got = variance_noise.shape if isinstance(variance_noise, torch.Tensor) else type(variance_noise)
                raise ValueError(f"{self._name}.step: variance_noise must be a tensor of the sample's shape "
                                 f"{tuple(sample.shape)}; got {tuple(got) if isinstance(got, torch.Size) else got}")
            return {"noise": variance_noise.to(device=sample.device, dtype=sample.dtype)}
        if generator is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=draw_dtype or model_output.dtype)
            return {"noise": noise.to(device=sample.device, dtype=sample.dtype)}
        if not self._noise_seed_set:  # a fresh seed per step from the default CPU generator: no device sync
            self._noise_seed = int(torch.randint(0, 2**62, (1,)).item())
            return {"seed": self._noise_seed, "offset": 0}
        return {"seed": self._noise_seed, "offset": self._noise_offset}

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _output(prev, x0, return_dict: bool, *, tuple_len: int = 2):
        if not return_dict:
            return (prev, x0)[:tuple_len]
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _vp_add_noise(self, original_samples, noise, timesteps):
        """``√ā_t·x0 + √(1−ā_t)·noise`` per sample (DDPM/DDIM forward process)."""
        if not isinstance(original_samples, torch.Tensor) or not isinstance(noise, torch.Tensor):
            raise TypeError(f"{self._name}.add_noise: original_samples and noise must be tensors")
        if tuple(noise.shape) != tuple(original_samples.shape):
            raise ValueError(f"{self._name}.add_noise: noise must have the shape of original_samples "
                             f"{tuple(original_samples.shape)}; got {tuple(noise.shape)}")
        dev, dtype = original_samples.device, original_samples.dtype
        t = self._timestep_tensor(timesteps, dev, "add_noise")
        ac = self._on("ac", self._ac64, dev)[t]
        a = self._expand(ac.sqrt().to(dtype), original_samples)
        s = self._expand((1 - ac).sqrt().to(dtype), original_samples)
        return a * original_samples + s * noise.to(device=dev)

    def _vp_velocity(self, sample, noise, timesteps):
        dev, dtype = sample.device, sample.dtype
        t = self._timestep_tensor(timesteps, dev, "get_velocity")
        ac = self._on("ac", self._ac64, dev)[t]
        a = self._expand(ac.sqrt().to(dtype), sample)
        s = self._expand((1 - ac).sqrt().to(dtype), sample)
        return a * noise.to(device=dev) - s * sample
