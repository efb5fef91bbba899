"""Out-of-distribution detectors for distkern (method plugins, group ``distkern.methods``).

* ``mahalanobis-ood`` — :class:`~distkern_ood.mahalanobis.MahalanobisOOD` (Lee et al. 2018)
* ``class-center`` — :class:`~distkern_ood.class_center.ClassCenter` (distance to class centers)
* ``energy`` — :class:`~distkern_ood.energy.Energy` (Liu et al. 2020; AbeT, LeVine et al. 2024)

The submodules are imported on first use, so the registry loading one method does not import
the others.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MahalanobisOOD", "ClassCenter", "Energy"]

_WHERE = {"MahalanobisOOD": ".mahalanobis", "ClassCenter": ".class_center", "Energy": ".energy"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
