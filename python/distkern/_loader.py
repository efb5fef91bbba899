"""Load the compiled module with a clear message when it cannot be used.

The build records the torch (and CUDA) version it compiled against in ``_build_info.py``; a
mismatch at import time would otherwise surface as an undefined-symbol error from the dynamic
linker, which says nothing about the fix (rebuild).
"""
from __future__ import annotations

import torch

REBUILD = (
    "Rebuild distkern against the torch you run with, in this environment:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(from a clone of distkern; or `make install`)."
)


def _base(version: str) -> str:
    return version.split("+")[0]


def load_extension():
    """Import and return ``distkern._C`` (which registers ``torch.ops.distkern.*``)."""
    try:
        from . import _build_info
    except ImportError as e:
        raise ImportError(
            "distkern's compiled extension is missing (no build info found): distkern was not "
            "built. Install it with `pip install --no-build-isolation .`.\n" + REBUILD
        ) from e

    if _base(torch.__version__) != _base(_build_info.TORCH_VERSION):
        raise ImportError(
            f"distkern was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; C++ extensions are tied to the torch they were "
            "built with.\n" + REBUILD
        )
    if _build_info.WITH_CUDA and torch.version.cuda != _build_info.TORCH_CUDA_VERSION:
        raise ImportError(
            f"distkern's CUDA kernels were built for CUDA {_build_info.TORCH_CUDA_VERSION} "
            f"(torch's CUDA) but the installed torch uses CUDA {torch.version.cuda}.\n" + REBUILD
        )
    try:
        from . import _C
    except (ImportError, OSError) as e:
        raise ImportError(
            f"distkern's compiled module failed to load: {e}\n"
            "This usually means it was built against another torch or CUDA than the one "
            "installed.\n" + REBUILD
        ) from e
    return _C
