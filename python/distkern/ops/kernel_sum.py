"""Kernel sums ``K(x, y) @ v`` without the N×M matrix: ``torch.ops.distkern.kernel_matmul``."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._call import call
from ._fake import acc_dtype, same_device

__all__ = ["kernel_matmul", "KERNELS"]

# kernel ids of csrc/kernel_sum/kernel_math.h, and the derivative kind the backward evaluates
KERNELS = {"gaussian": 0, "laplacian": 1, "imq": 2, "polynomial": 3, "distance": 4}
_DERIV = {0: 5, 1: 6, 2: 7, 3: 8, 4: 9}
_POLY, _POLY_D = 3, 8


def kernel_params(kernel: str, D: int, bandwidth=None, gamma=None, coef0: float = 1.0, degree: float = 3,
                  *, op: str = "distkern.kernel_matmul") -> tuple[int, list[float]]:
    """``(kernel id, params)`` for the op from a kernel name and its parameters, checked as the op checks them
    (so the paths that do not reach the op, such as ``mmd2``'s small batches, refuse the same arguments)."""
    if kernel not in KERNELS:
        raise ValueError(f"{op}: kernel must be one of {sorted(KERNELS)}; got {kernel!r}")
    kind = KERNELS[kernel]
    if kernel == "polynomial":
        params = [float(1.0 / D if gamma is None else gamma), float(coef0), float(degree)]
        if not all(math.isfinite(p) for p in params):
            raise ValueError(f"{op}: polynomial parameters (gamma, coef0, degree) must be finite; got {params}")
        if params[2] < 1:
            raise ValueError(f"{op}: polynomial degree must be >= 1; got {params[2]}")
        return kind, params
    if kernel == "distance":
        return kind, []
    if bandwidth is None:
        raise ValueError(f"{op}: the {kernel} kernel needs bandwidth= (a float or a list of floats; "
                         "distkern.median_bandwidth(x, y) gives the median heuristic)")
    try:
        if isinstance(bandwidth, (torch.Tensor, np.ndarray)):
            bw = [float(b) for b in bandwidth.reshape(-1).tolist()]
        elif isinstance(bandwidth, (list, tuple)):
            bw = [float(b) for b in bandwidth]
        else:
            bw = [float(bandwidth)]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: bandwidth must be a number or a list of numbers; got {bandwidth!r}") from None
    if not 1 <= len(bw) <= MAX_BANDWIDTHS:
        raise ValueError(f"{op}: between 1 and {MAX_BANDWIDTHS} bandwidths; got {len(bw)}")
    if not all(math.isfinite(b) and b > 0 for b in bw):
        raise ValueError(f"{op}: bandwidths must be finite and > 0; got {bw}")
    return kind, bw


MAX_BANDWIDTHS = 16  # kMaxParams of csrc/kernel_sum/kernel_math.h


def kernel_matmul(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor | None = None, *, kernel: str = "gaussian",
                  bandwidth=None, gamma: float | None = None, coef0: float = 1.0, degree: float = 3) -> torch.Tensor:
    r"""``K(x, y) @ v`` for a kernel evaluated on the fly; the ``(N, M)`` matrix is never stored.

    Memory is O(N + M) beyond the inputs and output: the CPU forms K one cache-sized tile at a time;
    CUDA keeps it in shared memory for up to 64 columns of ``v``, and for more (permutation tests,
    the backward's ``C·D`` columns) writes it in bounded panels (at most 2048 × 8192 floats) that
    cuBLAS multiplies by ``v``, rather than re-forming each tile once per 64 columns. From ``D = 256``
    on, CUDA lets cuBLAS form each panel's ``x·y`` products too (TF32 only under
    ``distkern.cuda_matmul("tf32")``), and a φ kernel turns them into K in place.

    Kernels (``r = ‖x − y‖``; several bandwidths are summed in one pass, as multi-kernel MMD does):
    ``"gaussian"`` ``Σ_σ exp(−r²/(2σ²))``, ``"laplacian"`` ``Σ_σ exp(−r/σ)``, ``"imq"``
    ``Σ_σ (1 + r²/σ²)^(−½)``, ``"polynomial"`` ``(γ x·y + c)^d`` (the KID kernel: ``d=3``,
    ``γ=1/D``, ``c=1``, the defaults), ``"distance"`` ``r`` (energy distance).

    Args:
        x: ``(N, D)``, y: ``(M, D)``: float32 / float16 / bfloat16 / float64, any strides.
        v: ``(M, C)`` or ``(M,)`` weights; ``None`` means ones (row sums of K).
        bandwidth: σ, or a list of σ (up to 16), for the Gaussian, Laplacian and IMQ kernels.

    Returns:
        ``(N, C)`` (``(N,)`` when ``v`` is ``None`` or 1-D) in float32 (float64 for float64 x).
        Squared distances are ``‖x‖² + ‖y‖² − 2x·y`` on data centred on the mean of ``y``,
        clamped at 0; the gradients of the Laplacian and distance kernels are 0 at ``x = y``
        (no NaN). Differentiable in ``x``, ``y`` and ``v``: the backward evaluates the kernel's
        derivative with the same op, so no ``(N, M)`` tensor exists there either.
    """
    kind, params = kernel_params(kernel, x.shape[-1], bandwidth, gamma, coef0, degree)
    squeeze = v is not None and v.dim() == 1
    out = call(torch.ops.distkern.kernel_matmul, x, y, v[:, None] if squeeze else v, kind, params)
    return out[:, 0] if squeeze else out


@torch.library.register_fake("distkern::kernel_matmul")
def _fake(x, y, v, kernel, params):
    same_device("distkern.kernel_matmul", x=x, y=y, v=v)
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "distkern.kernel_matmul: x must be (N, D) and y (M, D)")
    return x.new_empty((x.shape[0], v.shape[1]) if v is not None else (x.shape[0],), dtype=acc_dtype(x))


