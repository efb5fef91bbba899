"""Kernel sums over data split across ``torch.distributed`` ranks.

``K(x, y) @ v`` splits over the rows of ``y`` (and ``v``): each rank multiplies its own rows
and the partial sums add up. Rows of ``x`` need nothing at all: a rank that holds some rows of
``x`` and all of ``y`` computes its rows of the result alone.
"""
from __future__ import annotations

from typing import Any

import torch

from .ops.kernel_sum import kernel_matmul as _kernel_matmul

__all__ = ["kernel_matmul"]


def kernel_matmul(x: torch.Tensor, y_local: torch.Tensor, v_local: torch.Tensor | None = None, *, group: Any = None,
                  **kernel: Any) -> torch.Tensor:
    """``K(x, y) @ v`` for ``y`` (and ``v``) sharded by rows across the ranks of ``group``.

    Every rank passes the same ``x`` and its own rows ``y_local`` (``v_local``); the local sums
    are all-reduced, so every rank ends with the result one process would compute on the whole
    of ``y`` (up to the order of the float additions). Keyword arguments are those of
    :func:`distkern.kernel_matmul`. Forward only (the all-reduce is not differentiated).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distkern.distributed.kernel_matmul: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if y_local.shape[0] == 0:  # a rank without rows still takes part in the reduction
        C = v_local.shape[1] if v_local is not None and v_local.dim() == 2 else None
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros((x.shape[0], C) if C else (x.shape[0],), dtype=acc, device=x.device)
    else:
        out = _kernel_matmul(x, y_local, v_local, **kernel)
    dist.all_reduce(out, group=group)
    return out
