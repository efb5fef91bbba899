"""``mmd-align``: multi-kernel MMD between two domains' feature batches (DAN / FedKA)."""
from __future__ import annotations

from typing import Sequence

import torch

import distkern


class MMDAlign(torch.nn.Module):
    """Multi-kernel MMD² loss for feature distribution matching between a source and a target
    batch, as DAN (Long et al. 2015) and FedKA use it: a sum of Gaussian kernels with bandwidths
    ``base · multipliers`` where ``base`` is the median pairwise distance of the pooled batch
    (recomputed per call, without gradient) unless ``bandwidth`` fixes it.

    ``forward(source (n, D), target (m, D)) → scalar`` (unbiased estimator by default),
    differentiable in both batches, with no (n+m)² matrix (``distkern.kernel_matmul``).
    """

    name = "mmd-align"
    kind = "loss"
    distkern_api = 1

    def __init__(self, multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), bandwidth: float | None = None,
                 estimator: str = "unbiased"):
        super().__init__()
        if not multipliers or any(not (m > 0) for m in multipliers):
            raise ValueError(f"mmd-align: multipliers must be positive; got {multipliers}")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"mmd-align: bandwidth must be > 0; got {bandwidth}")
        self.multipliers, self.bandwidth, self.estimator = tuple(float(m) for m in multipliers), bandwidth, estimator

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(source, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("mmd-align: source and target must be tensors")
        if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
            raise ValueError(f"mmd-align: source and target must be (n, D) and (m, D) with one D; got "
                             f"{tuple(source.shape)} and {tuple(target.shape)}")
        base = self.bandwidth if self.bandwidth is not None else distkern.median_bandwidth(source.detach(), target.detach())
        return distkern.mmd2(source, target, kernel="gaussian", bandwidth=[base * m for m in self.multipliers],
                             estimator=self.estimator)
