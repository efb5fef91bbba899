"""The method plugin registry.

Methods (detectors, losses, samplers, aligners) are plugins. A package registers one in its
``pyproject.toml``::

    [project.entry-points."distkern.methods"]
    gaussian-ad = "distkern_ad.gaussian_ad:GaussianAD"

and the class declares ``kind`` (one of :data:`KINDS`) and ``distkern_api`` (the plugin API
version it was written for, compared with :data:`API_VERSION`). Tests and notebooks can add a
class in-process with :func:`register`. Both paths end in one table. The rules:

* **Lazy.** Nothing is read at ``import distkern``. :func:`get` reads the entry-point group's
  metadata and imports only the method asked for; :func:`available` imports every entry once
  and caches the result until :func:`refresh`.
* **Nothing lost.** A plugin whose import raises anything (``SystemExit`` included; only
  ``KeyboardInterrupt`` gets through) is listed with status ``"broken"`` and its error. A
  class without a valid ``kind`` / ``distkern_api`` is ``"broken"``; one written for another
  API version is ``"incompatible"``. :func:`get` raises :class:`MethodLoadError` for them.
* **No silent overwrite.** A name claimed twice (two packages, or an entry point and an
  in-process class) is a ``"collision"`` for every claimant, and :func:`get` raises
  :class:`MethodCollisionError`. :func:`register` refuses a taken name unless ``replace=True``
  (an in-process class registered with ``replace=True`` shadows entry points of that name).
"""
from __future__ import annotations

import importlib
import importlib.metadata as _md
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable, TypeVar, overload

__all__ = ["API_VERSION", "KINDS", "ENTRY_POINT_GROUP", "MethodInfo", "MethodError",
           "UnknownMethodError", "MethodLoadError", "InvalidMethodError", "IncompatibleMethodError",
           "MethodCollisionError", "available", "get", "register", "unregister", "refresh"]

API_VERSION = 1
KINDS = ("detector", "loss", "sampler", "aligner")
ENTRY_POINT_GROUP = "distkern.methods"
IN_PROCESS = "<in-process>"

T = TypeVar("T", bound=type)


class MethodError(Exception):
    """Base class of the registry's errors."""


class UnknownMethodError(MethodError, KeyError):
    """No method of that name is registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MethodLoadError(MethodError, ImportError):
    """The method is registered but cannot be used (import failed, invalid, incompatible).

    ``error`` holds the original error text (e.g. ``"ModuleNotFoundError: No module named 'x'"``).
    """

    def __init__(self, msg: str, *, name: str | None = None, error: str | None = None) -> None:
        super().__init__(msg, name=name)
        self.error = error if error is not None else msg


class InvalidMethodError(MethodLoadError, TypeError):
    """The class does not declare a valid ``kind`` / ``distkern_api``."""


class IncompatibleMethodError(MethodLoadError):
    """The class was written for another plugin API version."""


class MethodCollisionError(MethodError):
    """Two claimants for one method name."""


@dataclass(frozen=True)
class MethodInfo:
    """One row of the registry table."""

    name: str
    kind: str | None
    package: str
    version: str | None
    status: str  # "ok" | "broken" | "incompatible" | "collision"
    error: str | None
    target: str
    source: str  # "entry-point" | "in-process"
    obj: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The row without ``obj``, ready for JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "obj"}


@dataclass
class _Claim:
    name: str
    package: str
    version: str | None
    target: str
    source: str
    ep: _md.EntryPoint | None = None
    obj: Any = None
    loaded: bool = False
    kind: str | None = None
    status: str = "ok"
    error: str | None = None
    shadows: bool = False  # in-process with replace=True: hides entry points of this name

    def describe(self) -> str:
        ver = f" {self.version}" if self.version else ""
        return f"{self.package}{ver} ({self.target})"


_lock = threading.RLock()
_entry_claims: dict[str, list[_Claim]] | None = None  # None: group not read yet
_inprocess: dict[str, _Claim] = {}


def _check(obj: Any, name: str, kind: Any) -> tuple[str | None, str, str | None]:
    """Validate a loaded class: (kind or None, status, error)."""
    good_kind = kind if isinstance(kind, str) and kind in KINDS else None
    if not isinstance(obj, type):
        return good_kind, "broken", (f"method {name!r} must be a class (the entry point names "
                                     f"{type(obj).__name__} {getattr(obj, '__name__', obj)!r})")
    api = getattr(obj, "distkern_api", None)
    if api is None or isinstance(api, bool) or not isinstance(api, int):
        return good_kind, "broken", (
            f"method {name!r} must declare an int class attribute `distkern_api` "
            f"(this distkern provides plugin API {API_VERSION}); got {api!r}")
    if api != API_VERSION:
        from ._version import __version__
        return good_kind, "incompatible", (
            f"method {name!r} targets distkern plugin API {api}, but this distkern "
            f"{__version__} provides plugin API {API_VERSION}")
    if good_kind is None:
        what = "declares no `kind` class attribute" if kind is None else f"has unknown kind {kind!r}"
        return None, "broken", f"method {name!r} {what}; expected one of {', '.join(KINDS)}"
    return good_kind, "ok", None


def _load(claim: _Claim) -> _Claim:
    if claim.loaded or claim.ep is None:
        return claim
    try:
        claim.obj = claim.ep.load()
        claim.kind, claim.status, claim.error = _check(
            claim.obj, claim.name, getattr(claim.obj, "kind", None))
        declared = getattr(claim.obj, "name", None)
        if claim.status == "ok" and isinstance(declared, str) and declared != claim.name:  # models record it
            claim.status, claim.error = "broken", (
                f"entry point {claim.name!r} loads a class whose name is {declared!r}; they must be equal (model "
                f"files record the class's name, and distkern score looks the method up by it)")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  a plugin must never take the registry down
        claim.status, claim.error = "broken", f"{type(e).__name__}: {e}"
    claim.loaded = True
    return claim


def _discover() -> dict[str, list[_Claim]]:
    """Read the entry-point group's metadata (no plugin is imported)."""
    global _entry_claims
    with _lock:
        if _entry_claims is None:
            table: dict[str, list[_Claim]] = {}
            for ep in _md.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                package = dist.name if dist is not None else "<unknown>"
                version = dist.version if dist is not None else None
                claims = table.setdefault(ep.name, [])
                if any(c.package == package and c.target == ep.value for c in claims):
                    continue  # the same distribution seen twice on sys.path
                claims.append(_Claim(ep.name, package, version, ep.value, "entry-point", ep))
            _entry_claims = table
        return _entry_claims


