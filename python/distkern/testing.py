"""Checks a method plugin can run on itself, like scikit-learn's ``check_estimator``.

``check_method(MyMethod)`` (a class, or an instance) runs the contract of the method's ``kind`` on a small
synthetic problem; each broken rule raises :class:`CheckFailure` naming the rule, and the names of the
rules passed are returned. The rules of every kind start with

=========================  ===================================================================
declaration                ``name`` (non-empty str), ``kind`` (one of the four), ``distkern_api`` = the API version
construct                  (only fails) an instance can be made: ``cls.example_instance()`` if the class has it,
                           else ``cls()``; an instance given to ``check_method`` is deep-copied instead
=========================  ===================================================================

**Detectors** (``kind = "detector"``): data from the ``example`` argument, else the class's
``example_data(generator)`` (an :class:`Example`; a detector whose features are not plain ``(N, D)`` vectors
— feature maps, logits — provides one), else Gaussian vectors (with class labels when the method asks).

=========================  ===================================================================
score-before-fit           ``score`` before ``fit`` raises (unless the class sets ``requires_fit = False``)
fit-returns-self           ``fit`` returns the detector
score-shape                ``score`` → floating ``(N,)`` tensor, finite on finite input, on the input's device
higher-is-anomalous        anomalous examples outscore normal ones (AUROC > 0.9)
no-mutation                ``fit`` and ``score`` leave their inputs unchanged
reproducible               with ``torch.manual_seed(seed)`` before each, two fits of fresh instances on the same
                           data give the same scores
save-load                  ``save`` / ``load(path, device="cpu")`` round trip gives the same scores
refuses-other-file         ``load`` refuses a model file of another method with ``ValueError``
clear-input-errors         a 5-D tensor in ``score`` raises ``ValueError`` or ``TypeError``
other-dtypes               features in float64 score within 1e-3 of the float32 scores, and in bfloat16 give
                           finite scores that still rank anomalies higher (AUROC > 0.9) — or ``score`` refuses
                           the dtype with ``TypeError``
device                     with a GPU: ``to("cuda")`` scores CUDA inputs like the CPU does
=========================  ===================================================================

**Losses** (``kind = "loss"``): inputs from ``example_data(generator)`` (a tuple of ``forward``'s positional
arguments), else two Gaussian batches ``x (64, 8)``, ``y (48, 8)`` (shifted).

=========================  ===================================================================
is-module                  the instance is a ``torch.nn.Module``
scalar                     ``forward`` returns a 0-dim floating tensor
finite                     ... that is finite
no-mutation                ``forward`` and ``backward`` leave the inputs unchanged
differentiable             ``backward`` gives finite gradients to every floating input (or to the positions in
                           the class attribute ``differentiable_inputs``)
reproducible               with ``torch.manual_seed(seed)`` before construction and call, two runs agree
clear-input-errors         bad inputs raise ``ValueError`` / ``TypeError``: ``example_bad_inputs(generator)``
                           (a list of argument tuples), else the first input as a 0-dim tensor and, with
                           several inputs, the first with one more feature column
device                     with a GPU: ``.to("cuda")`` on CUDA inputs gives the CPU value
=========================  ===================================================================

**Samplers** (``kind = "sampler"``, diffusers-style schedulers): data from ``example_data(generator)`` (a
:class:`SamplerExample`), else a ``(2, 3, 8, 8)`` Gaussian sample, 10 steps and the fixed fake model
``0.5·tanh(x)``. A loop is ``set_timesteps(n)``, ``x = sample · init_noise_sigma``, then for ``t`` in
``timesteps``: ``x = step(model(scale_model_input(x, t), t), t, x).prev_sample``.

=========================  ===================================================================
step-before-set-timesteps  ``step`` before ``set_timesteps`` raises
set-timesteps              ``set_timesteps(n)`` makes ``timesteps`` a non-empty 1-D sequence of finite numbers
step-output                ``step(...)`` returns an object whose ``.prev_sample`` has the sample's shape, dtype
                           and device, and is finite
no-mutation                ``step`` leaves ``model_output`` and ``sample`` unchanged
loop-finite                a whole loop ends in a finite sample of the input's shape
reproducible               with ``torch.manual_seed(seed)``, two loops of fresh instances agree
config-round-trip          (when the class has ``from_config`` and instances ``config``) ``from_config(config)``
                           gives the same ``config`` and the same loop
other-dtypes               a loop on a float64 sample stays float64 and ends within 1e-4 of the float32 loop; on
                           a bfloat16 sample it stays bfloat16 and ends finite — or ``step`` refuses the dtype
                           with ``TypeError``
device                     with a GPU: ``set_timesteps(n, device="cuda")`` and a CUDA loop give the CPU result
=========================  ===================================================================

**Aligners** (``kind = "aligner"``): ``forward(patch_tokens (B, P, D) or (L, B, P, D) of L layers,
conditioning (prompt or image embeddings)) -> (maps (B, P), scores (B,))``; inputs from
``example_data(generator)`` (a tuple), else tokens ``(2, 16, 32)`` and prompts ``(2, 32)`` (normal, abnormal).

=========================  ===================================================================
is-module                  the instance is a ``torch.nn.Module``
output-shapes              ``forward`` returns a pair of floating tensors ``(B, P)`` and ``(B,)``
finite                     ... that are finite
no-mutation                ``forward`` and ``backward`` leave the inputs unchanged
differentiable             ``backward`` of ``maps.sum() + scores.sum()`` gives finite gradients to the floating
                           inputs (or to ``differentiable_inputs``)
reproducible               with ``torch.manual_seed(seed)`` before construction and call, two runs agree
clear-input-errors         tokens without their batch dimension ``(P, D)`` and prompts with another ``D`` raise
                           ``ValueError`` / ``TypeError`` (or the class's ``example_bad_inputs(generator)``)
device                     with a GPU: ``.to("cuda")`` on CUDA inputs gives the CPU maps and scores
=========================  ===================================================================
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import tempfile
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["CheckFailure", "Example", "SamplerExample", "check_method", "gaussian_example", "fake_model", "RULES"]

RULES = {
    "detector": ("declaration", "score-before-fit", "fit-returns-self", "score-shape", "higher-is-anomalous",
                 "no-mutation", "reproducible", "save-load", "refuses-other-file", "clear-input-errors",
                 "other-dtypes", "device"),
    "loss": ("declaration", "is-module", "scalar", "finite", "no-mutation", "differentiable", "reproducible",
             "clear-input-errors", "device"),
    "sampler": ("declaration", "step-before-set-timesteps", "set-timesteps", "step-output", "no-mutation",
                "loop-finite", "reproducible", "config-round-trip", "other-dtypes", "device"),
    "aligner": ("declaration", "is-module", "output-shapes", "finite", "no-mutation", "differentiable",
                "reproducible", "clear-input-errors", "device"),
}
"""The rules of each kind, in the order they are checked (``construct`` can fail before any of them but
other than ``declaration``; ``device`` runs only with a GPU, ``config-round-trip`` only where it applies)."""


class CheckFailure(AssertionError):
    """A method broke a rule of its kind's contract; ``rule`` names it."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


