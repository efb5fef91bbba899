"""Typed Python entry points of the compiled ops, with their fake and autograd registrations."""
from . import mahalanobis  # noqa: F401

__all__ = ["mahalanobis"]
