"""``kde``: kernel density estimate of the normal features as an anomaly score."""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

import distkern
from distkern.io import check_device, normal_only, read_model, write_model

FORMAT_VERSION = 1


class KDE:
    """Gaussian kernel density anomaly detector.

    ``score(x) = −log( (1/N) Σ_n exp(−‖x − x_n‖² / (2σ²)) )`` over the N normal training features
    (constant normalisation dropped: higher = more anomalous), through ``distkern.kernel_matmul``,
    so scoring M test points never builds the M×N matrix. A point so far from every training
    point that its kernel sum underflows scores ``+inf`` (the most anomalous possible score).

    Args:
        bandwidth: σ; ``"median"`` (default: the median heuristic on the training set) or
            ``"scott"`` (Scott's rule on the mean per-feature standard deviation: σ = s·N^(−1/(D+4))).
    """

    name = "kde"
    kind = "detector"
    distkern_api = 1

    def __init__(self, bandwidth: Any = "median"):
        if not (bandwidth in ("median", "scott") or (isinstance(bandwidth, (int, float)) and bandwidth > 0)):
            raise ValueError(f"kde: bandwidth must be 'median', 'scott' or a positive number; got {bandwidth!r}")
        self.bandwidth = bandwidth
        self.train: Optional[torch.Tensor] = None
        self.sigma_: Optional[float] = None

    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> "KDE":
        """Keep the normal features ``(N, D)`` (N ≥ 2, finite) and choose the bandwidth. ``labels``, when given,
        must be N zeros (normal): a non-zero one is refused with its rows."""
        x = self._check(features, "fit")
        normal_only(labels, "kde", x.shape[0])
        if x.shape[0] < 2:
            raise ValueError(f"kde: fit() needs at least 2 samples; got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            rows = torch.nonzero(~torch.isfinite(x).all(1))[:5, 0].tolist()
            raise ValueError(f"kde: fit() features contain inf or NaN (rows {rows})")
        if self.bandwidth == "median":
            sigma = distkern.median_bandwidth(x)
        elif self.bandwidth == "scott":
            n, d = x.shape
            sigma = float(x.double().std(0).mean()) * n ** (-1.0 / (d + 4))
        else:
            sigma = float(self.bandwidth)
        self.train, self.sigma_ = x.detach().clone(), max(sigma, 1e-12)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``(M,)`` float32: −log of the mean kernel value against the training set."""
        if self.train is None:
            raise RuntimeError("kde: score() called before fit(); fit the detector on normal features first")
        x = self._check(features, "score")
        if x.shape[1] != self.train.shape[1]:
            raise ValueError(f"kde: features have D={x.shape[1]} but the detector was fitted with D={self.train.shape[1]}")
        dens = distkern.kernel_matmul(x, self.train.to(x.device), kernel="gaussian", bandwidth=self.sigma_)
        return (math.log(self.train.shape[0]) - torch.log(dens)).to(torch.float32)

    def __repr__(self) -> str:
        state = "not fitted" if self.train is None else f"fitted on {self.train.shape[0]} samples, D={self.train.shape[1]}, σ={self.sigma_:.4g}"
        return f"KDE(bandwidth={self.bandwidth!r}; {state})"

    def to(self, device) -> "KDE":
        device = check_device(device, self.name)
        if self.train is not None:
            self.train = self.train.to(device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        if self.train is None:
            raise RuntimeError("kde: nothing to save: fit() the detector first")
        write_model(path, self.name, {"train": self.train}, config={"bandwidth": self.bandwidth},
                    fitted={"sigma_": self.sigma_}, format_version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "KDE":
        config, fitted, tensors = read_model(path, cls.name, format_version=FORMAT_VERSION, package="distkern-mmd")
        try:
            det = cls(**config)
            det.train, det.sigma_ = tensors["train"], float(fitted["sigma_"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"kde: {os.fspath(path)!r} is damaged or incomplete ({type(e).__name__}: {e})") from None
        return det.to(device)

    @staticmethod
    def _check(features, where: str) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"kde: {where}() takes a floating (N, D) tensor; got {getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() != 2:
            raise ValueError(f"kde: {where}() takes features of shape (N, D); got shape {tuple(features.shape)}")
        return features
