"""Reading features and labels from files, and loading a saved method of any plugin.

Feature files: ``.npy`` (read without pickle), ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``:
a tensor, or a dict with ``features`` and optionally ``labels``), ``.safetensors`` (tensor
``features`` — or the only tensor — and optionally ``labels``). A list of per-level tensors
is given as a ``.pt`` dict entry ``features`` holding a list, or ``.safetensors`` tensors named
``features.0``, ``features.1``, ...
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["load_features", "load_labels", "load_model", "model_method", "parse_options", "read_model", "write_model"]


def _safetensors(sub: str = ""):
    """The safetensors module (``safetensors.torch`` for ``sub="torch"``): distkern's model files are
    safetensors, an optional dependency (``pip install safetensors`` or ``distkern[io]``)."""
    import importlib

    try:
        return importlib.import_module("safetensors" + ("." + sub if sub else ""))
    except ImportError:
        raise ImportError("distkern: saving and loading models (and safetensors feature files) needs the "
                          "safetensors package: pip install safetensors (or pip install 'distkern[io]')") from None

def _from_mapping(d: dict, path: str) -> tuple[Any, torch.Tensor | None]:
    labels = d.get("labels")
    if "features" in d:
        return d["features"], labels
    levels = sorted((k for k in d if k.startswith("features.")), key=lambda k: int(k.split(".", 1)[1]))
    if levels:
        return [d[k] for k in levels], labels
    tensors = [k for k in d if k != "labels"]
    if len(tensors) == 1:
        return d[tensors[0]], labels
    raise ValueError(f"{path}: cannot tell which entry holds the features ({sorted(d)}); name it 'features'")


def _read(p: str, ext: str) -> Any:
    """The raw object of a feature / label file; an unreadable file is a ValueError naming it."""
    try:
        if ext == ".npy":
            a = np.load(p, allow_pickle=False)
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            return torch.from_numpy(a)
        if ext in (".pt", ".pth"):
            return torch.load(p, map_location="cpu", weights_only=True)
        if ext == ".safetensors":
            return _safetensors("torch").load_file(p)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise ValueError(f"{p}: not a readable {ext} file of tensors ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    except Exception as e:  # noqa: BLE001 - unpicklers / safetensors raise their own types
        raise ValueError(f"{p}: not a readable {ext} file of tensors ({type(e).__name__})") from None
    raise ValueError(f"{p}: unknown feature file type {ext!r} (use .npy, .pt or .safetensors)")


def load_features(path: str | os.PathLike) -> tuple[Any, torch.Tensor | None]:
    """Read ``(features, labels or None)`` from a ``.npy``, ``.pt`` / ``.pth`` or ``.safetensors`` file."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no such file: {p}")
    ext = os.path.splitext(p)[1].lower()
    obj = _read(p, ext)  # an unknown extension is refused there
    if ext == ".npy":
        return obj, None
    if ext == ".safetensors":
        return _from_mapping(obj, p)
    if isinstance(obj, torch.Tensor):  # .pt / .pth
        return obj, None
    if isinstance(obj, dict):
        return _from_mapping(obj, p)
    if isinstance(obj, (list, tuple)):
        return list(obj), None
    raise ValueError(f"{p}: expected a tensor, a list of tensors or a dict with 'features'; got {type(obj).__name__}")


