"""Kernel sums and MMD² over data split across ``torch.distributed`` ranks.

``K(x, y) @ v`` splits over the rows of ``y`` (and ``v``): each rank multiplies its own rows
and the partial sums add up. Rows of ``x`` need nothing at all: a rank that holds some rows of
``x`` and all of ``y`` computes its rows of the result alone. :func:`mmd2` builds the MMD²
estimators on that: each rank sums its own rows against all rows (gathered; the (N, N) kernel
matrix is never formed), three scalars are all-reduced, and the gradient w.r.t. each rank's
shard is exact without any collective in the backward.
"""
from __future__ import annotations

from typing import Any

import torch

from .ops.kernel_sum import kernel_matmul as _kernel_matmul
from .ops.kernel_sum import kernel_params

__all__ = ["kernel_matmul", "mmd2"]


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_code(t: torch.Tensor) -> int:
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1


def _agree(dist: Any, who: str, group: Any, device: torch.device, local_error: Exception | None,
           fields: list[tuple[str, int]]) -> None:
    """Before any data moves: every rank learns whether all ranks accepted their arguments and agree on
    ``fields`` (one small all-gather), and all of them raise the same way if not — instead of one rank
    raising while the others wait in a collective (a hang), or ranks exchanging tensors of different sizes
    (gloo aborts the process) or silently reducing different things."""
    vals = torch.tensor([0 if local_error is not None else 1] + [int(v) for _, v in fields], dtype=torch.int64,
                        device=device)
    parts = [torch.empty_like(vals) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, vals, group=group)
    table = torch.stack(parts).cpu()
    if local_error is not None:
        raise local_error
    refused = [r for r in range(table.shape[0]) if int(table[r, 0]) == 0]
    if refused:
        raise ValueError(f"{who}: rank(s) {refused} refused their arguments (their error says why)")
    for j, (name, _) in enumerate(fields, start=1):
        col = table[:, j]
        if not bool((col == col[0]).all()):
            raise ValueError(f"{who}: the ranks disagree on {name}: {col.tolist()} (in rank order)")


def kernel_matmul(x: torch.Tensor, y_local: torch.Tensor, v_local: torch.Tensor | None = None, *, group: Any = None,
                  **kernel: Any) -> torch.Tensor:
    """``K(x, y) @ v`` for ``y`` (and ``v``) sharded by rows across the ranks of ``group``.

    Every rank passes the same ``x`` and its own rows ``y_local`` (``v_local``); the local sums
    are all-reduced, so every rank ends with the result one process would compute on the whole
    of ``y`` (up to the order of the float additions). Keyword arguments are those of
    :func:`distkern.kernel_matmul`. The ranks first check that they agree on x's shape, D, the dtypes,
    v's columns and whether x requires grad, and all raise the same ``ValueError`` if one refuses its
    arguments.

    Differentiable, for a loss that every rank computes alike from the (replicated) result: each rank
    gets the one-process gradient w.r.t. its ``y_local`` and ``v_local`` (no collective), and w.r.t.
    ``x`` the sum over the ranks of their parts (one all-reduce in the backward, so every rank must run
    it when x requires grad).
    """
    who = "distkern.distributed.kernel_matmul"
    dist = _require_dist("kernel_matmul")
    error = None
    try:
        if x.dim() != 2 or y_local.dim() != 2 or x.shape[1] != y_local.shape[1]:
            raise ValueError(f"{who}: x and y_local must be (N, D) and (m_r, D) with one D; got {tuple(x.shape)} "
                             f"and {tuple(y_local.shape)}")
        if v_local is not None and (v_local.dim() not in (1, 2) or v_local.shape[0] != y_local.shape[0]):
            raise ValueError(f"{who}: v_local must be (m_r,) or (m_r, C) with m_r = {y_local.shape[0]}; got "
                             f"{tuple(v_local.shape)}")
        kernel_params(kernel.get("kernel", "gaussian"), x.shape[-1], op=who,
                      **{k: w for k, w in kernel.items() if k != "kernel"})
    except (ValueError, TypeError) as e:
        error = e
    x_grad = torch.is_grad_enabled() and x.requires_grad
    C = -1 if v_local is None else (0 if v_local.dim() <= 1 else v_local.shape[-1])
    _agree(dist, who, group, x.device, error, [  # (a 0-dim tensor was refused above; -1 keeps the header well formed)
        ("x's shape (rows)", x.shape[0] if x.dim() else -1), ("D", x.shape[-1] if x.dim() else -1),
        ("y's D", y_local.shape[-1] if y_local.dim() else -1),
        ("x's dtype", _dtype_code(x)), ("y's dtype", _dtype_code(y_local)), ("v (absent: -1, 1-D: 0, else C)", C),
        ("x requires grad", int(x_grad))])

    if y_local.shape[0] == 0 and not x_grad:  # a rank without rows still takes part in the reduction
        C = v_local.shape[1] if v_local is not None and v_local.dim() == 2 else None
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        part = torch.zeros((x.shape[0], C) if C else (x.shape[0],), dtype=acc, device=x.device)
    else:  # (with x requiring grad even without rows: x's gradient is all-reduced in the backward)
        part = _kernel_matmul(_XToShards.apply(x, group) if x_grad else x, y_local, v_local, **kernel)
    if torch.is_grad_enabled() and part.requires_grad:
        return _SumOfShards.apply(part, group)
    dist.all_reduce(part, group=group)
    return part


