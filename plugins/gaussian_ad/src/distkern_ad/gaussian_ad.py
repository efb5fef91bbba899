"""``gaussian-ad``: one multivariate Gaussian on normal features, Mahalanobis distance as score."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

import distkern
from distkern.gaussian import empirical_covariance, ledoit_wolf, whitening_factor

FORMAT_VERSION = 1


class GaussianAD:
    """Gaussian anomaly detector (Rippel et al., "Modeling the Distribution of Normal Data in
    Pre-Trained Deep Features for Anomaly Detection").

    ``fit`` estimates the mean and covariance of normal features in float64 — Ledoit-Wolf
    shrinkage by default, as the paper (scikit-learn's ``LedoitWolf``) — and factorises the
    precision as ``L Lᵀ`` (Cholesky, float64, no explicit inverse). ``score`` is the Mahalanobis
    distance ``sqrt((x − μ)ᵀ Σ⁻¹ (x − μ))`` through ``distkern.mahalanobis``: higher = more
    anomalous.

    Args:
        shrinkage: ``"ledoit-wolf"`` (default) or ``"none"`` (maximum-likelihood covariance).
        ridge: added to the covariance diagonal before factorising (``≥ 0``); needed with
            ``shrinkage="none"`` when N ≤ D.
    """

    name = "gaussian-ad"
    kind = "detector"
    distkern_api = 1

    def __init__(self, shrinkage: str = "ledoit-wolf", ridge: float = 0.0):
        if shrinkage not in ("ledoit-wolf", "none"):
            raise ValueError(f"gaussian-ad: shrinkage must be 'ledoit-wolf' or 'none'; got {shrinkage!r}")
        if not ridge >= 0:
            raise ValueError(f"gaussian-ad: ridge must be >= 0; got {ridge}")
        self.shrinkage = shrinkage
        self.ridge = float(ridge)
        self.mean: Optional[torch.Tensor] = None
        self.factor: Optional[torch.Tensor] = None
        self.shrinkage_: Optional[float] = None
        self.n_samples_: int = 0

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> "GaussianAD":
        """Fit to normal features ``(N, D)`` (N ≥ 2, finite). ``labels`` is ignored (all normal).

        Raises ``ValueError`` on non-finite features (naming the rows) and
        ``distkern.gaussian.NotPositiveDefiniteError`` when the covariance cannot be factorised.
        """
        features = self._check(features, "fit")
        if self.shrinkage == "ledoit-wolf":
            mean, cov, s = ledoit_wolf(features)
        else:
            (mean, cov), s = empirical_covariance(features), 0.0
        self.factor = whitening_factor(cov, ridge=self.ridge, dtype=torch.float32)
        self.mean = mean.to(torch.float32)
        self.shrinkage_ = float(s)
        self.n_samples_ = int(features.shape[0])
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of ``features`` ``(M, D)`` → ``(M,)`` float32 on the
        features' device; higher = more anomalous. A non-finite row scores NaN."""
        if self.mean is None:
            raise RuntimeError("gaussian-ad: score() called before fit(); fit the detector on normal features first")
        features = self._check(features, "score", finite=False)
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"gaussian-ad: features have D={features.shape[1]} but the detector was fitted with D={self.mean.shape[0]}")
        dev = features.device
        return distkern.mahalanobis(features, self.mean.to(dev), self.factor.to(dev)).sqrt()

    def to(self, device) -> "GaussianAD":
        if self.mean is not None:
            self.mean, self.factor = self.mean.to(device), self.factor.to(device)
        return self

    # -- persistence (safetensors + JSON, no pickle) ------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one ``.safetensors`` file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        if self.mean is None:
            raise RuntimeError("gaussian-ad: nothing to save: fit() the detector first")
        meta = {
            "distkern_method": self.name,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps({"shrinkage": self.shrinkage, "ridge": self.ridge}),
            "fitted": json.dumps({"shrinkage_": self.shrinkage_, "n_samples_": self.n_samples_}),
            "distkern_version": distkern.__version__,
        }
        save_file({"mean": self.mean.cpu().contiguous(), "factor": self.factor.cpu().contiguous()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "GaussianAD":
        """Read a detector written by :meth:`save`; refuses a file of another method."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            method = meta.get("distkern_method")
            if method != cls.name:
                raise ValueError(f"gaussian-ad: {os.fspath(path)!r} holds a {method or 'non-distkern'!s} model, not a {cls.name} model")
            if int(meta.get("format_version", "0")) > FORMAT_VERSION:
                raise ValueError(f"gaussian-ad: {os.fspath(path)!r} has format version {meta.get('format_version')}, newer than this plugin reads ({FORMAT_VERSION}); upgrade distkern-gaussian-ad")
            det = cls(**json.loads(meta["config"]))
            fitted = json.loads(meta["fitted"])
            det.mean, det.factor = f.get_tensor("mean"), f.get_tensor("factor")
        det.shrinkage_, det.n_samples_ = fitted["shrinkage_"], fitted["n_samples_"]
        return det.to(device)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _check(features, where: str, finite: bool = True) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"gaussian-ad: {where}() takes a torch.Tensor of shape (N, D); got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"gaussian-ad: {where}() takes features of shape (N, D); got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"gaussian-ad: {where}() takes floating features; got {features.dtype}")
        return features

    def __repr__(self) -> str:
        state = f"fitted on {self.n_samples_} samples, D={self.mean.shape[0]}" if self.mean is not None else "not fitted"
        return f"GaussianAD(shrinkage={self.shrinkage!r}, ridge={self.ridge}; {state})"
