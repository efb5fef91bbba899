"""Typed Python entry points of the compiled ops, with their fake and autograd registrations."""
from . import kernel_sum, mahalanobis  # noqa: F401

__all__ = ["kernel_sum", "mahalanobis"]