class Example(NamedTuple):
    """Data for a detector check: fit on ``train`` (with ``labels`` when not None); ``normal`` and
    ``anomalous`` are scored and must be told apart."""

    train: Any
    labels: torch.Tensor | None
    normal: Any
    anomalous: Any


class SamplerExample(NamedTuple):
    """Data for a sampler check: the initial ``sample`` ``(B, ...)`` (unit Gaussian; multiplied by the
    scheduler's ``init_noise_sigma``), the ``num_inference_steps`` of a loop, and the ``model(x, t)`` giving
    the model output (None: :func:`fake_model`)."""

    sample: torch.Tensor
    num_inference_steps: int = 10
    model: Callable[[torch.Tensor, Any], torch.Tensor] | None = None


def fake_model(x: torch.Tensor, t: Any = None) -> torch.Tensor:
    """The fixed fake denoiser of the sampler checks: ``0.5·tanh(x)`` (bounded, deterministic)."""
    return 0.5 * torch.tanh(x)


def gaussian_example(gen: torch.Generator, *, n: int = 400, d: int = 8, classes: int | None = None) -> Example:
    """Gaussian vectors: one cluster (or ``classes`` labelled ones); anomalies lie far outside."""
    k = classes or 1
    centers = 6.0 * torch.randn(k, d, generator=gen)
    mix = torch.randn(d, d, generator=gen) / d ** 0.5 + torch.eye(d)
    lab = torch.arange(n) % k

    def draw(m, labels):
        return centers[labels] + torch.randn(m, d, generator=gen) @ mix

    train = draw(n, lab)
    normal = draw(200, torch.arange(200) % k)
    anomalous = 4.0 * torch.randn(200, d, generator=gen) + 20.0 * torch.randn(1, d, generator=gen)
    return Example(train, lab if classes else None, normal, anomalous)


