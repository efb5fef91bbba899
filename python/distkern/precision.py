"""How distkern's CUDA tile-product kernels multiply float32 tiles.

The ops built on the shared tile skeleton — :func:`~distkern.mahalanobis` (forward and backward),
:func:`~distkern.mahalanobis_k`, :func:`~distkern.mahalanobis_pos`,
:func:`~distkern.nearest_reference`, :func:`~distkern.kernel_matmul` (so :func:`~distkern.mmd2`) and
:func:`distkern.ops.align.anomaly_map` — form their ``x·W`` / ``x·y`` products in one of three ways on
CUDA (the anomaly map keeps a dedicated kernel for ``"fma"``):

``"fma"``
    float32 FMAs on the CUDA cores: float32-exact products and sums.
``"tf32"``
    tensor cores with TF32 inputs (10-bit mantissas) and float32 accumulation, as cuBLAS under
    ``torch.backends.cuda.matmul.allow_tf32 = True``: a product's relative error is ~1e-3 of
    ``|a|·|b|``. fp16 / bf16 inputs lose nothing (their mantissas fit in TF32), but values centred
    on a mean in float32 are rounded to TF32.
``"3xtf32"``
    tensor cores, float32-accurate: each operand is split ``a = big + small`` (both TF32) and
    ``a·b ≈ big·big + big·small + small·big`` — three mma per product, errors at the float32 level.

The default, ``"auto"``, is meant to be ``"tf32"`` when torch allows TF32 in cuBLAS matmuls
(``torch.backends.cuda.matmul.allow_tf32``, or ``torch.set_float32_matmul_precision("high")`` /
``"medium"``) and ``"fma"`` otherwise — the precision an eager PyTorch matmul gets under the same
settings. The tensor-core kernels have not run on a GPU yet (only in the tests' CPU emulation), so
until their CUDA tests pass on one, ``"auto"`` stays ``"fma"`` whatever torch allows
(:data:`AUTO_TENSOR_CORES` is False); ``"tf32"`` / ``"3xtf32"`` run them when asked for. float64 always runs on FMAs; GPUs older than sm_80 have no TF32 tensor cores and fall
back to ``"fma"``. The setting is process-wide and has no effect on the CPU. ``DISTKERN_CUDA_MATMUL``
(one of the mode names) sets it when distkern is imported.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import _C

MODES = ("auto", "fma", "tf32", "3xtf32")
_CODES = {"auto": -1, "fma": 0, "tf32": 1, "3xtf32": 2}
#: whether ``"auto"`` may pick the tensor-core kernels (set in the C++ build: csrc/common/matmul_mode.h)
AUTO_TENSOR_CORES: bool = bool(getattr(_C, "auto_tensor_cores", False))


def set_cuda_matmul(mode: str) -> None:
    """Set how the CUDA tile-product kernels multiply float32 tiles: one of :data:`MODES`."""
    if mode not in _CODES:
        raise ValueError(f"distkern.set_cuda_matmul: mode must be one of {MODES}; got {mode!r}")
    _C.set_matmul_mode(_CODES[mode])


def get_cuda_matmul() -> str:
    """The current setting (``"auto"`` unless changed); see the module docstring."""
    code = _C.matmul_mode()
    return next(k for k, v in _CODES.items() if v == code)


@contextlib.contextmanager
def cuda_matmul(mode: str) -> Iterator[None]:
    """``with distkern.cuda_matmul("3xtf32"): ...`` — the setting inside the block, restored after."""
    old = get_cuda_matmul()
    set_cuda_matmul(mode)
    try:
        yield
    finally:
        set_cuda_matmul(old)


def _from_env() -> None:
    mode = os.environ.get("DISTKERN_CUDA_MATMUL", "").strip()
    if mode:
        if mode not in _CODES:
            raise ImportError(f"DISTKERN_CUDA_MATMUL must be one of {MODES}; got {mode!r}")
        set_cuda_matmul(mode)
