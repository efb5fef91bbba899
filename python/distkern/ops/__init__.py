"""Typed Python entry points of the compiled ops, with their fake and autograd registrations."""
from . import diffusion, kernel_sum, mahalanobis  # noqa: F401

__all__ = ["diffusion", "kernel_sum", "mahalanobis"]
