r"""Diffusion sampler steps as one fused op: ``torch.ops.distkern.sampler_step``.

Every step of DDPM, DDIM (and its inverse), Euler (with churn or ancestral noise) and
DPM-Solver++ (2M, also its SDE variant) is, per element, the same affine form
(``x`` the sample, ``m`` the model output, ``x0'`` the previous step's data prediction,
``n`` Gaussian noise)::

    x0    = a·x + b·m + g·n           # the data prediction, from any prediction type
    x0    = clip(x0)                  # none / clamp / dynamic thresholding (per-sample quantile)
    prev  = p·x0 + r·x + w·m + u·x0' + s·n

The eight coefficients ``(a, b, g, p, r, w, u, s)`` are computed on the host in float64 from the
schedule (or, for per-sample timesteps held on a device, as a ``(B, 8)`` float64 tensor there),
so one kernel reads each input once, writes ``prev`` and ``x0`` once, and never synchronises with
the host. Noise is either given (``noise=``) or drawn inside the kernel from a counter-based
generator (Philox4x32-10 + Box-Muller): element ``i`` gets the normal that depends only on
``(seed, offset, i)``, so a step is reproducible on a device and the CPU and CUDA kernels draw
the same numbers. The functions below turn the familiar parameters into the coefficients.

Shapes: ``sample``, ``model_output`` (and ``prev_x0``, ``noise``) are ``(B, ...)`` of one dtype
(float32 / float16 / bfloat16 / float64; arithmetic in float32, float64 for float64). A
schedule quantity (``alpha_t``, ``sigma`` …) is a Python float (one value for the batch) or a
``(B,)`` tensor (per-sample timesteps). Returns ``(prev_sample, pred_original_sample)``, both
``(B, ...)`` in the sample's dtype.
"""
from __future__ import annotations

import math

import torch

from ._fake import same_device

__all__ = ["ddim_step", "ddpm_step", "euler_step", "dpmpp_2m_step", "sampler_step", "randn_tensor",
           "PREDICTION_TYPES", "COEFS", "gaussian_denoise", "gaussian_teleport", "LowRankGaussian", "fit_lowrank_gaussian"]

COEFS = ("a", "b", "g", "p", "r", "w", "u", "s")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_CLIP_NONE, _CLIP_CLAMP, _CLIP_THRESHOLD = 0, 1, 2


# Schedule arithmetic runs on Python floats when every value is a float (the common case: no torch op,
# ~µs per step) and on float64 tensors when a value is a tensor (per-sample timesteps, possibly on
# the device: tensor ops only, never read back).
def _no_schedule_grad(v, op, name) -> None:
    """The steps differentiate with respect to sample, model_output (and the previous x0) only: a schedule
    tensor that requires grad would have its gradient silently dropped, so it is refused."""
    if v.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"distkern.{op or 'sampler step'}: {name or 'a schedule value'} requires grad, but the steps "
                         "are differentiable in sample and model_output only; pass it detached (.detach())")