# ---------------------------------------------------------------------------------------------
# Helpers on nested inputs
# ---------------------------------------------------------------------------------------------


def _rebuild(obj, items):
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return _rebuild(obj, [_map(o, fn) for o in obj])
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _clone(obj):
    return _map(obj, lambda t: t.detach().clone())


def _to(obj, device):
    return _map(obj, lambda t: t.to(device))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.detach().nan_to_num(0.5),
                                                                                 b.detach().nan_to_num(0.5))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True


def _close(a, b, rtol=1e-5, atol=1e-6) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.allclose(a.detach().cpu().double(), b.detach().cpu().double(), rtol=rtol, atol=atol,
                                   equal_nan=True))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    return f"{type(v).__name__} {v!r}"[:120]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class _Ctx:
    """What every kind's check shares: the class, a factory of fresh instances, the rule recorder."""

    def __init__(self, method, seed: int):
        self.cls = method if inspect.isclass(method) else type(method)
        self.proto = None if inspect.isclass(method) else method
        self.seed = seed
        self.passed: list[str] = []
        self.label = getattr(self.cls, "name", None) or self.cls.__name__

    def rule(self, name: str, ok: bool, msg: str) -> None:
        if not ok:
            raise CheckFailure(name, f"{self.label}: {msg}")
        if name not in self.passed:  # a rule may be several checks
            self.passed.append(name)

    def fail(self, name: str, msg: str, cause: BaseException | None = None):
        raise CheckFailure(name, f"{self.label}: {msg}") from cause

    def make(self, seed: int | None = None):
        """A fresh instance (torch seeded first, so random initialisation is reproducible)."""
        if seed is not None:
            torch.manual_seed(seed)
        try:
            if self.proto is not None:
                return copy.deepcopy(self.proto)
            factory = getattr(self.cls, "example_instance", None)
            return factory() if callable(factory) else self.cls()
        except Exception as e:  # noqa: BLE001
            self.fail("construct", f"cannot make an instance to check ({_err(e)}); give the class an "
                                   "example_instance() classmethod, or pass an instance to check_method", e)

    def data(self, default: Callable[[torch.Generator], Any], example=None):
        if example is not None:
            return example
        gen = torch.Generator().manual_seed(self.seed)
        hook = getattr(self.cls, "example_data", None)
        return hook(gen) if callable(hook) else default(gen)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def check_method(method, *, example: Any = None, seed: int = 0) -> list[str]:
    """Run the contract checks of ``method`` (a class, or an instance to copy) for its ``kind`` and return
    the names of the rules it passed; raise :class:`CheckFailure` at the first broken rule.

    ``example``: the data to use instead of the class's ``example_data(generator)`` or the default (an
    :class:`Example` for a detector, a tuple of inputs for a loss or an aligner, a :class:`SamplerExample`
    for a sampler).
    """
    from .methods import API_VERSION, KINDS

    ctx = _Ctx(method, seed)
    cls = ctx.cls
    name, kind, api = getattr(cls, "name", None), getattr(cls, "kind", None), getattr(cls, "distkern_api", None)
    ctx.rule("declaration", isinstance(name, str) and bool(name) and kind in KINDS and api == API_VERSION,
             f"needs class attributes name (non-empty str), kind (one of {KINDS}) and distkern_api = {API_VERSION}; "
             f"got name={name!r}, kind={kind!r}, distkern_api={api!r}")
    if kind == "detector":  # the interface distkern fit / score call, named before any of it is used
        missing = [m for m in ("fit", "score", "save", "load") if not callable(getattr(cls, m, None))]
        ctx.rule("declaration", not missing, f"a detector needs callable fit, score, save and load (a classmethod "
                                             f"load(path, device='cpu')); missing: {', '.join(missing)}")
    check = {"detector": _check_detector, "loss": _check_loss, "sampler": _check_sampler,
             "aligner": _check_aligner}[kind]
    check(ctx, example)
    return ctx.passed


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


def _fit(det, ex: Example):
    return det.fit(ex.train, ex.labels) if ex.labels is not None else det.fit(ex.train)


