"""Analytical (Gaussian) teleportation for distkern samplers: skip the early part of diffusion sampling with the
closed-form probability-flow solution of a Gaussian fitted to the data, then continue with a usual scheduler."""
from .convert import alpha_bar_from_sigma, epsilon_model, sigma_from_alpha_bar, ve_to_vp, vp_to_ve
from .gmm import GaussianMixture, demo_mixture
from .teleport import LATENT_CONVENTIONS, GaussianTeleport, detect_latent_convention, schedule_sigmas

__all__ = ["GaussianTeleport", "LATENT_CONVENTIONS", "detect_latent_convention", "schedule_sigmas",
           "epsilon_model", "vp_to_ve", "ve_to_vp", "sigma_from_alpha_bar", "alpha_bar_from_sigma",
           "GaussianMixture", "demo_mixture"]
