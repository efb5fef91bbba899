"""Benchmark hooks: plugins add cases to ``distkern bench`` through the entry-point group
``distkern.benchmarks``.

A plugin declares, in its ``pyproject.toml``::

    [project.entry-points."distkern.benchmarks"]
    my-plugin = "my_plugin.bench:cases"

naming a function that takes no argument and returns a list of :class:`distkern.bench.cases.Case`. The
harness runs those cases exactly like distkern's own — agreement with the primary baseline first, then
interleaved timing, peak memory and the fraction of the device's ceilings — and reports them in the same
table and JSON (each case's ``origin`` is the plugin's distribution name).

A hook that fails to import, raises, or returns anything but a list of ``Case`` is *broken*: it is listed
(``benchmark_hooks`` in the JSON, a line under the table, a warning on stderr) with its error, its cases are
left out, and the run goes on. Hooks are read once per process (:func:`refresh` forgets them).
"""
from __future__ import annotations

import importlib
import importlib.metadata as _md
import threading
from dataclasses import asdict, dataclass
from typing import Any

from .cases import Case

__all__ = ["ENTRY_POINT_GROUP", "HookInfo", "load_hooks", "plugin_cases", "hook_report", "refresh"]

ENTRY_POINT_GROUP = "distkern.benchmarks"


@dataclass(frozen=True)
class HookInfo:
    """One benchmark hook: where it comes from, whether it loaded, how many cases it gave."""

    name: str
    package: str
    version: str | None
    target: str
    status: str  # "ok" | "broken"
    error: str | None
    cases: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_lock = threading.RLock()
_loaded: tuple[list[Case], list[HookInfo]] | None = None


def _validate(result: Any) -> list[Case]:
    if not isinstance(result, (list, tuple)):
        raise TypeError(f"the hook must return a list of distkern.bench.cases.Case; got {type(result).__name__}")
    bad = [type(c).__name__ for c in result if not isinstance(c, Case)]
    if bad:
        raise TypeError(f"the hook must return a list of distkern.bench.cases.Case; got items of type "
                        f"{', '.join(sorted(set(bad)))}")
    for c in result:
        if not c.baselines:
            raise ValueError(f"case {c.name!r} has no baseline (the first one is what ours is checked against)")
        unknown = [d for d in c.devices if d not in ("cpu", "cuda")]
        if unknown:
            raise ValueError(f"case {c.name!r} has unknown device kind(s) {unknown}; use 'cpu' / 'cuda'")
        if not callable(c.setup) or not callable(c.ours):
            raise TypeError(f"case {c.name!r}: setup and ours must be callables")
    return list(result)


def _load_one(ep: _md.EntryPoint) -> tuple[list[Case], HookInfo]:
    dist = getattr(ep, "dist", None)
    package = dist.name if dist is not None else "<unknown>"
    version = dist.version if dist is not None else None
    try:
        fn = ep.load()
        if not callable(fn):
            raise TypeError(f"{ep.value} is a {type(fn).__name__}, not a function returning cases")
        cases = _validate(fn())
        for c in cases:
            c.origin = package
        return cases, HookInfo(ep.name, package, version, ep.value, "ok", None, len(cases))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a plugin's hook must never take the benchmark run down
        return [], HookInfo(ep.name, package, version, ep.value, "broken", f"{type(e).__name__}: {e}", 0)


def load_hooks(refresh: bool = False) -> tuple[list[Case], list[HookInfo]]:
    """Every case the installed hooks give, and a row per hook (cached until :func:`refresh`)."""
    global _loaded
    with _lock:
        if refresh:
            _drop()
        if _loaded is None:
            cases: list[Case] = []
            infos: list[HookInfo] = []
            seen = set()
            for ep in sorted(_md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
                dist = getattr(ep, "dist", None)
                key = (ep.name, ep.value, dist.name if dist is not None else None)
                if key in seen:  # the same distribution seen twice on sys.path
                    continue
                seen.add(key)
                got, info = _load_one(ep)
                cases += got
                infos.append(info)
            _loaded = (cases, infos)
        return _loaded


def plugin_cases() -> list[Case]:
    """The cases of every working hook."""
    return list(load_hooks()[0])


def hook_report() -> list[dict[str, Any]]:
    """One dict per hook (``name``, ``package``, ``version``, ``target``, ``status``, ``error``, ``cases``)."""
    return [h.to_dict() for h in load_hooks()[1]]


def refresh() -> None:
    """Forget the hooks read (after installing a plugin in a running process)."""
    with _lock:
        _drop()


def _drop() -> None:
    global _loaded
    importlib.invalidate_caches()
    _loaded = None