def load_labels(path: str | os.PathLike) -> torch.Tensor:
    """Read labels ``(N,)`` from a file: a ``.npy`` array or a tensor, or the ``labels`` entry of a dict
    (``.pt`` / ``.safetensors``; a dict holding one tensor is that tensor)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no such file: {p}")
    ext = os.path.splitext(p)[1].lower()
    obj = _read(p, ext)
    if isinstance(obj, dict):
        if "labels" in obj:
            obj = obj["labels"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise ValueError(f"{p}: no 'labels' entry among {sorted(obj)}")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{p}: labels must be a tensor or array; got {type(obj).__name__}")
    return obj.reshape(-1) if obj.dim() > 1 and obj.numel() == obj.shape[0] else obj


def normal_only(labels: Any, method: str, n: int | None = None) -> None:
    """For one-class detectors, which fit on normal data only: refuse ``labels`` that mark any sample as
    anomalous (non-zero) — fitting on them would quietly spoil the model — or whose count is not the ``n``
    samples given. ``None`` passes. ``distkern fit`` hands a feature file's labels to ``fit``, so a test file
    holding 0/1 labels fitted by mistake is refused here with the rows to drop."""
    if labels is None:
        return
    lab = torch.as_tensor(labels).reshape(-1)
    if n is not None and lab.numel() != n:
        raise ValueError(f"{method}: {lab.numel()} labels for {n} samples")
    bad = torch.nonzero(lab != 0)[:, 0]
    if bad.numel():
        raise ValueError(f"{method}: fits normal data only; labels are non-zero at rows {bad[:5].tolist()}"
                         f"{'...' if bad.numel() > 5 else ''} ({bad.numel()} of {lab.numel()}; drop those samples)")


def check_device(device: Any, method: str) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` naming ``method`` where it cannot hold tensors
    here: not a device string, CUDA asked of a CPU-only torch build or of a machine without a visible GPU,
    or a GPU index past the ones present. For the ``to(device)`` of method plugins (and ``load(path,
    device=...)``, which ends in it), where torch itself would raise a bare ``AssertionError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{method}: {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{method}: cannot use device {str(dev)!r}: CUDA is not available here ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{method}: cannot use device {str(dev)!r}: {torch.cuda.device_count()} GPU(s) visible")
    return dev


def model_method(path: str | os.PathLike) -> str:
    """The method name recorded in a saved model (safetensors metadata ``distkern_method``)."""
    safe_open = _safetensors().safe_open

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no such model file: {p!r}")
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ValueError(f"{p}: not a safetensors model file ({type(e).__name__}: {e})") from None
    name = meta.get("distkern_method")
    if not name:
        raise ValueError(f"{p}: not a distkern model (no 'distkern_method' in its metadata)")
    return name


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a saved method of any installed plugin: the file names its method, the registry finds
    the class, and the class's own ``load`` reads it (no code runs from the file)."""
    from . import methods

    cls = methods.get(model_method(path))
    return cls.load(path, device=device)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → keyword arguments; values are read as JSON when they parse (numbers,
    booleans, lists), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} must be KEY=VALUE")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


# -- the model-file format every method plugin shares -------------------------------------------

def write_model(path: str | os.PathLike, method: str, tensors: dict[str, torch.Tensor], *, config: dict,
                fitted: dict, format_version: int = 1) -> None:
    """Save a fitted method as one ``.safetensors`` file: its tensors, and JSON metadata naming the
    method (``distkern_method``), the plugin's ``format_version``, the constructor ``config`` and
    the ``fitted`` plain values. Loading it executes no code (no pickle)."""
    save_file = _safetensors("torch").save_file

    from ._version import __version__

    meta = {
        "distkern_method": method,
        "format_version": str(int(format_version)),
        "config": json.dumps(config),
        "fitted": json.dumps(fitted),
        "distkern_version": __version__,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=meta)


def read_model(path: str | os.PathLike, method: str, *, format_version: int = 1,
               package: str | None = None, require: tuple[str, ...] = ()) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(config, fitted, tensors)`` of a file written by :func:`write_model` for ``method``; ``require``
    names the tensors it must hold (a missing one is a ``ValueError``, not a ``KeyError`` later).

    Raises ``FileNotFoundError``; ``ValueError`` for a file that is not safetensors, holds another
    method's model (or no distkern model), has a format version newer than ``format_version``
    (the message says to upgrade ``package``), or damaged metadata."""
    safe_open = _safetensors().safe_open

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{method}: no such file: {p!r}")
    try:
        f = safe_open(p, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
        raise ValueError(f"{method}: {p!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    with f:
        meta = f.metadata() or {}
        found = meta.get("distkern_method")
        if found != method:
            raise ValueError(f"{method}: {p!r} holds a {found or 'non-distkern'} model, not a {method} model")
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            raise ValueError(f"{method}: {p!r} has an unreadable format version {meta.get('format_version')!r}") from None
        if version > format_version:
            raise ValueError(f"{method}: {p!r} has format version {version}, newer than this plugin reads "
                             f"({format_version}); upgrade {package or 'the plugin'}")
        try:
            config = json.loads(meta.get("config", "{}"))
            fitted = json.loads(meta.get("fitted", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{method}: {p!r} has damaged metadata ({e})") from None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in require if k not in tensors]
    if missing:
        raise ValueError(f"{method}: {p!r} lacks the tensor(s) {missing} a {method} model holds (damaged file?)")
    return config, fitted, tensors
