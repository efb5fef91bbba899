"""``diag-gaussian``: a diagonal Gaussian fitted to normal features, scored by the plugin's fused op.

(Started from `distkern new-plugin example-kernel --kind detector --with-kernel`.)
"""
from __future__ import annotations

import torch

from distkern.io import check_device, normal_only, read_model, write_model

from .ops import standardized_sqdist

FORMAT_VERSION = 1


class DiagGaussian:
    """A diagonal Gaussian fitted to normal features, scored by the plugin's fused op
    ``torch.ops.distkern_example_kernel.standardized_sqdist``: score = Σ_d ((x_d − μ_d) / σ_d)².

    fit(features (N, D), labels=None) -> self; score(features (M, D)) -> (M,) float32 (float64 for
    float64 input), higher = more anomalous; save(path) / load(path); to(device).
    """

    name = "diag-gaussian"
    kind = "detector"
    distkern_api = 1

    def __init__(self, eps: float = 1e-6):
        if not eps > 0:
            raise ValueError(f"diag-gaussian: eps must be > 0; got {eps}")
        self.eps = eps
        self.mean = self.inv_std = None

    def fit(self, features: torch.Tensor, labels=None) -> "DiagGaussian":
        self._check(features, "fit")
        if features.shape[0] < 1:
            raise ValueError("diag-gaussian: fit() needs at least one sample")
        normal_only(labels, "diag-gaussian", features.shape[0])  # one-class: labels, if any, all 0
        bad = (~torch.isfinite(features).all(1)).nonzero()[:5, 0].tolist()
        if bad:
            raise ValueError(f"diag-gaussian: fit() features contain inf or NaN (rows {bad})")
        x = features.detach().to(torch.float64)
        self.mean = x.mean(0).float()
        self.inv_std = (x.var(0, unbiased=False) + self.eps).rsqrt().float()
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("diag-gaussian: score() called before fit()")
        self._check(features, "score")
        return standardized_sqdist(features, self.mean, self.inv_std)

    def __repr__(self) -> str:
        state = "not fitted" if self.mean is None else f"fitted, D={self.mean.numel()}"
        return f"{type(self).__name__}(eps={self.eps}; {state})"

    def to(self, device) -> "DiagGaussian":
        device = check_device(device, self.name)
        if self.mean is not None:
            self.mean, self.inv_std = self.mean.to(device), self.inv_std.to(device)
        return self

    def save(self, path) -> None:
        if self.mean is None:
            raise RuntimeError("diag-gaussian: nothing to save: fit() first")
        write_model(path, self.name, {"mean": self.mean, "inv_std": self.inv_std},
                    config={"eps": self.eps}, fitted={}, format_version=FORMAT_VERSION)

    @classmethod
    def load(cls, path, device="cpu") -> "DiagGaussian":
        config, fitted, tensors = read_model(path, cls.name, format_version=FORMAT_VERSION,
                                             package="distkern-example-kernel", require=("mean", "inv_std"))
        det = cls(**config)
        det.mean, det.inv_std = tensors["mean"], tensors["inv_std"]
        return det.to(device)

    @staticmethod
    def _check(features, where: str) -> None:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"diag-gaussian: {where}() takes a floating (N, D) tensor")
        if features.dim() != 2:
            raise ValueError(f"diag-gaussian: {where}() takes features of shape (N, D); got {tuple(features.shape)}")