class _XToShards(torch.autograd.Function):
    """x as it is; its gradient summed over the ranks (each rank's part of the sum contributes one)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)  # one copy, contiguous, for the collective
        _require_dist("kernel_matmul").all_reduce(g, group=ctx.group)
        return g, None


class _SumOfShards(torch.autograd.Function):
    """The ranks' partial sums all-reduced; the gradient passes as it is (every rank's loss is the same
    function of the same result, so each part's gradient is the result's)."""

    @staticmethod
    def forward(ctx, part, group):
        out = part.clone()
        _require_dist("kernel_matmul").all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def _require_dist(who: str):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"distkern.distributed.{who}: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return dist


def _gather_rows(t: torch.Tensor, group: Any) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``t`` concatenated in rank order (shards may differ in length), detached."""
    dist = _require_dist("mmd2")
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(v) for v in sizes]  # the shard sizes, needed to unpad (one small host sync)
    top = max(sizes)
    pad = torch.zeros((top - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = torch.cat([t.detach(), pad]) if top > t.shape[0] else t.detach().contiguous()
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]), sum(sizes)


def mmd2(x_local: torch.Tensor, y_local: torch.Tensor, *, kernel: str = "gaussian", bandwidth=None,
         estimator: str = "unbiased", group: Any = None, **kernel_kw: Any) -> torch.Tensor:
    """MMD² of the samples whose rows are split across the ranks of ``group`` (each rank passes its shards
    ``x_local (n_r, D)``, ``y_local (m_r, D)``; shard sizes may differ, a rank may hold none).

    Every rank returns the value :func:`distkern.mmd2` gives on the concatenated samples (``"biased"`` or
    ``"unbiased"`` estimator; up to the order of float additions), and its backward gives the exact
    gradient w.r.t. its own shards: each rank sums its rows against all rows through
    :func:`distkern.kernel_matmul` (all rows gathered, O((n+m)·D) per rank, no kernel matrix), and by the
    kernel's symmetry the gradient of a pairwise sum w.r.t. a row is twice its row's part, so the
    backward needs no collective. ``bandwidth`` is required for bandwidth kernels (a median over all
    ranks' data would need it gathered; compute it once with :func:`distkern.median_bandwidth`).
    """
    from .mmd import _paired

    if estimator not in ("biased", "unbiased"):
        raise ValueError(f"distkern.distributed.mmd2: estimator must be 'biased' or 'unbiased'; got {estimator!r}")
    if kernel in ("gaussian", "laplacian", "imq") and bandwidth is None:
        raise ValueError("distkern.distributed.mmd2: give bandwidth= (the median heuristic would need every rank's "
                         "data; distkern.median_bandwidth on a gathered subsample gives one)")
    dist = _require_dist("mmd2")
    params = dict(bandwidth=bandwidth, **kernel_kw)
    who = "distkern.distributed.mmd2"
    error = None
    try:  # a rank's own data can be wrong: refuse it on every rank (a local raise would leave the others waiting)
        if x_local.dim() != 2 or y_local.dim() != 2 or x_local.shape[1] != y_local.shape[1]:
            raise ValueError(f"{who}: x_local and y_local must be (n_r, D) and (m_r, D) with one D; got "
                             f"{tuple(x_local.shape)} and {tuple(y_local.shape)}")
        kernel_params(kernel, x_local.shape[1], **params, op=who)
    except (ValueError, TypeError) as e:
        error = e
    _agree(dist, who, group, x_local.device, error, [("D", x_local.shape[-1] if x_local.dim() else -1),
                                               ("x's dtype", _dtype_code(x_local)), ("y's dtype", _dtype_code(y_local))])
    X, n = _gather_rows(x_local, group)
    Y, m = _gather_rows(y_local, group)
    if n < 2 or m < 2:
        raise ValueError(f"distkern.distributed.mmd2: needs at least 2 samples on each side in total; got n={n}, m={m}")
    acc = torch.float64 if x_local.dtype == torch.float64 else torch.float32

    def rowsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # Σ_i∈a Σ_j k(a_i, b_j); 0 for a rank without rows
        if a.shape[0] == 0:
            return torch.zeros((), dtype=acc, device=a.device) + 0 * a.sum()
        return _kernel_matmul(a, b, kernel=kernel, **params).sum()

    def diagsum(a: torch.Tensor) -> torch.Tensor:  # Σ_i k(a_i, a_i)
        return _paired(a, a, kernel, params).sum()

    sxx, syy = rowsum(x_local, X), rowsum(y_local, Y)
    sxy, syx = rowsum(x_local, Y), rowsum(y_local, X)
    dxx, dyy = diagsum(x_local), diagsum(y_local)
    if estimator == "biased":
        cxx, cyy, dcx, dcy = 1.0 / (n * n), 1.0 / (m * m), 0.0, 0.0
    else:
        cxx, cyy = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1))
        dcx, dcy = cxx, cyy  # the diagonals k(x_i, x_i) leave the within-sample sums
    cxy = 1.0 / (n * m)
    # value: the all-reduced sums (sxy and syx both hold the whole cross sum once all-reduced; use sxy)
    parts = torch.stack([sxx, syy, sxy, dxx, dyy]).detach().to(acc)
    dist.all_reduce(parts, group=group)
    value = cxx * parts[0] + cyy * parts[1] - 2 * cxy * parts[2] - dcx * parts[3] - dcy * parts[4]
    # gradient w.r.t. the local shards: twice the row part of each symmetric pairwise sum; the cross sum's
    # gradient w.r.t. x comes from sxy's rows and w.r.t. y from syx's rows; diagonals are local
    surrogate = 2 * cxx * sxx + 2 * cyy * syy - 2 * cxy * (sxy + syx) - dcx * dxx - dcy * dyy
    return value + (surrogate - surrogate.detach())
