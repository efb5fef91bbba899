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

# DISTKERN_CUDA_TILES=64|128 forces the thread-tile shape of the CUDA tile-product kernels
# (default auto: 64); for benchmarking the two against each other.
import os as _os  # noqa: E402

if hasattr(_C, "set_cuda_tile_config") and _os.environ.get("DISTKERN_CUDA_TILES"):
    _tiles = {"auto": 0, "64": 1, "128": 2}.get(_os.environ["DISTKERN_CUDA_TILES"].strip())
    if _tiles is None:
        raise ImportError(f"DISTKERN_CUDA_TILES must be auto, 64 or 128; got {_os.environ['DISTKERN_CUDA_TILES']!r}")
    _C.set_cuda_tile_config(_tiles)

from .precision import cuda_matmul, get_cuda_matmul, set_cuda_matmul  # noqa: E402
from .precision import _from_env as _matmul_from_env  # noqa: E402

_matmul_from_env()

from . import ops  # noqa: E402  (registers fake / autograd implementations)
from .ops.mahalanobis import (  # noqa: E402
    gmm_log_likelihood, mahalanobis, mahalanobis_k, mahalanobis_pos, nearest_reference, reference_residual)
from .ops.kernel_sum import kernel_matmul  # noqa: E402
from .ops.diffusion import (  # noqa: E402
    ddim_step, ddpm_step, dpmpp_2m_step, euler_step, fit_lowrank_gaussian, gaussian_denoise, gaussian_teleport)
from .mmd import MMDLoss, kid, median_bandwidth, mmd2, mmd_test  # noqa: E402
from . import gaussian  # noqa: E402
from . import diffusion  # noqa: E402
from . import methods  # noqa: E402
from . import distributed  # noqa: E402
from . import io  # noqa: E402  (model files: distkern.io.load_model without a separate import)


# Submodules with optional or heavier imports load on first use, so `distkern.testing.check_method(...)` works after
# a plain `import distkern` (as the docs write it) without `import distkern` paying for them.
_LAZY_SUBMODULES = ("bench", "cli", "cpp_extension", "metrics", "scaffold", "testing")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def build_info() -> dict:
    """How the compiled module was built: version, torch it was built against, CUDA, archs, threads."""
    info = dict(_C.build_info())
    if hasattr(_C, "cuda_tile_config"):
        info["cuda_tile_config"] = {0: "auto", 1: "64", 2: "128"}[_C.cuda_tile_config()]
    # the CUDA schedules of the ops with Gram panels (cuBLAS products) beside their tile kernels
    for op in ("mahalanobis", "nearest", "kernel_sum"):
        if hasattr(_C, f"{op}_schedule"):
            info[f"cuda_{op}_schedule"] = {0: "auto", 1: "tiles", 2: "gram"}[getattr(_C, f"{op}_schedule")()]
    info["cuda_matmul"] = get_cuda_matmul()
    return info


__all__ = ["__version__", "build_info", "mahalanobis", "mahalanobis_k", "mahalanobis_pos", "gmm_log_likelihood",
           "nearest_reference", "reference_residual", "kernel_matmul", "mmd2", "mmd_test", "MMDLoss", "kid",
           "median_bandwidth", "gaussian", "diffusion", "methods", "ops", "ddim_step", "ddpm_step", "euler_step", "dpmpp_2m_step",
           "gaussian_denoise", "gaussian_teleport", "fit_lowrank_gaussian", "set_cuda_matmul", "get_cuda_matmul",
           "cuda_matmul"]
