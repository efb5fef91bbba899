"""Gaussian-mixture methods for distkern: a device EM (:mod:`.em`) and the ``gmm-ood`` detector."""
from .em import GMMConvergenceWarning, GMMFit, fit_gmm, kmeans_plusplus
from .gmm_ood import GMMOOD

__all__ = ["GMMOOD", "GMMFit", "GMMConvergenceWarning", "fit_gmm", "kmeans_plusplus"]
