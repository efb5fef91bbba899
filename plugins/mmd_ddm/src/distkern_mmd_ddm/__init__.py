"""MMD-DDM for distkern: MMD fine-tuning of a few-step DDIM sampler through distkern's fused DDIM step."""
from .loss import MMDDDMLoss
from .schedule import ddim_alpha_pairs, ddim_timesteps, ddpm_alphas_cumprod

__all__ = ["MMDDDMLoss", "ddpm_alphas_cumprod", "ddim_timesteps", "ddim_alpha_pairs"]