def _detector_example(ctx: _Ctx) -> Example:
    gen = torch.Generator().manual_seed(ctx.seed)
    if hasattr(ctx.cls, "example_data"):
        return ctx.cls.example_data(gen)
    ex = gaussian_example(gen)
    try:
        _fit(ctx.make(), ex)
        return ex
    except CheckFailure:
        raise
    except Exception as e:  # noqa: BLE001 - a method that needs labels says so in its error
        if "label" in str(e).lower():
            return gaussian_example(gen, classes=3)
        raise CheckFailure("fit", f"{ctx.label}: fit on Gaussian vectors (N=400, D=8) failed: {type(e).__name__}: "
                                  f"{e}; give the class an example_data(generator) or pass example=") from e


def _auroc(scores_neg: torch.Tensor, scores_pos: torch.Tensor) -> float:
    from .metrics import auroc

    s = torch.cat([scores_neg, scores_pos]).detach().cpu()
    y = torch.cat([torch.zeros(len(scores_neg)), torch.ones(len(scores_pos))])
    return auroc(s, y)


def _check_detector(ctx: _Ctx, example) -> None:
    cls, rule = ctx.cls, ctx.rule
    ex = example if example is not None else _detector_example(ctx)
    gen = torch.Generator().manual_seed(ctx.seed + 1)

    if getattr(cls, "requires_fit", True):
        try:
            ctx.make().score(ex.normal)
            raised = False
        except CheckFailure:
            raise
        except Exception:  # noqa: BLE001 - any clear error will do
            raised = True
        rule("score-before-fit", raised, "score() before fit() must raise (say 'fit first')")

    before = _clone(ex)
    det = ctx.make(ctx.seed)  # seeded as for det2 below: a fit may draw from torch's generator
    rule("fit-returns-self", _fit(det, ex) is det, "fit() must return the detector (self)")
    s_norm, s_anom = det.score(ex.normal), det.score(ex.anomalous)
    n = len(ex.normal) if not isinstance(ex.normal, (list, tuple)) else len(ex.normal[0])
    rule("score-shape", isinstance(s_norm, torch.Tensor) and s_norm.shape == (n,) and s_norm.is_floating_point(),
         f"score() must return a floating (N,) = ({n},) tensor; got "
         f"{type(s_norm).__name__} {getattr(s_norm, 'shape', None)} {getattr(s_norm, 'dtype', None)}")
    rule("score-shape", bool(torch.isfinite(s_norm).all()),
         f"score() returned inf/NaN for finite float32 inputs ({int((~torch.isfinite(s_norm)).sum())} of {n})")
    rule("score-shape", s_norm.dtype == torch.float32,
         f"score() of float32 features must be float32 (float64 is for float64 features); got {s_norm.dtype}")
    auc = _auroc(s_norm, s_anom)
    rule("higher-is-anomalous", auc > 0.9, f"anomalous examples must score higher than normal ones; AUROC {auc:.3f}")
    rule("no-mutation", _same(before, ex), "fit() or score() modified its input tensors")

    det2 = _fit(ctx.make(ctx.seed), ex)
    rule("reproducible", torch.allclose(det2.score(ex.normal), s_norm, rtol=1e-5, atol=1e-6),
         f"two fits on the same data with torch.manual_seed({ctx.seed}) before each give different scores (draw "
         "randomness from torch's generator or from the method's own seed)")

    with tempfile.TemporaryDirectory() as tmp:
        from .io import model_method, write_model

        path = os.path.join(tmp, "model.safetensors")
        det.save(path)
        try:  # distkern score / io.load_model find the plugin from the file: it must be distkern's format
            saved_as = model_method(path)
        except ValueError as e:
            ctx.fail("save-load", f"save() must write distkern's model format (distkern.io.write_model: "
                                  f"safetensors + JSON, no pickle) so that distkern score can read it; {e}", e)
        rule("save-load", saved_as == cls.name, f"save() recorded the method {saved_as!r}, not {cls.name!r} "
                                                "(pass the class's name to distkern.io.write_model)")
        try:  # as distkern score and distkern.io.load_model call it
            loaded = cls.load(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            ctx.fail("save-load", f"load(path, device='cpu') of the file save() wrote raised {_err(e)}", e)
        rule("save-load", torch.allclose(loaded.score(ex.normal), s_norm, rtol=1e-5, atol=1e-6),
             "load(save()) scores differently from the saved detector")

        other = os.path.join(tmp, "other.safetensors")
        write_model(other, f"not-{cls.name}", {"x": torch.zeros(1)}, config={}, fitted={})
        try:
            cls.load(other)
            refused = False
        except ValueError:
            refused = True
        rule("refuses-other-file", refused, "load() of another method's model file must raise ValueError")

    try:
        det.score(torch.randn(2, 3, 4, 5, 6, generator=gen))
        clean = False
    except (ValueError, TypeError):
        clean = True
    except Exception as e:  # noqa: BLE001
        ctx.fail("clear-input-errors", f"a 5-D input raised {_err(e)}; raise ValueError / TypeError naming the "
                                       "expected shape", e)
    rule("clear-input-errors", clean, "score() accepted a 5-D tensor instead of raising ValueError / TypeError")

    for dt in (torch.float64, torch.bfloat16):
        def conv(t):
            return t.to(dt) if t.is_floating_point() else t

        try:
            sn, sa = det.score(_map(ex.normal, conv)), det.score(_map(ex.anomalous, conv))
        except TypeError:
            continue  # a clear refusal of the dtype
        except Exception as e:  # noqa: BLE001
            ctx.fail("other-dtypes", f"score() of {dt} features raised {_err(e)}; score them (in float32 or "
                                     "float64) or refuse the dtype with TypeError", e)
        rule("other-dtypes", isinstance(sn, torch.Tensor) and sn.shape == (n,) and sn.is_floating_point()
             and bool(torch.isfinite(sn).all()) and bool(torch.isfinite(sa).all()),
             f"score() of {dt} features must return finite floating ({n},) scores; got {_describe(sn)}")
        if dt == torch.float64:
            rule("other-dtypes", _close(sn, s_norm, rtol=1e-3, atol=1e-3 * float(s_norm.abs().max())),
                 "score() of the same features in float64 differs from float32's by more than 1e-3 (relative)")
        else:
            auc = _auroc(sn.float(), sa.float())
            rule("other-dtypes", auc > 0.9, f"bfloat16 features no longer rank anomalies higher: AUROC {auc:.3f}")

    if torch.cuda.is_available():
        det.to("cuda")
        s_cuda = det.score(_to(ex.normal, "cuda"))
        rule("device", s_cuda.device.type == "cuda" and torch.allclose(s_cuda.cpu(), s_norm, rtol=1e-3, atol=1e-3),
             "to('cuda') must score CUDA inputs on the GPU like the CPU does")


# ---------------------------------------------------------------------------------------------
# Losses and aligners: modules called on a tuple of inputs
# ---------------------------------------------------------------------------------------------


def _default_loss_inputs(gen: torch.Generator):
    return (torch.randn(64, 8, generator=gen), torch.randn(48, 8, generator=gen) + 0.5)


def _default_aligner_inputs(gen: torch.Generator):
    return (torch.randn(2, 16, 32, generator=gen), torch.randn(2, 32, generator=gen))


def _as_args(inputs, what: str, ctx: _Ctx) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    ctx.fail("construct", f"example_data must return a tuple of {what} inputs; got {type(inputs).__name__}")


def _grad_positions(ctx: _Ctx, args: tuple) -> list[int]:
    want = getattr(ctx.cls, "differentiable_inputs", None)
    if want is not None:
        return list(want)
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _with_grad(args: tuple, positions: list[int]) -> tuple:
    return tuple(a.detach().clone().requires_grad_(True) if i in positions else a for i, a in enumerate(args))


def _run_seeded(ctx: _Ctx, args: tuple, call):
    inst = ctx.make(seed=ctx.seed)
    torch.manual_seed(ctx.seed + 1)
    return call(inst, args)


def _check_bad_inputs(ctx: _Ctx, inst, bad: list[tuple[str, tuple]]) -> None:
    for what, args in bad:
        try:
            inst(*args)
        except (ValueError, TypeError):
            continue
        except Exception as e:  # noqa: BLE001
            ctx.fail("clear-input-errors", f"{what} raised {_err(e)}; raise ValueError / TypeError naming the "
                                           "argument and the expected shape", e)
        ctx.fail("clear-input-errors", f"{what} was accepted instead of raising ValueError / TypeError")
    ctx.passed.append("clear-input-errors")


def _module_common(ctx: _Ctx, args: tuple, call, check_out, compare, bad, grads_of):
    """The rules losses and aligners share, around ``call(inst, args) -> output``."""
    inst = ctx.make(seed=ctx.seed)
    ctx.rule("is-module", isinstance(inst, torch.nn.Module),
             f"must be a torch.nn.Module (the {ctx.cls.kind} contract); got a {type(inst).__name__}")
    before = _clone(args)
    torch.manual_seed(ctx.seed + 1)
    try:
        out = call(inst, args)
    except Exception as e:  # noqa: BLE001
        first = RULES[ctx.cls.kind][2]
        ctx.fail(first, f"forward on {', '.join(_describe(a) for a in args)} raised {_err(e)}", e)
    check_out(out)
    ctx.rule("no-mutation", _same(before, args), "forward modified its input tensors")

    positions = _grad_positions(ctx, args)
    gargs = _with_grad(args, positions)
    torch.manual_seed(ctx.seed + 1)
    try:
        gout = call(inst, gargs)
        total = grads_of(gout)
        trainable = any(p.requires_grad for p in getattr(inst, "parameters", lambda: [])())
        if not positions and not trainable:  # nothing declared differentiable (differentiable_inputs = ())
            total = None
        elif not (isinstance(total, torch.Tensor) and total.requires_grad):
            ctx.fail("differentiable", "the output does not require grad when the inputs do (is it detached, "
                                       "or computed under no_grad / from .item()?)")
        if total is not None:
            total.backward()
    except CheckFailure:
        raise
    except Exception as e:  # noqa: BLE001
        ctx.fail("differentiable", f"backward failed: {_err(e)}", e)
    missing = [(i, gargs[i].grad) for i in positions
               if gargs[i].grad is None or not bool(torch.isfinite(gargs[i].grad).all())]
    ctx.rule("differentiable", not missing,
             "; ".join(f"input {i} got {'no gradient' if g is None else 'a non-finite gradient'}" for i, g in missing)
             + " from backward (set differentiable_inputs on the class if an input is not meant to be differentiated)")

    again = _run_seeded(ctx, args, call)
    ctx.rule("reproducible", compare(again, out),
             f"two runs with torch.manual_seed({ctx.seed}) give different results (draw randomness from torch's "
             "generator, or take a generator / seed argument)")
    _check_bad_inputs(ctx, inst, bad)

    if torch.cuda.is_available():
        dinst = ctx.make(seed=ctx.seed).to("cuda")
        torch.manual_seed(ctx.seed + 1)
        dout = call(dinst, _to(args, "cuda"))
        first = dout if isinstance(dout, torch.Tensor) else dout[0]
        ctx.rule("device", first.device.type == "cuda" and compare(dout, out, rtol=1e-3, atol=1e-3),
                 ".to('cuda') on CUDA inputs must compute on the GPU what the CPU computes")


def _default_bad(args: tuple, gen: torch.Generator) -> list[tuple[str, tuple]]:
    bad = []
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        bad.append(("a 0-dim tensor as input 0", (torch.tensor(1.0, dtype=first.dtype), *args[1:])))
        if len(args) > 1 and first.is_floating_point():
            wider = torch.cat([first, first[..., :1]], dim=-1)
            bad.append((f"input 0 with one more feature column {tuple(wider.shape)}", (wider, *args[1:])))
    return bad


def _hook_bad(ctx: _Ctx, default: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    hook = getattr(ctx.cls, "example_bad_inputs", None)
    if not callable(hook):
        return default
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    return [(f"example_bad_inputs()[{i}] ({', '.join(_describe(a) for a in args)})", tuple(args))
            for i, args in enumerate(hook(gen))]


def _check_loss(ctx: _Ctx, example) -> None:
    args = _as_args(ctx.data(_default_loss_inputs, example), "loss", ctx)

    def call(inst, a):
        return inst(*a)

    def check_out(v):
        ctx.rule("scalar", isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point(),
                 f"forward must return a 0-dim floating tensor; got {_describe(v)}")
        ctx.rule("finite", bool(torch.isfinite(v)), f"forward returned {float(v.detach())} on finite inputs")

    def compare(a, b, rtol=1e-5, atol=1e-6):
        return _close(a, b, rtol, atol)

    bad = _hook_bad(ctx, _default_bad(args, torch.Generator().manual_seed(ctx.seed + 2)))
    _module_common(ctx, args, call, check_out, compare, bad, grads_of=lambda v: v)


def _aligner_pair(out):
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    return None


def _check_aligner(ctx: _Ctx, example) -> None:
    args = _as_args(ctx.data(_default_aligner_inputs, example), "aligner", ctx)
    if len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]) or args[0].dim() not in (3, 4):
        ctx.fail("construct", "aligner inputs must start with patch tokens (B, P, D) or (L, B, P, D) and a "
                              "conditioning tensor (prompt or image embeddings); got "
                              + ", ".join(_describe(a) for a in args))
    B, P, D = args[0].shape[-3:]  # several layers (L, B, P, D): the maps are still (B, P)

    def call(inst, a):
        return inst(*a)

    def check_out(out):
        pair = _aligner_pair(out)
        ok = (pair is not None and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in pair)
              and pair[0].shape == (B, P) and pair[1].shape == (B,))
        got = _describe(out) if pair is None else " and ".join(_describe(t) for t in pair)
        ctx.rule("output-shapes", ok, f"forward must return (maps (B, P) = ({B}, {P}), scores (B,) = ({B},)), "
                                      f"floating; got {got}")
        ctx.rule("finite", all(bool(torch.isfinite(t).all()) for t in pair), "maps or scores are not finite")

    def compare(a, b, rtol=1e-5, atol=1e-6):
        pa, pb = _aligner_pair(a), _aligner_pair(b)
        return pa is not None and pb is not None and _close(list(pa), list(pb), rtol, atol)

    def grads_of(out):
        maps, scores = _aligner_pair(out)
        return maps.sum() + scores.sum()

    tokens, prompts = args[0], args[1]
    no_batch = tokens[0] if tokens.dim() == 3 else tokens[:, 0]
    default_bad = [(f"patch tokens without the batch dimension {tuple(no_batch.shape)}", (no_batch, *args[1:])),
                   (f"prompts of another width {tuple(prompts[..., :-1].shape)} than the tokens' D = {D}",
                    (tokens, prompts[..., :-1], *args[2:]))]
    _module_common(ctx, args, call, check_out, compare, _hook_bad(ctx, default_bad), grads_of)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def _default_sampler_example(gen: torch.Generator) -> SamplerExample:
    return SamplerExample(torch.randn(2, 3, 8, 8, generator=gen), 10, None)


