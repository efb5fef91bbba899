"""distkern: fused C++/CUDA kernels for methods built on learned distributions.

Ops are torch ops (``torch.ops.distkern.*``) with CPU and CUDA kernels, fake (meta)
implementations for ``torch.compile`` and autograd formulas. Methods (detectors, losses,
samplers, aligners) are plugins found through the ``distkern.methods`` entry-point group.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from ._version import __version__
from ._loader import load_extension as _load_extension

_C = _load_extension()

from . import ops  # noqa: E402  (registers fake / autograd implementations)
from .ops.mahalanobis import gmm_log_likelihood, mahalanobis, mahalanobis_k  # noqa: E402
from . import gaussian  # noqa: E402
from . import methods  # noqa: E402


def build_info() -> dict:
    """How the compiled module was built: version, torch it was built against, CUDA, archs, threads."""
    return dict(_C.build_info())


__all__ = ["__version__", "build_info", "mahalanobis", "mahalanobis_k", "gmm_log_likelihood", "gaussian", "methods", "ops"]