def _setup(ctx, inputs, output):
    x, y, v, kernel, params = inputs
    ctx.save_for_backward(x, y, v)
    ctx.kernel, ctx.params = kernel, list(params)


def _backward(ctx, grad):
    x, y, v = ctx.saved_tensors
    kind, params = ctx.kernel, ctx.params
    if kind >= 5:
        raise RuntimeError("distkern.kernel_matmul: second derivatives are not implemented")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    op = torch.ops.distkern.kernel_matmul
    g = grad.to(acc)
    g = g[:, None] if g.dim() == 1 else g  # (N, C)
    va = v.to(acc) if v is not None else torch.ones(y.shape[0], 1, dtype=acc, device=y.device)
    xa, ya = x.to(acc), y.to(acc)
    N, C, D = g.shape[0], g.shape[1], x.shape[1]
    dkind = _DERIV[kind]
    grad_x = grad_y = grad_v = None
    need_x, need_y, need_v = ctx.needs_input_grad[:3]
    if C == 0:  # an empty output: no dependence on anything
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(y) if need_y else None,
                torch.zeros_like(v) if need_v and v is not None else None, None, None)
    if need_v and v is not None:
        grad_v = op(y, x, g, kind, params).to(v.dtype)
    if need_x:
        # Σ_m ψ_nm (g_n·v_m) y_m, with ψ the derivative kernel
        b = op(x, y, (va[:, :, None] * ya[:, None, :]).reshape(-1, C * D), dkind, params).reshape(N, C, D)
        b = (g[:, :, None] * b).sum(1)
        if kind == _POLY:
            grad_x = b
        else:  # ∂r²/∂x = 2(x − y)
            a = (g * op(x, y, va, dkind, params)).sum(1, keepdim=True)
            grad_x = 2 * (xa * a - b)
        grad_x = grad_x.to(x.dtype)
    if need_y:
        bt = op(y, x, (g[:, :, None] * xa[:, None, :]).reshape(-1, C * D), dkind, params).reshape(-1, C, D)
        bt = (va[:, :, None] * bt).sum(1)
        if kind == _POLY:
            grad_y = bt
        else:
            at = (va * op(y, x, g, dkind, params)).sum(1, keepdim=True)
            grad_y = 2 * (ya * at - bt)
        grad_y = grad_y.to(y.dtype)
    return grad_x, grad_y, grad_v, None, None


torch.library.register_autograd("distkern::kernel_matmul", _backward, setup_context=_setup)


# mmd2's small-sample path on the CPU (csrc/kernel_sum/dense.cpp): no autograd of their own, mmd2's
# autograd.Function calls them. Fake implementations for torch.compile / opcheck.
@torch.library.register_fake("distkern::dense_gram")
def _fake_gram(z):
    torch._check(z.dim() == 2, lambda: "distkern.dense_gram: z must be 2-D")
    return z.new_empty((z.shape[0], z.shape[0]))


@torch.library.register_fake("distkern::dense_mm")
def _fake_mm(a, b):
    same_device("distkern.dense_mm", a=a, b=b)
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                 lambda: "distkern.dense_mm: a (M, K) and b (K, N) needed")
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("distkern::dense_mmd")
def _fake_dense_mmd(x, y, kernel, params, estimator, need_x, need_y):
    same_device("distkern.dense_mmd", x=x, y=y)
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "distkern.dense_mmd: x must be (n, D) and y (m, D)")
    n, m, dt = x.shape[0], y.shape[0], acc_dtype(x)
    rows = (n if need_x else 0) + (m if need_y else 0)
    centred = kernel != KERNELS["polynomial"]  # the distance kernels return x and y centred; the others, (0, D)
    xc, yc = (x.new_empty((k if centred else 0, x.shape[1]), dtype=dt) for k in (n, m))
    return x.new_empty((), dtype=dt), x.new_empty((rows, n + m), dtype=dt), xc, yc


@torch.library.register_fake("distkern::dense_mmd_grad")
def _fake_dense_mmd_grad(b, x, y, row0, dot):
    same_device("distkern.dense_mmd_grad", b=b, x=x, y=y)
    return b.new_empty((b.shape[0], x.shape[1]))