def _set_timesteps(sched, n: int, device=None):
    if device is None:
        return sched.set_timesteps(n)
    try:
        return sched.set_timesteps(n, device=device)
    except TypeError:
        sched.set_timesteps(n)
        return None


def _timesteps(sched) -> list:
    ts = getattr(sched, "timesteps", None)
    if isinstance(ts, torch.Tensor):
        return list(ts) if ts.dim() == 1 else []
    return list(ts) if ts is not None else []


def _loop(sched, ex: SamplerExample, device=None) -> torch.Tensor:
    model = ex.model or fake_model
    _set_timesteps(sched, ex.num_inference_steps, device)
    x = ex.sample if device is None else ex.sample.to(device)
    sigma = getattr(sched, "init_noise_sigma", 1.0)
    x = x * (sigma.to(x.device) if isinstance(sigma, torch.Tensor) else sigma)
    scale = getattr(sched, "scale_model_input", None)
    for t in _timesteps(sched):
        x_in = scale(x, t) if callable(scale) else x
        x = sched.step(model(x_in, t), t, x).prev_sample
    return x


def _check_sampler(ctx: _Ctx, example) -> None:
    ex = ctx.data(_default_sampler_example, example)
    if not isinstance(ex, SamplerExample):
        if isinstance(ex, torch.Tensor):
            ex = SamplerExample(ex)
        else:
            ctx.fail("construct", f"example_data must return a SamplerExample; got {type(ex).__name__}")
    model = ex.model or fake_model
    sample = ex.sample
    for attr in ("set_timesteps", "step"):
        if not callable(getattr(ctx.make(), attr, None)):
            ctx.fail("set-timesteps" if attr == "set_timesteps" else "step-output",
                     f"a sampler needs a {attr}() method (diffusers' scheduler API)")

    # a valid timestep for a step before set_timesteps: the first of a scheduled instance
    probe = ctx.make(seed=ctx.seed)
    try:
        probe.set_timesteps(ex.num_inference_steps)
        ts = _timesteps(probe)
    except Exception as e:  # noqa: BLE001
        ctx.fail("set-timesteps", f"set_timesteps({ex.num_inference_steps}) raised {_err(e)}", e)
    t0 = ts[0] if ts else 0

    fresh = ctx.make(seed=ctx.seed)
    try:
        fresh.step(model(sample, t0), t0, sample.clone())
        raised = False
    except Exception:  # noqa: BLE001 - any clear error will do
        raised = True
    ctx.rule("step-before-set-timesteps", raised,
             "step() before set_timesteps() must raise (say 'call set_timesteps first')")

    numeric = all((isinstance(t, torch.Tensor) and t.numel() == 1)
                  or (isinstance(t, numbers.Real) and not isinstance(t, bool)) for t in ts)
    ctx.rule("set-timesteps", bool(ts) and numeric and all(math.isfinite(float(t)) for t in ts),
             f"after set_timesteps({ex.num_inference_steps}), timesteps must be a non-empty 1-D sequence of finite "
             f"numbers; got {_describe(getattr(probe, 'timesteps', None))}")

    x = sample.clone()
    scale = getattr(probe, "scale_model_input", None)
    m_out = model(scale(x, t0) if callable(scale) else x, t0)
    before = (_clone(m_out), _clone(x))
    torch.manual_seed(ctx.seed + 1)
    try:
        out = probe.step(m_out, t0, x)
    except Exception as e:  # noqa: BLE001
        ctx.fail("step-output", f"step(model_output, {t0!r}, sample) on {_describe(x)} raised {_err(e)}", e)
    prev = getattr(out, "prev_sample", None)
    ctx.rule("step-output", isinstance(prev, torch.Tensor) and prev.shape == x.shape and prev.dtype == x.dtype
             and prev.device == x.device and bool(torch.isfinite(prev).all()),
             f"step() must return an object whose .prev_sample is finite, with the sample's shape {tuple(x.shape)}, "
             f"dtype {x.dtype} and device; got {_describe(prev) if prev is not None else type(out).__name__}")
    ctx.rule("no-mutation", _same(before, (m_out, x)), "step() modified model_output or sample")

    def seeded_loop(sched=None, device=None, example=ex):
        s = sched if sched is not None else ctx.make(seed=ctx.seed)
        torch.manual_seed(ctx.seed + 1)
        return _loop(s, example, device)

    try:
        first = seeded_loop()
    except Exception as e:  # noqa: BLE001
        ctx.fail("loop-finite", f"a {ex.num_inference_steps}-step loop raised {_err(e)}", e)
    ctx.rule("loop-finite", isinstance(first, torch.Tensor) and first.shape == sample.shape
             and bool(torch.isfinite(first).all()),
             f"a {ex.num_inference_steps}-step loop with the fake model must end in a finite sample of shape "
             f"{tuple(sample.shape)}; got {_describe(first)}")
    ctx.rule("reproducible", _close(seeded_loop(), first),
             f"two loops with torch.manual_seed({ctx.seed}) give different samples (draw noise from torch's "
             "generator or a generator argument)")

    inst = ctx.make(seed=ctx.seed)
    if callable(getattr(ctx.cls, "from_config", None)) and getattr(inst, "config", None) is not None:
        try:
            twin = ctx.cls.from_config(inst.config)
            same_cfg = dict(twin.config) == dict(inst.config)
            same_loop = _close(seeded_loop(twin), first)
        except Exception as e:  # noqa: BLE001
            ctx.fail("config-round-trip", f"from_config(config) failed: {_err(e)}", e)
        ctx.rule("config-round-trip", same_cfg and same_loop,
                 "from_config(s.config) must give a scheduler with the same config and the same loop"
                 + ("" if same_cfg else f": config {dict(inst.config)} became {dict(twin.config)}"))

    def in_example_dtype(x_in, t):  # the example's model runs in its own dtype: the scheduler is under test
        return model(x_in.to(sample.dtype), t).to(x_in.dtype)

    for dt in (torch.float64, torch.bfloat16):
        try:
            xd = seeded_loop(example=ex._replace(sample=sample.to(dt), model=in_example_dtype))
        except TypeError:
            continue  # a clear refusal of the dtype
        except Exception as e:  # noqa: BLE001
            ctx.fail("other-dtypes", f"a loop on a {dt} sample raised {_err(e)}; keep the sample's dtype (as "
                                     "diffusers' schedulers do) or refuse it with TypeError", e)
        ok = isinstance(xd, torch.Tensor) and xd.dtype == dt and bool(torch.isfinite(xd).all())
        ctx.rule("other-dtypes", ok, f"a loop on a {dt} sample must end in a finite {dt} sample; got {_describe(xd)}")
        if dt == torch.float64:
            ctx.rule("other-dtypes", _close(xd, first, rtol=1e-4, atol=1e-4 * float(first.abs().max())),
                     "a loop on the float64 sample ends more than 1e-4 (relative) away from the float32 loop")

    if torch.cuda.is_available():
        d = seeded_loop(device="cuda")
        ctx.rule("device", d.device.type == "cuda" and _close(d, first, rtol=1e-3, atol=1e-3),
                 "set_timesteps(n, device='cuda') and a loop on CUDA inputs must give the CPU result on the GPU")
