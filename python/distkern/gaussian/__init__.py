"""Fitting Gaussians to features: streaming statistics, covariance estimates, shrinkage,
whitening factors, PCA / NPCA whitening and χ² thresholds."""
from .factor import NotPositiveDefiniteError, whitening_factor
from .pca import PCAWhitening, eigendecomposition, pca_whitening
from .shrinkage import empirical_covariance, ledoit_wolf, ledoit_wolf_shrinkage, oas, oas_shrinkage, shrink
from .stats import Estimator, GaussianStats
from .threshold import chi2_threshold, distance_threshold

__all__ = [
    "NotPositiveDefiniteError", "whitening_factor",
    "empirical_covariance", "ledoit_wolf", "oas", "ledoit_wolf_shrinkage", "oas_shrinkage", "shrink",
    "GaussianStats", "Estimator",
    "PCAWhitening", "eigendecomposition", "pca_whitening",
    "chi2_threshold", "distance_threshold",
]