def _claims(name: str) -> list[_Claim]:
    own = _inprocess.get(name)
    if own is not None and own.shadows:
        return [own]
    return list(_discover().get(name, [])) + ([own] if own is not None else [])


def _names() -> list[str]:
    return sorted(set(_discover()) | set(_inprocess))


def _collision_message(name: str, claims: list[_Claim]) -> str:
    who = "; ".join(c.describe() for c in claims)
    return (f"method name {name!r} is claimed by {len(claims)} registrations: {who}. "
            "Uninstall or rename all but one of them.")


def available(refresh: bool = False) -> list[MethodInfo]:
    """Every registered method, sorted by name. Loads each plugin once (cached)."""
    if refresh:
        _drop_cache()
    rows: list[MethodInfo] = []
    with _lock:
        for name in _names():
            claims = [_load(c) for c in _claims(name)]
            collision = _collision_message(name, claims) if len(claims) > 1 else None
            for c in claims:
                status, error = ("collision", collision) if collision else (c.status, c.error)
                rows.append(MethodInfo(c.name, c.kind, c.package, c.version, status, error,
                                       c.target, c.source, c.obj if c.status == "ok" else None))
    return rows


def get(name: str) -> Any:
    """Load and return the method class ``name`` (importing only that plugin)."""
    with _lock:
        claims = _claims(name)
        if not claims:
            names = ", ".join(_names()) or "none"
            raise UnknownMethodError(f"no distkern method named {name!r}; available: {names} (a plugin is found "
                                     f"through the entry-point group [project.entry-points.\"{ENTRY_POINT_GROUP}\"] "
                                     f"of its installed package; reinstall it after changing its pyproject.toml)")
        if len(claims) > 1:
            raise MethodCollisionError(_collision_message(name, claims))
        c = _load(claims[0])
    if c.status == "ok":
        return c.obj
    err = {"incompatible": IncompatibleMethodError, "broken": MethodLoadError}[c.status]
    if c.status == "broken" and c.obj is not None:
        err = InvalidMethodError
    raise err(f"distkern method {name!r} from {c.describe()} cannot be used: {c.error}", name=name,
              error=c.error)


@overload
def register(cls: T, *, name: str | None = ..., kind: str | None = ..., replace: bool = ...) -> T: ...
@overload
def register(cls: None = ..., *, name: str | None = ..., kind: str | None = ...,
             replace: bool = ...) -> Callable[[T], T]: ...


def register(cls: Any = None, *, name: str | None = None, kind: str | None = None,
             replace: bool = False) -> Any:
    """Register ``cls`` in-process. Usable as ``register(C)``, ``@register`` or ``@register(name=...)``.

    ``name`` defaults to ``cls.name`` (if a string) or the lowercased class name; ``kind`` to
    ``cls.kind``. Raises :class:`InvalidMethodError` / :class:`IncompatibleMethodError` like an
    entry point would be refused, and :class:`MethodCollisionError` if the name is taken
    (in-process or by an entry point) unless ``replace=True``.
    """
    if cls is None:
        return lambda c: register(c, name=name, kind=kind, replace=replace)
    own_name = getattr(cls, "name", None)
    key = name or (own_name if isinstance(own_name, str) and own_name else cls.__name__.lower())
    target = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    the_kind, status, error = _check(cls, key, kind if kind is not None else getattr(cls, "kind", None))
    if status != "ok":
        err = IncompatibleMethodError if status == "incompatible" else InvalidMethodError
        raise err(f"cannot register {target}: {error}", name=key, error=error)
    claim = _Claim(key, IN_PROCESS, None, target, "in-process", obj=cls, loaded=True,
                   kind=the_kind, shadows=replace)
    with _lock:
        taken = _claims(key)
        old = _inprocess.get(key)
        if old is not None and old.target == target and taken == [old]:
            # the same class defined again (a re-run notebook cell, a reloaded module): it replaces itself
            claim.shadows = old.shadows or replace
        elif taken and not replace:
            if all(c.package == IN_PROCESS for c in taken):
                raise MethodCollisionError(
                    f"method name {key!r} is registered in-process already by {taken[0].target}; pass "
                    f"replace=True to register {target} in its place, or distkern.methods.unregister({key!r})")
            raise MethodCollisionError(_collision_message(key, taken + [claim])
                                       + " Pass replace=True to override in-process.")
        _inprocess[key] = claim
    return cls


def unregister(name: str) -> None:
    """Remove an in-process registration (entry points cannot be unregistered)."""
    with _lock:
        if _inprocess.pop(name, None) is None:
            raise UnknownMethodError(f"no in-process distkern method named {name!r}")


def refresh() -> None:
    """Forget what was read from entry points (in-process registrations stay)."""
    _drop_cache()


def _drop_cache() -> None:
    global _entry_claims
    with _lock:
        importlib.invalidate_caches()
        _entry_claims = None
