"""Typed Python entry points of the compiled ops, with their fake and autograd registrations.

:func:`call_op` is for plugins too: the entry point of an op whose autograd formula is registered in
Python (``torch.library.register_autograd``) calls ``call_op(torch.ops.ns.name, *args)`` instead of
``torch.ops.ns.name(*args)`` and skips that Python layer (~10 µs a call on a 2-core CPU) whenever no
gradient can flow.
"""
from . import align, diffusion, kernel_sum, mahalanobis  # noqa: F401
from ._call import call as call_op

__all__ = ["align", "call_op", "diffusion", "kernel_sum", "mahalanobis"]
