"""Anomaly-detection method plugins for distkern."""
from .gaussian_ad import GaussianAD

__all__ = ["GaussianAD"]
