r"""Diffusion schedulers with Hugging Face diffusers' API and results, stepping with distkern's fused step op.

Each scheduler is a drop-in for the diffusers class of the same name: same constructor arguments (and
defaults), ``config`` / ``from_config`` (also from a diffusers scheduler's ``.config``), ``set_timesteps``,
``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step`` (same extra arguments: ``eta``,
``generator``, ``variance_noise``, ``s_churn`` …), ``add_noise``, ``order``, ``from_pretrained`` /
``save_pretrained`` (diffusers' ``scheduler_config.json``). Their ``step`` is one kernel
(``torch.ops.distkern.sampler_step``) that reads the sample and model output once and writes the next sample and
the data prediction once, with float64 schedule coefficients and no host synchronisation.

Additions: ``timestep`` may be a ``(B,)`` tensor of per-sample timesteps (DDPM, DDIM, DDIM inverse, Euler, Euler
ancestral); noise without a ``generator`` is drawn inside the kernel, seeded per step from torch's default
generator (``torch.manual_seed`` replays a loop) or by
:meth:`~distkern.diffusion.DDIMScheduler.set_noise_seed`, the same numbers on CPU and CUDA.
Where the swap is not one line (pipeline saving, dtypes of ``pred_original_sample``): docs/diffusion.md.

diffusers is not needed (nor imported). Typical loop::

    from distkern.diffusion import DDIMScheduler
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # or DDIMScheduler(...)
    scheduler.set_timesteps(50, device="cuda")
    x = torch.randn(B, 4, 64, 64, device="cuda") * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x).prev_sample
"""
from ._base import SchedulerConfig, SchedulerOutput, randn_tensor
from .ddim import DDIMInverseScheduler, DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "SchedulerConfig", "SchedulerOutput",
           "randn_tensor"]
