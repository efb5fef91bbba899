"""Fitting Gaussians to features: covariance estimates, shrinkage and whitening factors."""
from .factor import NotPositiveDefiniteError, whitening_factor
from .shrinkage import empirical_covariance, ledoit_wolf

__all__ = ["NotPositiveDefiniteError", "whitening_factor", "empirical_covariance", "ledoit_wolf"]
