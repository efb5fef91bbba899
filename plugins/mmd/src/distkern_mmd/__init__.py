"""Kernel methods on distkern's fused kernel sums."""
from .align import MMDAlign
from .kde import KDE

__all__ = ["KDE", "MMDAlign"]
