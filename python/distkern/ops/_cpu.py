"""The CPU products of the Python-side compositions: distkern's own micro-kernel where it runs.

torch multiplies float32 on the CPU through MKL, which on AMD processors runs its AVX2 code even where
the core has AVX-512, and pays a BLAS call's overhead on small products (csrc/common/cpu_gemm.h);
``distkern.dense_mm`` is the same product on distkern's own kernel (AVX-512F, else AVX2+FMA). No autograd:
for use in backward passes (outside grad mode) and inside ``autograd.Function``s.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def fast_cpu_products() -> bool:
    """Whether distkern's CPU product kernel runs in this process (AVX-512F or AVX2+FMA, DISTKERN_CPU_GEMM
    not 0)."""
    from .. import _C
    return bool(_C.cpu_fast_gemm())


def product_kernel_name() -> str | None:
    """``"AVX-512"`` or ``"AVX2"``: the micro-kernel that runs distkern's CPU products here, or None (torch's
    BLAS) — what ``distkern info`` and the bench's ceiling report."""
    from .. import _C
    return {"avx512": "AVX-512", "avx2": "AVX2"}.get(_C.cpu_gemm_isa())


@functools.lru_cache(maxsize=None)
def vector_cpu_math() -> str | None:
    """``"AVX-512"`` or ``"AVX2"``: the vector lanes of distkern's CPU math (the φ of the kernel sums, the
    anomaly map's sigmoid) in this process, or None (scalar code: DISTKERN_CPU_GEMM=0, or neither set)."""
    from .. import _C
    return {"avx512": "AVX-512", "avx2": "AVX2"}.get(_C.cpu_math_isa())


def _takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and not torch.is_grad_enabled() and fast_cpu_products())


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``(B, n, k)`` and ``(B, k, m)``: per batch on distkern's kernel where it runs (float32
    CPU tensors, outside grad mode), else torch's ``@``."""
    if not _takes(a, b) or a.shape[0] == 0:  # B = 0: torch.stack refuses an empty list
        return a @ b
    return torch.stack([torch.ops.distkern.dense_mm(a[i], b[i]) for i in range(a.shape[0])])
