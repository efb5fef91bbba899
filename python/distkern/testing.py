"""Checks a method plugin can run on itself, like scikit-learn's ``check_estimator``.

``check_method(MyDetector)`` fits and scores the method on a small synthetic problem and checks
the contract of its kind; each failed rule raises :class:`CheckFailure` naming the rule. Data:
the ``example`` argument, else the class's ``example_data(generator)`` (a detector whose
features are not plain ``(N, D)`` vectors — feature maps, logits — provides one), else Gaussian
vectors (with class labels when the method asks for them).

Rules for detectors (``kind = "detector"``):

=========================  ===================================================================
declaration                ``name`` (non-empty str), ``kind``, ``distkern_api`` = the API version
score-before-fit           ``score`` before ``fit`` raises (unless the class sets ``requires_fit = False``)
fit-returns-self           ``fit`` returns the detector
score-shape                ``score`` → floating ``(N,)`` tensor, finite on finite input, on the input's device
higher-is-anomalous        anomalous examples outscore normal ones (AUROC > 0.9)
no-mutation                ``fit`` and ``score`` leave their inputs unchanged
reproducible               two fits of fresh instances on the same data give the same scores
save-load                  ``save`` / ``load`` round trip gives the same scores
refuses-other-file         ``load`` refuses a model file of another method with ``ValueError``
clear-input-errors         a 5-D tensor in ``score`` raises ``ValueError`` or ``TypeError``
device                     with a GPU: ``to("cuda")`` scores CUDA inputs like the CPU does
=========================  ===================================================================
"""
from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any, NamedTuple

import torch

__all__ = ["CheckFailure", "Example", "check_method", "gaussian_example"]


class CheckFailure(AssertionError):
    """A method broke a rule of its kind's contract; ``rule`` names it."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


class Example(NamedTuple):
    """Data for a check: fit on ``train`` (with ``labels`` when not None); ``normal`` and
    ``anomalous`` are scored and must be told apart."""

    train: Any
    labels: torch.Tensor | None
    normal: Any
    anomalous: Any


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


def _rebuild(obj, items):
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        return _rebuild(obj, [_clone(o) for o in obj])
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return _rebuild(obj, [_to(o, device) for o in obj])
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _fit(det, ex: Example):
    return det.fit(ex.train, ex.labels) if ex.labels is not None else det.fit(ex.train)


def _example_for(cls, gen: torch.Generator) -> Example:
    if hasattr(cls, "example_data"):
        return cls.example_data(gen)
    ex = gaussian_example(gen)
    try:
        _fit(cls(), ex)
        return ex
    except Exception as e:  # noqa: BLE001 - a method that needs labels says so in its error
        if "label" in str(e).lower():
            return gaussian_example(gen, classes=3)
        raise CheckFailure("fit", f"fit on Gaussian vectors (N=400, D=8) failed: {type(e).__name__}: {e}; "
                                  "give the class an example_data(generator) or pass example=") from e


def _auroc(scores_neg: torch.Tensor, scores_pos: torch.Tensor) -> float:
    from .metrics import auroc

    s = torch.cat([scores_neg, scores_pos]).detach().cpu()
    y = torch.cat([torch.zeros(len(scores_neg)), torch.ones(len(scores_pos))])
    return auroc(s, y)


def check_method(method, *, example: Example | None = None, seed: int = 0) -> list[str]:
    """Run the contract checks of ``method`` (a class, or an instance whose class is used) and
    return the names of the rules it passed; raise :class:`CheckFailure` at the first broken rule."""
    from .methods import API_VERSION, KINDS

    cls = method if inspect.isclass(method) else type(method)
    passed: list[str] = []

    def rule(name: str, ok: bool, msg: str) -> None:
        if not ok:
            raise CheckFailure(name, f"{getattr(cls, 'name', cls.__name__)}: {msg}")
        passed.append(name)

    name, kind, api = getattr(cls, "name", None), getattr(cls, "kind", None), getattr(cls, "distkern_api", None)
    rule("declaration", isinstance(name, str) and bool(name) and kind in KINDS and api == API_VERSION,
         f"needs class attributes name (non-empty str), kind (one of {KINDS}) and distkern_api = {API_VERSION}; "
         f"got name={name!r}, kind={kind!r}, distkern_api={api!r}")
    if kind != "detector":
        raise CheckFailure("kind", f"{name}: check_method covers kind 'detector' so far; got {kind!r}")

    gen = torch.Generator().manual_seed(seed)
    ex = example if example is not None else _example_for(cls, gen)

    if getattr(cls, "requires_fit", True):
        try:
            cls().score(ex.normal)
            raised = False
        except Exception:  # noqa: BLE001 - any clear error will do
            raised = True
        rule("score-before-fit", raised, "score() before fit() must raise (say 'fit first')")

    before = _clone(ex)
    det = cls()
    rule("fit-returns-self", _fit(det, ex) is det, "fit() must return the detector (self)")
    s_norm, s_anom = det.score(ex.normal), det.score(ex.anomalous)
    n = len(ex.normal) if not isinstance(ex.normal, (list, tuple)) else len(ex.normal[0])
    rule("score-shape", isinstance(s_norm, torch.Tensor) and s_norm.shape == (n,) and s_norm.is_floating_point()
         and bool(torch.isfinite(s_norm).all()),
         f"score() must return a finite floating (N,) = ({n},) tensor; got "
         f"{type(s_norm).__name__} {getattr(s_norm, 'shape', None)} {getattr(s_norm, 'dtype', None)}")
    auc = _auroc(s_norm, s_anom)
    rule("higher-is-anomalous", auc > 0.9, f"anomalous examples must score higher than normal ones; AUROC {auc:.3f}")
    rule("no-mutation", _same(before, ex), "fit() or score() modified its input tensors")

    det2 = _fit(cls(), ex)
    rule("reproducible", torch.allclose(det2.score(ex.normal), s_norm, rtol=1e-5, atol=1e-6),
         "two fits on the same data give different scores (seed the method's randomness)")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        det.save(path)
        loaded = cls.load(path)
        rule("save-load", torch.allclose(loaded.score(ex.normal), s_norm, rtol=1e-5, atol=1e-6),
             "load(save()) scores differently from the saved detector")
        from .io import write_model

        other = os.path.join(tmp, "other.safetensors")
        write_model(other, f"not-{name}", {"x": torch.zeros(1)}, config={}, fitted={})
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
        raise CheckFailure("clear-input-errors", f"{name}: a 5-D input raised {type(e).__name__}: {e}; "
                                                 "raise ValueError / TypeError naming the expected shape") from e
    rule("clear-input-errors", clean, "score() accepted a 5-D tensor instead of raising ValueError / TypeError")

    if torch.cuda.is_available():
        det.to("cuda")
        s_cuda = det.score(_to(ex.normal, "cuda"))
        rule("device", s_cuda.device.type == "cuda" and torch.allclose(s_cuda.cpu(), s_norm, rtol=1e-3, atol=1e-3),
             "to('cuda') must score CUDA inputs on the GPU like the CPU does")
    return passed
