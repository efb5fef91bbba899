"""``mmd-ddm``: the MMD-DDM fine-tuning loss (Aiello, Valsesia, Magli, "Fast Inference in Denoising
Diffusion Models via MMD Finetuning", 2023; code: github.com/diegovalsesia/MMD-DDM).

A pre-trained ε-prediction denoiser is sampled with a few-step DDIM chain from given Gaussian noise; the
chain is kept differentiable end to end, the generated batch and a batch of real data are mapped through a
feature extractor (Inception / CLIP in the paper, the identity here by default) and the loss is the unbiased
MMD² between the two feature batches with the KID kernel ``(x·y/D + 1)³``. Minimising it over the
denoiser's parameters adapts the model to the sampler it will be used with.

Every DDIM step is one call of distkern's fused op :func:`distkern.ops.diffusion.ddim_step`, whose backward is
registered with autograd, so ``loss.backward()`` back-propagates through all the steps; the MMD is
:func:`distkern.mmd2`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

import distkern
from distkern.ops.diffusion import PREDICTION_TYPES, ddim_step

from .schedule import _check_steps, ddim_alpha_pairs, ddim_timesteps, ddpm_alphas_cumprod

__all__ = ["MMDDDMLoss"]


class MMDDDMLoss(torch.nn.Module):
    r"""MMD² between a ``num_steps``-step DDIM sample of ``denoiser`` and real data (MMD-DDM's objective).

    Args:
        denoiser: called as ``denoiser(x_t, t)`` with ``x_t`` ``(B, ...)`` and ``t`` a ``(B,)`` ``torch.long``
            tensor of DDPM timesteps in ``[0, T)``; returns the ``(B, ...)`` prediction (ε by default; a
            ``.sample`` attribute — diffusers' ``UNet2DOutput`` — or the first element of a tuple is used).
            An ``nn.Module`` becomes a submodule of the loss (optimise ``loss.denoiser.parameters()``).
        num_steps: DDIM steps of the training chain (the paper fine-tunes at 5 or 10).
        kernel: MMD kernel, ``"polynomial"`` (the KID kernel ``(γ x·y + coef0)^degree``, γ = 1/D by default;
            the paper's) or ``"gaussian"`` / ``"laplacian"`` / ``"imq"`` with ``bandwidth`` a float or a list
            of floats (summed: multi-bandwidth MMD; ``None`` = the median heuristic per batch).
        feature_fn: maps a ``(B, ...)`` batch of samples to ``(B, ...)`` features, flattened to ``(B, D)``
            (the paper: Inception-v3 pool features or CLIP image embeddings, frozen). ``None``: the samples
            themselves. Applied to the real batch without gradient unless ``real.requires_grad``.
        eta: DDIM's η (0: deterministic DDIM, the paper's setting; > 0 adds noise, drawn with the
            ``generator`` given to ``forward`` / ``sample``, treated as a constant by the gradient).

    Keyword args:
        estimator: passed to :func:`distkern.mmd2` (``"unbiased"``: within-sample diagonals dropped, full
            cross term — the paper's and KID's form).
        degree, gamma, coef0, bandwidth: kernel parameters (see :func:`distkern.mmd2`).
        prediction_type: ``"epsilon"`` (default), ``"v_prediction"`` or ``"sample"``.
        clip_sample: clamp the predicted x0 to ``[-clip_sample, clip_sample]`` at each step (off by default,
            as in the paper's sampler).
        checkpoint: wrap each denoiser call in :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the
            denoiser's activations are recomputed in the backward instead of being kept for all steps, as the
            paper does for its larger data sets.
        spacing: the DDIM timestep subsequence, ``"uniform"`` (paper / DDIM: ``[0, 200, …, 800]`` for 5 of
            1000 steps), ``"quad"`` or ``"trailing"`` (see :func:`distkern_mmd_ddm.schedule.ddim_timesteps`).
        num_train_timesteps, beta_start, beta_end, beta_schedule: the DDPM schedule the denoiser was trained
            with (default: DDPM's linear 1e-4 … 0.02 over 1000 steps), or ``alphas_cumprod`` given directly.
        feature_dtype: dtype the features are cast to before the MMD (default float64, as the paper's loss;
            ``None`` keeps the feature extractor's dtype).

    ``forward(noise (B, ...), real (B', ...)) → 0-d tensor``: runs the chain from ``noise`` (same per-sample
    shape as ``real``; ``B, B' ≥ 2``) and returns ``mmd2(features(generated), features(real))``.
    """

    name = "mmd-ddm"
    kind = "loss"
    distkern_api = 1

    def __init__(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_steps: int = 5,
                 kernel: str = "polynomial", feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 eta: float = 0.0, *, estimator: str = "unbiased", degree: float = 3, gamma: float | None = None,
                 coef0: float = 1.0, bandwidth: float | Sequence[float] | None = None,
                 prediction_type: str = "epsilon", clip_sample: float | None = None, checkpoint: bool = False,
                 spacing: str = "uniform", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 alphas_cumprod: torch.Tensor | None = None, feature_dtype: torch.dtype | None = torch.float64):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"mmd-ddm: denoiser must be callable as denoiser(x_t, t); got {type(denoiser).__name__}")
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"mmd-ddm: feature_fn must be callable or None; got {type(feature_fn).__name__}")
        if not float(eta) >= 0.0:
            raise ValueError(f"mmd-ddm: eta must be >= 0; got {eta}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"mmd-ddm: prediction_type must be one of {list(PREDICTION_TYPES)}; "
                             f"got {prediction_type!r}")
        if clip_sample is not None and not float(clip_sample) > 0:
            raise ValueError(f"mmd-ddm: clip_sample must be > 0 or None; got {clip_sample}")
        if kernel == "distance":  # k = r is not positive definite: the "MMD²" is minus the energy distance
            raise ValueError("mmd-ddm: kernel='distance' makes the loss minus the energy distance, so minimising it "
                             "pushes the samples away from the data; use 'polynomial', 'gaussian', 'laplacian' or "
                             "'imq'")
        # validates kernel, estimator and the kernel parameters early (ValueError with the kernel's name)
        self.mmd = distkern.MMDLoss(kernel=kernel, bandwidth=bandwidth, estimator=estimator, degree=degree,
                                    gamma=gamma, coef0=coef0)
        if alphas_cumprod is None:
            alphas_cumprod = ddpm_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        else:
            alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
            if alphas_cumprod.dim() != 1 or not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
                raise ValueError("mmd-ddm: alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        self.alphas_cumprod = alphas_cumprod  # float64 CPU, not a buffer: .to(dtype) must not round it
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        ddim_timesteps(1, self.num_train_timesteps, spacing)  # validates spacing
        self.spacing = spacing
        self.num_steps = _check_steps(num_steps, self.num_train_timesteps)[0]
        self.denoiser = denoiser
        self.feature_fn = feature_fn
        self.kernel, self.eta, self.prediction_type = kernel, float(eta), prediction_type
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.checkpoint = bool(checkpoint)
        self.feature_dtype = feature_dtype

    @classmethod
    def example_instance(cls) -> "MMDDDMLoss":
        """A small instance for :func:`distkern.testing.check_method`: a 2-step chain of a tiny residual-MLP
        ε-model on 8-D samples (the checker's default loss inputs are ``(64, 8)`` and ``(48, 8)``)."""
        return cls(_ExampleDenoiser(8), num_steps=2)

    # ------------------------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int | None = None) -> list[int]:
        """The DDIM timesteps of a ``num_steps`` chain (default: the training chain), largest first."""
        return ddim_timesteps(self.num_steps if num_steps is None else num_steps, self.num_train_timesteps,
                              self.spacing)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, t)
        if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"mmd-ddm: the denoiser must return a tensor; got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"mmd-ddm: the denoiser's output shape {tuple(out.shape)} must equal its input shape "
                             f"{tuple(x.shape)} (an ε / v / x0 prediction per element)")
        return out.to(x.dtype)

    def generate(self, noise: torch.Tensor, num_steps: int | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The DDIM chain from ``noise`` ``(B, ...)`` (``x_T``), differentiable w.r.t. the denoiser's
        parameters (and ``noise``); returns the generated ``(B, ...)`` batch in ``noise``'s dtype."""
        _check_tensor("noise", noise)
        steps = ddim_alpha_pairs(self.alphas_cumprod, self.timesteps(num_steps))
        x = noise
        B = x.shape[0]
        for t, a_t, a_prev in steps:
            tt = torch.full((B,), t, dtype=torch.long, device=x.device)
            if self.checkpoint and torch.is_grad_enabled():
                out = _checkpoint(self._denoise, x, tt, use_reentrant=False)
            else:
                out = self._denoise(x, tt)
            noise_kw = {"generator": generator} if (self.eta and generator is not None) else {}
            x, _ = ddim_step(out, x, a_t, a_prev, eta=self.eta, prediction_type=self.prediction_type,
                             clip_sample=self.clip_sample, **noise_kw)
        return x

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, num_steps: int | None = None, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`generate` without gradient: ``num_steps`` DDIM steps (default: the training chain's) from
        ``noise`` ``(B, ...)``; returns ``(B, ...)``."""
        return self.generate(noise, num_steps, generator=generator)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``feature_fn(x)`` (or ``x``) flattened to ``(B, D)`` and cast to ``feature_dtype``."""
        f = x if self.feature_fn is None else self.feature_fn(x)
        if not isinstance(f, torch.Tensor) or f.dim() < 1 or f.shape[0] != x.shape[0]:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"mmd-ddm: feature_fn must return a (B, ...) tensor for a batch of B = {x.shape[0]}; "
                             f"got {got}")
        f = f.reshape(f.shape[0], -1)
        return f if self.feature_dtype is None else f.to(self.feature_dtype)

    def distance(self, generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The MMD² between the features of a generated ``(B, ...)`` and a real ``(B', ...)`` batch."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and real.requires_grad):
            fr = self.features(real)
        return self.mmd(self.features(generated), fr)

    def forward(self, noise: torch.Tensor, real: torch.Tensor, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """MMD² between the ``num_steps`` DDIM sample from ``noise`` ``(B, ...)`` and ``real`` ``(B', ...)``
        (same per-sample shape, ``B, B' ≥ 2``); a 0-d tensor, differentiable w.r.t. the denoiser."""
        _check_tensor("noise", noise)
        _check_tensor("real", real)
        if noise.shape[1:] != real.shape[1:]:
            raise ValueError(f"mmd-ddm: noise {tuple(noise.shape)} and real {tuple(real.shape)} must have the same "
                             "per-sample shape (B, ...)")
        if noise.shape[0] < 2 or real.shape[0] < 2:
            raise ValueError(f"mmd-ddm: the MMD needs at least 2 samples on each side; got B = {noise.shape[0]} "
                             f"generated and {real.shape[0]} real")
        return self.distance(self.generate(noise, generator=generator), real)

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, kernel={self.kernel!r}, eta={self.eta}, "
                f"timesteps={self.timesteps()}, checkpoint={self.checkpoint}")


class _ExampleDenoiser(torch.nn.Module):
    """ε(x, t) = x + 0.1·MLP([x, t/T]) for ``(B, dim)`` samples (keeps a chain's samples O(1))."""

    def __init__(self, dim: int, hidden: int = 16, num_train_timesteps: int = 1000):
        super().__init__()
        self.T = num_train_timesteps
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.net(torch.cat([x, (t.to(x.dtype) / self.T)[:, None]], 1))


def _check_tensor(what: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mmd-ddm: {what} must be a tensor; got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"mmd-ddm: {what} must be a (B, ...) batch; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"mmd-ddm: {what} must be a floating-point tensor; got {x.dtype}")
