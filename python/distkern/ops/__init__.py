"""Typed Python entry points of the compiled ops, with their fake and autograd registrations."""
from . import align, diffusion, kernel_sum, mahalanobis  # noqa: F401

__all__ = ["align", "diffusion", "kernel_sum", "mahalanobis"]
