"""Calling an op whose autograd formula is registered in Python, without that layer when no gradient can flow.

``torch.library.register_autograd`` puts a Python kernel at the Autograd dispatch key. Even when no input
requires grad it is entered: the C++ dispatcher boxes the arguments into Python objects, the kernel builds
its metadata and redispatches below autograd — about 10 µs a call on a 2-core CPU, more than the whole op
costs on small inputs (a few rows to score, one image's patch tokens). :func:`call` goes straight below
autograd in that case, which is exactly where that kernel would send the call, and keeps the registered path
whenever it matters: grad mode on with an input that requires grad, torch.compile tracing (dynamo sees the
plain op) and functorch transforms (their layers manage the dispatch keys themselves).
"""
from __future__ import annotations

import torch

_C = torch._C
_grad_enabled = _C.is_grad_enabled
_any_requires_grad = _C._any_requires_grad
_below_autograd = _C._AutoDispatchBelowAutograd
_transforms_active = getattr(_C, "_are_functorch_transforms_active", lambda: True)
_compiling = torch.compiler.is_compiling


def call(op, *args):
    """``op(*args)``, skipping the Python autograd kernel when the result cannot need a gradient."""
    if _compiling() or _transforms_active() or (_grad_enabled() and _any_requires_grad(*args)):
        return op(*args)
    with _below_autograd():
        return op(*args)