def _as_t(v, device=None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        _no_schedule_grad(v, None, None)
        return v.to(dtype=torch.float64)
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def _val(v, op: str | None = None, name: str = "", lo: float = 0.0, hi: float = math.inf):
    """A schedule value as a float64 tensor or a float; a float is checked to be finite in [lo, hi] when ``op``
    names the caller (tensors are not: reading them back would sync the device)."""
    if isinstance(v, torch.Tensor):
        _no_schedule_grad(v, op, name)
        return v.to(dtype=torch.float64)
    f = float(v)
    if op is not None and not (math.isfinite(f) and lo <= f <= hi):
        raise ValueError(f"distkern.{op}: {name} must be finite and in [{lo:g}, {hi:g}]; got {f}")
    return f


def _sqrt(v):
    return v.clamp(min=0).sqrt() if isinstance(v, torch.Tensor) else math.sqrt(max(v, 0.0))


def _exp(v):
    return torch.exp(v) if isinstance(v, torch.Tensor) else math.exp(v)


def _expm1(v):
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def _log(v):
    if isinstance(v, torch.Tensor):
        return torch.log(v)
    return math.log(v) if v > 0 else -math.inf


def _minimum(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    if isinstance(a, torch.Tensor):
        return a.clamp(max=b)
    if isinstance(b, torch.Tensor):
        return b.clamp(max=a)
    return min(a, b)


def _no_zero_division(fn):
    """Scalar schedule values make the coefficient formulas plain float arithmetic: turn a division by zero
    (ā = 0 with epsilon prediction, ā = 1 with sample prediction, …) into a ValueError that says why."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZeroDivisionError as e:
            raise ValueError(f"distkern.{fn.__name__}: the schedule values make a coefficient infinite (division by "
                             f"zero: {e}); e.g. alpha_t = 0 with epsilon prediction, or alpha_t = 1 with sample "
                             "prediction, use_clipped_model_output or eta > 0") from None

    return wrapper


def _check_prediction(name: str, prediction_type: str, allowed=PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"distkern.{name}: prediction_type must be one of {list(allowed)}; got {prediction_type!r}")


def _vp_x0_eps(prediction_type: str, alpha_bar: torch.Tensor):
    """Coefficients of x0 = a·x + b·m and eps = c·x + d·m for a variance-preserving x_t = √ā x0 + √(1−ā) ε."""
    al, sg = _sqrt(alpha_bar), _sqrt(1 - alpha_bar)
    one, zero = 1.0, 0.0
    if prediction_type == "epsilon":
        return (1 / al, -sg / al), (zero, one)
    if prediction_type == "sample":
        return (zero, one), (1 / sg, -al / sg)
    return (al, -sg), (sg, al)  # v_prediction


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it (same generator → same numbers,
    same generator state after): a CPU generator draws on the CPU, then the noise moves to ``device``; a list of
    ``B`` generators draws one ``(1, ...)`` slice each."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of generators must have one per sample ({shape[0]}); got "
                             f"{len(generator)}")
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def sampler_step(sample: torch.Tensor, model_output: torch.Tensor, coefs, *, prev_x0: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, seed: int | None = None, offset: int = 0,
                 clip: float | None = None, threshold: tuple[float, float] | None = None,
                 generator=None, _name: str = "sampler_step", _no_noise: bool = False,
                 _host: bool = False):
    """The fused step from its eight coefficients (see the module docstring).

    ``coefs``: a sequence of 8 floats / 0-dim tensors or ``(B,)`` tensors, in the order of ``COEFS``,
    or a ``(B, 8)`` / ``(8,)`` float tensor. Noise, when ``g`` or ``s`` is not zero: ``noise`` if given;
    else drawn with ``generator`` (one, or a list of B) by :func:`randn_tensor`, as diffusers draws (so a
    diffusers loop with the same generator gives the same numbers); else drawn in the kernel from ``(seed, offset)`` (a seed from torch's
    default CPU generator when ``seed`` is None). ``clip``: clamp x0 to ``[-clip, clip]``;
    ``threshold = (ratio, max_value)``: dynamic thresholding (Imagen): per sample,
    ``s = clamp(quantile(|x0|, ratio), 1, max_value)`` and ``x0 = clamp(x0, −s, s) / s``.
    """
    if ((_host or (type(coefs) is list and len(coefs) == 8 and all(type(c) is float for c in coefs)))
            and isinstance(sample, torch.Tensor) and isinstance(model_output, torch.Tensor) and sample.dim() > 0):
        # 8 host floats (the step functions say so with _host), the common step: no tensor is made, straight to
        # the launch (~1 µs of Python)
        return _launch(_name, sample, model_output, prev_x0, noise, seed, offset, clip, threshold, generator, coefs,
                       None, not _no_noise and (coefs[2] != 0.0 or coefs[7] != 0.0))
    op = f"distkern.{_name}"
    if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError(f"{op}: sample and model_output must be tensors")
    if sample.dim() == 0:
        raise ValueError(f"{op}: sample must have a batch dimension (B, ...); got a 0-D tensor")
    B = sample.shape[0]
    # coefficients → either 8 host floats (one for the batch) or a (B, 8) float64 table on the sample's device
    if isinstance(coefs, torch.Tensor):
        table = coefs.to(torch.float64)
    else:
        if len(coefs) != 8:
            raise ValueError(f"{op}: coefs must have 8 entries {COEFS}; got {len(coefs)}")
        if not any(isinstance(c, torch.Tensor) for c in coefs):
            return _launch(_name, sample, model_output, prev_x0, noise, seed, offset, clip, threshold, generator,
                           [float(c) for c in coefs], None,
                           not _no_noise and (float(coefs[2]) != 0.0 or float(coefs[7]) != 0.0))
        devs = {c.device for c in coefs if isinstance(c, torch.Tensor) and (c.dim() > 0 or c.device.type != "cpu")}
        dev = next(iter(devs)) if devs else torch.device("cpu")
        # constants are made on the device by a fill (no host-to-device copy: capturable in a CUDA graph)
        parts = [c.to(device=dev, dtype=torch.float64) if isinstance(c, torch.Tensor)
                 else torch.full((), float(c), dtype=torch.float64, device=dev) for c in coefs]
        if any(p.dim() > 0 for p in parts):
            for p in parts:
                if p.dim() > 1 or (p.dim() == 1 and p.shape[0] not in (1, B)):
                    raise ValueError(f"{op}: a per-sample schedule value must be a (B,) = ({B},) tensor; got shape "
                                     f"{tuple(p.shape)}")
            table = torch.stack([p.reshape(-1).expand(B) for p in parts], 1)
        else:
            table = torch.stack(parts)
    return _step_from_table(op, sample, model_output, table, prev_x0, noise, seed, offset, clip, threshold, generator,
                            _no_noise, _name)


def _step_from_table(op, sample, model_output, table, prev_x0, noise, seed, offset, clip, threshold, generator,
                     no_noise, name):
    B = sample.shape[0]
    if table.dim() == 1:
        if table.shape[0] != 8:
            raise ValueError(f"{op}: coefs must have 8 entries {COEFS}; got shape {tuple(table.shape)}")
        if table.device.type != "cpu":
            table = table[None].expand(B, 8)
    if table.dim() == 2 and table.shape != (B, 8):
        raise ValueError(f"{op}: a coefficient table must be (B, 8) = ({B}, 8); got {tuple(table.shape)}")
    if table.dim() == 1:
        host, per_sample = [float(c) for c in table.tolist()], None
        needs_noise = not no_noise and (host[2] != 0.0 or host[7] != 0.0)
    else:
        if table.device != sample.device and _capturing(sample):
            raise ValueError(f"{op}: under CUDA-graph capture the per-sample coefficients must already be on "
                             f"{sample.device} (a copy from {table.device} cannot be captured); make the "
                             "timesteps / schedule tensors on the sample's device")
        host, per_sample = [], table.to(sample.device).contiguous()
        needs_noise = not no_noise  # else decided per sample inside the kernel; never read back to the host
    return _launch(name, sample, model_output, prev_x0, noise, seed, offset, clip, threshold, generator, host,
                   per_sample, needs_noise)


def _launch(name, sample, model_output, prev_x0, noise, seed, offset, clip, threshold, generator, host, per_sample,
            needs_noise):
    op = f"distkern.{name}"
    clip_mode, clip_range, ratio, max_value = _CLIP_NONE, 1.0, 0.995, 1.0
    if threshold is not None:
        if clip is not None:
            raise ValueError(f"{op}: give clip or threshold, not both")
        ratio, max_value = (float(v) for v in threshold)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{op}: the thresholding ratio must lie in [0, 1]; got {ratio}")
        if not max_value >= 1.0:
            raise ValueError(f"{op}: the thresholding max_value must be ≥ 1; got {max_value}")
        clip_mode = _CLIP_THRESHOLD
    elif clip is not None:
        clip_range = float(clip)
        if not clip_range > 0:
            raise ValueError(f"{op}: clip must be > 0; got {clip_range}")
        clip_mode = _CLIP_CLAMP
    seed_i = -1
    if needs_noise and noise is None:
        if generator is not None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        elif seed is None:
            if torch.compiler.is_compiling():  # a seed read from a tensor would be data-dependent in the graph
                raise ValueError(f"{op}: under torch.compile the in-kernel noise needs seed= (an int), noise= or "
                                 "generator=; seed=None draws it from torch's generator at call time")
            if _capturing(sample):  # the seed drawn now would be baked into the graph: every replay, same noise
                raise ValueError(f"{op}: under CUDA-graph capture seed=None would fix the in-kernel noise at capture "
                                 "time, so every replay would draw the same numbers; pass noise= drawn on the device "
                                 "inside the graph (torch.randn: its generator advances per replay), or seed= "
                                 "to fix the noise on purpose")
            seed_i = int(torch.randint(0, 2**62, (1,)).item())  # CPU default generator: no device sync
        else:
            seed_i = int(seed)
    if seed_i < -1 or (seed is not None and not 0 <= int(seed) < 2**63):
        raise ValueError(f"{op}: seed must be an int in [0, 2**63); got {seed}")
    if not 0 <= int(offset) < 2**63:
        raise ValueError(f"{op}: offset must be an int in [0, 2**63); got {offset}")
    if not needs_noise:
        noise = None
    return _call_op(sample, model_output, prev_x0, noise, host, per_sample, clip_mode, clip_range, ratio, max_value,
                    seed_i, int(offset))


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor and its device's current stream is capturing a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _call_op(*args):
    return torch.ops.distkern.sampler_step.default(*args)


_NOISE_KW = ("noise", "seed", "offset", "generator")
_NOISE_SET = frozenset(_NOISE_KW)


def _noise_kw(kw):
    if kw and not kw.keys() <= _NOISE_SET:
        unknown = sorted(set(kw) - _NOISE_SET)
        raise TypeError(f"distkern: unexpected keyword argument(s) {unknown}; the noise arguments are {list(_NOISE_KW)}")
    return kw


def _quiet(kw):
    """A step whose noise coefficients are zero: no noise is read, drawn or seeded (no RNG side effect)."""
    return {"offset": kw.get("offset", 0), "_no_noise": True}


def _clip_kw(clip_sample, thresholding):
    return {"clip": clip_sample, "threshold": thresholding}


@_no_zero_division
def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, alpha_prev, *, eta: float = 0.0,
              prediction_type: str = "epsilon", clip_sample: float | None = None,
              thresholding: tuple[float, float] | None = None, use_clipped_model_output: bool = False, **noise_kw):
    r"""One DDIM step from ``ā_t`` (``alpha_t``) to ``ā_prev`` (``alpha_prev``), as diffusers' ``DDIMScheduler``.

    ``σ = η·√((1−ā′)/(1−ā)·(1−ā/ā′))`` and ``x′ = √ā′·x0 + √(1−ā′−σ²)·ε + σ·noise``. With ``eta=0`` and
    ``alpha_prev`` the *next* (noisier) ``ā`` this is the DDIM inversion step (``DDIMInverseScheduler``).
    ``use_clipped_model_output`` recomputes ε from the clipped x0, as diffusers does.
    Returns ``(prev_sample, pred_original_sample)``.
    """
    _check_prediction("ddim_step", prediction_type)
    at, ap = _val(alpha_t, "ddim_step", "alpha_t", 0, 1), _val(alpha_prev, "ddim_step", "alpha_prev", 0, 1)
    (a, b), (c, d) = _vp_x0_eps(prediction_type, at)
    std = float(eta) * _sqrt((1 - ap) / (1 - at) * (1 - at / ap)) if eta else 0.0
    direction = _sqrt(1 - ap - std**2)
    if use_clipped_model_output:  # ε = (x − √ā x0)/√(1−ā)
        sg = _sqrt(1 - at)
        p, r, w = _sqrt(ap) - direction * _sqrt(at) / sg, direction / sg, 0.0
    else:
        p, r, w = _sqrt(ap), direction * c, direction * d
    zero = 0.0
    noise_kw = _noise_kw(noise_kw)
    if not eta:
        noise_kw = _quiet(noise_kw)
    return sampler_step(sample, model_output, [a, b, zero, p, r, w, zero, std], _name="ddim_step",
                        _host=type(at) is float and type(ap) is float and type(std) is float,
                        **_clip_kw(clip_sample, thresholding), **noise_kw)


@_no_zero_division
def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, alpha_prev, *,
              prediction_type: str = "epsilon", variance_type: str = "fixed_small", clip_sample: float | None = None,
              thresholding: tuple[float, float] | None = None, add_noise=True, **noise_kw):
    r"""One DDPM ancestral step from ``ā_t`` to ``ā_prev``, as diffusers' ``DDPMScheduler`` (posterior mean
    ``√ā′β_t/(1−ā)·x0 + √α_t(1−ā′)/(1−ā)·x_t`` plus ``std·noise``).

    ``variance_type``: ``"fixed_small"`` / ``"fixed_small_log"`` (β̃_t = (1−ā′)/(1−ā)·β_t) or
    ``"fixed_large"`` / ``"fixed_large_log"`` (β_t). ``add_noise``: False (or a ``(B,)`` bool tensor)
    drops the noise, as diffusers does at ``t = 0``. Returns ``(prev_sample, pred_original_sample)``.
    """
    _check_prediction("ddpm_step", prediction_type)
    at, ap = _val(alpha_t, "ddpm_step", "alpha_t", 0, 1), _val(alpha_prev, "ddpm_step", "alpha_prev", 0, 1)
    (a, b), _ = _vp_x0_eps(prediction_type, at)
    alpha = at / ap
    beta = 1 - alpha
    p = _sqrt(ap) * beta / (1 - at)
    r = _sqrt(alpha) * (1 - ap) / (1 - at)
    if variance_type in ("fixed_small", "fixed_small_log"):
        var = (1 - ap) / (1 - at) * beta
        var = var.clamp(min=1e-20) if isinstance(var, torch.Tensor) else max(var, 1e-20)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        var = beta
    else:
        raise ValueError("distkern.ddpm_step: variance_type must be fixed_small, fixed_small_log, fixed_large or "
                         f"fixed_large_log (learned variances need the model's variance channels); got {variance_type!r}")
    std = _sqrt(var)
    if isinstance(add_noise, torch.Tensor):
        std = _as_t(std) * add_noise.to(dtype=torch.float64)
    elif not add_noise:
        std = 0.0
    zero = 0.0
    noise_kw = _noise_kw(noise_kw)
    if not isinstance(add_noise, torch.Tensor) and not add_noise:
        noise_kw = _quiet(noise_kw)
    return sampler_step(sample, model_output, [a, b, zero, p, r, zero, zero, std], _name="ddpm_step",
                        **_clip_kw(clip_sample, thresholding), **noise_kw)


@_no_zero_division
def euler_step(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_next, *,
               prediction_type: str = "epsilon", gamma=0.0, s_noise: float = 1.0, ancestral: bool = False,
               eta: float = 1.0, **noise_kw):
    r"""One Euler step of the probability-flow ODE in σ-space (``x = x0 + σ·ε``), as diffusers'
    ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` and k-diffusion's ``sample_euler``.

    Churn (``gamma > 0``; a float, or a ``(B,)`` tensor for per-sample churn, e.g. gated by ``s_tmin ≤ σ ≤ s_tmax``):
    ``σ̂ = σ(1+γ)``, ``x̂ = x + s_noise·√(σ̂²−σ²)·noise``, then
    ``x′ = x̂ + (x̂ − x0)/σ̂ · (σ_next − σ̂)``. Ancestral: ``σ_up = min(σ_next, η·√(σ_next²(σ²−σ_next²)/σ²))``,
    ``σ_down = √(σ_next² − σ_up²)``, ``x′ = x + (x − x0)/σ · (σ_down − σ) + σ_up·noise``.
    ``model_output`` is the output for the scaled input ``x/√(σ²+1)``; x0 is ``x − σ̂·ε`` (epsilon),
    ``−σ/√(σ²+1)·v + x/(σ²+1)`` (v_prediction) or the output (sample).
    Returns ``(prev_sample, pred_original_sample)``.
    """
    churn = isinstance(gamma, torch.Tensor) or bool(gamma)
    _check_prediction("euler_step", prediction_type)
    sg, sn = _val(sigma, "euler_step", "sigma"), _val(sigma_next, "euler_step", "sigma_next")
    zero = 0.0
    noise_kw = _noise_kw(noise_kw)
    if ancestral:
        if churn:
            raise ValueError("distkern.euler_step: churn (gamma) and ancestral noise are exclusive")
        sigma_hat, k = sg, zero
        up = _minimum(_sqrt(sn**2 * (sg**2 - sn**2) / sg**2) * float(eta), sn)
        down = _sqrt(sn**2 - up**2)
        dt = down - sigma_hat
        s_up = up
    else:
        sigma_hat = sg * (1 + (_val(gamma) if isinstance(gamma, torch.Tensor) else float(gamma)))
        k = float(s_noise) * _sqrt(sigma_hat**2 - sg**2)
        dt = sn - sigma_hat
        s_up = zero
    if prediction_type == "epsilon":
        a, b = 1.0, -sigma_hat
    elif prediction_type == "v_prediction":
        a, b = 1 / (sg**2 + 1), -sg / _sqrt(sg**2 + 1)
    else:
        a, b = zero, 1.0
    h = dt / sigma_hat
    p, r = -h, 1 + h
    s = (1 + h) * k + s_up
    g = a * k
    if not ancestral and not churn:
        noise_kw = _quiet(noise_kw)
    return sampler_step(sample, model_output, [a, b, g, p, r, zero, zero, s], _name="euler_step",
                        _host=type(sg) is float and type(sn) is float and not isinstance(gamma, torch.Tensor),
                        **noise_kw)


@_no_zero_division
def dpmpp_2m_step(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_next, *, prev_x0=None,
                  sigma_prev=None, prediction_type: str = "epsilon", solver_type: str = "midpoint",
                  algorithm_type: str = "dpmsolver++", thresholding: tuple[float, float] | None = None, **noise_kw):
    r"""One DPM-Solver++ step (first order without ``prev_x0``, second order "2M" with it), as diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` or ``"sde-dpmsolver++"``.

    σ's are diffusers' ``√((1−ā)/ā)``; ``α_t = 1/√(σ²+1)``, ``σ_t = σ·α_t``, ``λ = log α_t − log σ_t``,
    ``h = λ_next − λ``. Data prediction ``x0`` (thresholded if asked), then
    ``x′ = (σ_t′/σ_t)·x − α_t′(e^{−h}−1)·D`` with ``D = x0`` (first order) or
    ``D = x0 + ½(x0 − x0_prev)/r`` (midpoint; ``r = (λ − λ_prev)/h``); the Heun solver and the SDE variant
    as in diffusers. ``prev_x0`` is the ``pred_original_sample`` this function returned at the previous
    step (at ``sigma_prev``). Returns ``(prev_sample, pred_original_sample)``.
    """
    _check_prediction("dpmpp_2m_step", prediction_type)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"distkern.dpmpp_2m_step: solver_type must be 'midpoint' or 'heun'; got {solver_type!r}")
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError("distkern.dpmpp_2m_step: algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++'; got "
                         f"{algorithm_type!r}")
    if (prev_x0 is None) != (sigma_prev is None):
        raise ValueError("distkern.dpmpp_2m_step: a second-order step needs both prev_x0 and sigma_prev")

    def alpha_sigma(s):
        s = _val(s, "dpmpp_2m_step", "sigma")
        al = 1 / _sqrt(s**2 + 1)
        return al, s * al

    a_s, s_s = alpha_sigma(sigma)
    a_t, s_t = alpha_sigma(sigma_next)
    lam_s, lam_t = _log(a_s) - _log(s_s), _log(a_t) - _log(s_t)
    h = lam_t - lam_s
    (a, b), _ = _vp_x0_eps(prediction_type, a_s**2)
    zero = 0.0
    e = _exp(-h)
    sde = algorithm_type == "sde-dpmsolver++"
    if sde:
        r = s_t / s_s * e
        c0 = a_t * (1 - _exp(-2 * h))  # coefficient of D0
        s = s_t * _sqrt(-_expm1(-2 * h))
    else:
        r = s_t / s_s
        c0 = -a_t * _expm1(-h)
        s = zero
    p, u = c0, zero
    if prev_x0 is not None:
        if not isinstance(h, torch.Tensor) and math.isinf(h):
            raise ValueError("distkern.dpmpp_2m_step: a second-order step to sigma_next = 0 is undefined; take the "
                             "last step with first order (no prev_x0), as diffusers' lower_order_final does")
        a_p, s_p = alpha_sigma(sigma_prev)
        r0 = (lam_s - (_log(a_p) - _log(s_p))) / h
        if solver_type == "midpoint":
            c1 = 0.5 * c0
        elif sde:
            c1 = a_t * ((1 - _exp(-2 * h)) / (-2 * h) + 1)
        else:
            c1 = a_t * (_expm1(-h) / h + 1)
        # D1 = (x0 − x0_prev)/r0
        p, u = c0 + c1 / r0, -c1 / r0
    noise_kw = _noise_kw(noise_kw)
    if not sde:
        noise_kw = _quiet(noise_kw)
    return sampler_step(sample, model_output, [a, b, zero, p, r, zero, u, s], prev_x0=prev_x0,
                        _name="dpmpp_2m_step", threshold=thresholding, **noise_kw)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian score approximation: closed-form denoiser and probability-flow teleport

class LowRankGaussian(tuple):
    """``(mean (D,), U (D, r) orthonormal columns, lam (r,) variances)`` of ``N(mean, U diag(lam) Uᵀ)``."""

    __slots__ = ()

    def __new__(cls, mean: torch.Tensor, U: torch.Tensor, lam: torch.Tensor):
        return super().__new__(cls, (mean, U, lam))

    mean = property(lambda self: self[0])
    U = property(lambda self: self[1])
    lam = property(lambda self: self[2])

    def to(self, *args, **kwargs) -> "LowRankGaussian":
        return LowRankGaussian(*(t.to(*args, **kwargs) for t in self))


def fit_lowrank_gaussian(data, rank: int | None = None, *, energy: float | None = None, min_variance: float = 0.0,
                         progress: bool = False, dtype: torch.dtype = torch.float32) -> LowRankGaussian:
    """Fit ``N(μ, U diag(λ) Uᵀ)`` to data: ``(N, ...)`` samples (flattened per sample), an iterable of such
    batches (a DataLoader, streamed through :class:`distkern.gaussian.GaussianStats` in float64 with a
    progress bar when ``progress``), or a fitted ``GaussianStats``. Keeps the ``rank`` leading
    eigen-directions (all by default), or the fewest that explain ``energy`` of the total variance, and
    drops eigenvalues ≤ ``min_variance``. The covariance is the maximum-likelihood one (divided by N). Returns
    float64-accurate factors cast to ``dtype``.
    """
    from ..gaussian import GaussianStats, eigendecomposition

    if isinstance(data, GaussianStats):
        stats = data
    elif isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise ValueError(f"distkern.fit_lowrank_gaussian: data must be (N, ...) samples; got shape {tuple(data.shape)}")
        stats = GaussianStats(fourth_moments=False).update(data.reshape(data.shape[0], -1))
    else:
        def flat(b):  # a batch, or an (x, labels, ...) tuple from a DataLoader: its samples are x
            x = b[0] if isinstance(b, (tuple, list)) else b
            return x.reshape(x.shape[0], -1)

        stats = GaussianStats(fourth_moments=False).fit((flat(b) for b in data), progress=progress)
    lam, U = eigendecomposition(stats.covariance())
    keep = lam > min_variance
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"distkern.fit_lowrank_gaussian: energy must lie in (0, 1]; got {energy}")
        frac = lam.clamp(min=0).cumsum(0) / lam.clamp(min=0).sum()
        k = int((frac < energy).sum()) + 1
        keep[k:] = False
    if rank is not None:
        if rank < 1:
            raise ValueError(f"distkern.fit_lowrank_gaussian: rank must be ≥ 1; got {rank}")
        keep[rank:] = False
    idx = keep.nonzero().squeeze(1)
    return LowRankGaussian(stats.mean.to(dtype), U[:, idx].to(dtype), lam[idx].to(dtype))


def _sigma_t(v, x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v if v.dim() == 0 and v.device.type == "cpu" else v.to(x.device)
    return torch.tensor(float(v), dtype=torch.float64)


def _unpack_gaussian(name, gaussian, mean, U, lam):
    if gaussian is not None:
        if not isinstance(gaussian, (tuple, list)) or len(gaussian) != 3:
            raise ValueError(f"distkern.{name}: gaussian must be a (mean, U, lam) triple; got "
                             f"{type(gaussian).__name__}" + (f" of {len(gaussian)}" if isinstance(gaussian, (tuple, list))
                                                             else ""))
        mean, U, lam = gaussian
    if mean is None or U is None or lam is None:
        raise ValueError(f"distkern.{name}: give the Gaussian as gaussian=(mean, U, lam) or mean=, U=, lam=")
    return mean, U, lam


def gaussian_denoise(x: torch.Tensor, sigma, gaussian=None, *, mean=None, U=None, lam=None) -> torch.Tensor:
    r"""The optimal denoiser of ``N(μ, U diag(λ) Uᵀ)`` at noise level σ:
    ``D(x, σ) = μ + U diag(λ/(λ+σ²)) Uᵀ(x − μ)`` ("The Unreasonable Effectiveness of Gaussian Score
    Approximation for Diffusion Models").

    ``x``: ``(B, ...)`` with ``D`` features per sample; ``sigma``: a float, 0-d or ``(B,)`` tensor (VE σ,
    ``x = x0 + σ·ε``); the Gaussian as ``gaussian=(mean, U, lam)`` (e.g. from :func:`fit_lowrank_gaussian`)
    or keywords. Returns ``(B, ...)`` in x's dtype (computed in float32, float64 for float64).
    Differentiable in every tensor argument.
    """
    mean, U, lam = _unpack_gaussian("gaussian_denoise", gaussian, mean, U, lam)
    return torch.ops.distkern.gaussian_lowrank(x, mean, U, lam, _sigma_t(sigma, x), None)


def gaussian_teleport(x_T: torch.Tensor, sigma_T, sigma_t, gaussian=None, *, mean=None, U=None,
                      lam=None) -> torch.Tensor:
    r"""Closed-form solution of the probability-flow ODE of ``N(μ, U diag(λ) Uᵀ)`` from σ_T to σ_t:
    ``x_t = μ + U diag(√((σ_t²+λ)/(σ_T²+λ))) Uᵀ(x_T − μ) + (σ_t/σ_T)·(x_T − μ − U Uᵀ(x_T − μ))``.

    Used to skip the early, nearly-Gaussian part of sampling (analytical teleportation): jump from
    σ_max to σ_skip, then continue with a sampler. Shapes as :func:`gaussian_denoise`.
    """
    mean, U, lam = _unpack_gaussian("gaussian_teleport", gaussian, mean, U, lam)
    if not isinstance(sigma_T, torch.Tensor) and not float(sigma_T) > 0:
        raise ValueError(f"distkern.gaussian_teleport: sigma_T must be > 0 (the map divides by it); got {sigma_T}")
    return torch.ops.distkern.gaussian_lowrank(x_T, mean, U, lam, _sigma_t(sigma_T, x_T), _sigma_t(sigma_t, x_T))


# ---------------------------------------------------------------------------------------------------------------
# float64 reference of the fused op (the tests compare the kernels with it)

def _philox_normals(n: int, seed: int, offset: int) -> torch.Tensor:
    """The in-kernel noise: Philox4x32-10 keyed by ``seed`` at counter ``(i // 4, offset)``, Box-Muller."""
    import numpy as np

    M0, M1, W0, W1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    mask = np.uint64(0xFFFFFFFF)
    groups = (n + 3) // 4
    idx = np.arange(groups, dtype=np.uint64)
    c0, c1 = idx & mask, (idx >> np.uint64(32)) & mask
    c2 = np.full(groups, np.uint64(offset) & mask, dtype=np.uint64)
    c3 = np.full(groups, (np.uint64(offset) >> np.uint64(32)) & mask, dtype=np.uint64)
    k0, k1 = np.uint64(seed) & mask, (np.uint64(seed) >> np.uint64(32)) & mask
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & mask, p1 >> np.uint64(32), p1 & mask
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & mask, lo1, (hi0 ^ c3 ^ k1) & mask, lo0
        k0, k1 = (k0 + W0) & mask, (k1 + W1) & mask
    u = [(c.astype(np.float64) + 0.5) * 2.0**-32 for c in (c0, c1, c2, c3)]
    rad0, rad1 = np.sqrt(-2 * np.log(u[0])), np.sqrt(-2 * np.log(u[2]))
    th0, th1 = 2 * np.pi * u[1], 2 * np.pi * u[3]
    out = np.stack([rad0 * np.cos(th0), rad0 * np.sin(th0), rad1 * np.cos(th1), rad1 * np.sin(th1)], 1)
    return torch.from_numpy(out.reshape(-1)[:n].copy())


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    return torch.quantile(v, q, dim=1)


def sampler_step_reference(sample, model_output, prev_x0, noise, coefs, per_sample, clip_mode=0, clip_range=1.0,
                           ratio=0.995, max_value=1.0, seed=-1, offset=0):
    """float64 eager evaluation of ``torch.ops.distkern.sampler_step`` (same arguments)."""
    B = sample.shape[0]
    x, m = sample.double().reshape(B, -1), model_output.double().reshape(B, -1)
    n_el = x.shape[1]
    tab = per_sample.double().cpu() if per_sample is not None else torch.tensor(coefs, dtype=torch.float64)[None]
    a, b, g, p, r, w, u, s = (tab[:, i:i + 1].to(x.device) for i in range(8))
    if noise is not None:
        nz = noise.double().reshape(B, -1)
    elif seed >= 0:
        nz = _philox_normals(B * n_el, seed, offset).reshape(B, -1).to(x.device)
    else:
        nz = torch.zeros_like(x)
    x0 = a * x + b * m + g * nz
    if clip_mode == _CLIP_CLAMP:
        x0 = x0.clamp(-clip_range, clip_range)
    elif clip_mode == _CLIP_THRESHOLD:
        th = _quantile(x0.abs(), ratio).clamp(1.0, max_value)[:, None]
        x0 = torch.maximum(torch.minimum(x0, th), -th) / th
    prev = p * x0 + r * x + w * m + s * nz
    if prev_x0 is not None:
        prev = prev + u * prev_x0.double().reshape(B, -1)
    return prev.reshape(sample.shape), x0.reshape(sample.shape)


# ---------------------------------------------------------------------------------------------------------------
# fake and autograd registrations

@torch.library.register_fake("distkern::sampler_step")
def _fake(sample, model_output, prev_x0, noise, coefs, per_sample, clip_mode=0, clip_range=1.0, ratio=0.995,
          max_value=1.0, seed=-1, offset=0):
    same_device("distkern.sampler_step", sample=sample, model_output=model_output, prev_x0=prev_x0, noise=noise,
                per_sample=per_sample)
    torch._check(model_output.shape == sample.shape, lambda: "distkern.sampler_step: model_output must match sample")
    return torch.empty_like(sample, memory_format=torch.contiguous_format), \
        torch.empty_like(sample, memory_format=torch.contiguous_format)


# Autograd of sampler_step is registered in C++ (csrc/diffusion/step_autograd.cpp): a Python autograd wrapper
# costs more than the kernel for one image's latents.


@torch.library.register_fake("distkern::sampler_step_backward")
def _fake_backward(grad_prev, grad_x0, sample, model_output, noise, coefs, per_sample, clip_mode=0, clip_range=1.0,
                   seed=-1, offset=0):
    same_device("distkern.sampler_step_backward", grad_prev=grad_prev, grad_x0=grad_x0, sample=sample,
                model_output=model_output, noise=noise)
    e = torch.empty_like(sample, memory_format=torch.contiguous_format)
    return e, torch.empty_like(e), torch.empty_like(e)
