"""The plugin's torch ops, ``torch.ops.distkern_example_kernel.*``: typed entry points, fake (meta) implementations for
``torch.compile`` and autograd formulas.

Importing this module loads the compiled library ``distkern_example_kernel._C`` after checking that it was built against
the torch and distkern installed now (a clear ImportError with the rebuild command otherwise).
"""
from __future__ import annotations

import torch

from distkern.cpp_extension import load_extension
from distkern.ops import call_op

_C = load_extension(__package__, distribution="distkern-example-kernel")  # registers torch.ops.distkern_example_kernel.*

__all__ = ["standardized_sqdist", "reference"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def standardized_sqdist(x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """``out[n] = Σ_d ((x[n, d] − mean[d]) · inv_std[d])²`` in one pass over ``x``.

    x: ``(N, D)`` float32 / float16 / bfloat16 / float64 (any strides); mean, inv_std: ``(D,)`` (converted
    to the accumulation type). Returns ``(N,)`` float32 (float64 for float64 ``x``), on ``x``'s device.
    Differentiable in all three inputs.
    """
    if not all(isinstance(t, torch.Tensor) for t in (x, mean, inv_std)):
        raise TypeError("distkern_example_kernel.standardized_sqdist: x, mean and inv_std must be tensors")
    if not x.is_floating_point():
        raise TypeError(f"distkern_example_kernel.standardized_sqdist: x must be a float32, float16, bfloat16 or float64 tensor; "
                        f"got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"distkern_example_kernel.standardized_sqdist: x must be (N, D); got shape {tuple(x.shape)}")
    D = x.shape[1]
    for arg, t in (("mean", mean), ("inv_std", inv_std)):
        if t.shape != (D,):
            raise ValueError(f"distkern_example_kernel.standardized_sqdist: {arg} must be (D,) = ({D},) for x of shape "
                             f"{tuple(x.shape)}; got {tuple(t.shape)}")
    acc = _acc(x.dtype)
    # call_op: straight below the Python autograd layer when no gradient can flow (~10 µs a call saved)
    return call_op(torch.ops.distkern_example_kernel.standardized_sqdist, x, mean.to(device=x.device, dtype=acc),
                   inv_std.to(device=x.device, dtype=acc))


def reference(x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """The same quantity in plain float64 torch (materialises the (N, D) difference): for tests."""
    return ((x.double() - mean.double()) * inv_std.double()).square().sum(1)


@torch.library.register_fake("distkern_example_kernel::standardized_sqdist")
def _standardized_sqdist_fake(x, mean, inv_std):
    torch._check(x.dim() == 2, lambda: f"distkern_example_kernel.standardized_sqdist: x must be (N, D); got {tuple(x.shape)}")
    return x.new_empty((x.shape[0],), dtype=_acc(x.dtype))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, mean, inv_std = ctx.saved_tensors
    diff = x.to(mean.dtype) - mean                      # (N, D): the backward may hold it, the forward never does
    g = (2.0 * grad.to(mean.dtype))[:, None] * diff * inv_std   # 2·grad_n·z_nd, z = (x − μ)·s
    gx = (g * inv_std).to(x.dtype) if ctx.needs_input_grad[0] else None
    gmean = -(g * inv_std).sum(0) if ctx.needs_input_grad[1] else None
    ginv = (g * diff).sum(0) if ctx.needs_input_grad[2] else None
    return gx, gmean, ginv


torch.library.register_autograd("distkern_example_kernel::standardized_sqdist", _backward, setup_context=_setup_context)
