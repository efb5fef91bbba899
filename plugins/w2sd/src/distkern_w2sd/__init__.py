"""W2SD (Weak-to-Strong Diffusion with Reflection) for distkern: a DDIM sampler that reflects the latent with a
strong and a weak denoiser before each step, on :mod:`distkern.diffusion`'s schedulers."""
from .w2sd import INDEXINGS, W2SD

__all__ = ["W2SD", "INDEXINGS"]
