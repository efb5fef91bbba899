"""``class-center``: distance to the nearest in-distribution class center."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

import distkern
from distkern.io import check_device

from ._common import (ESTIMATORS, check_choice, check_features, check_num_classes, check_ridge, class_stats,
                      compute_dtype, read_detector, save_detector, shared_factor)

METRICS = ("cosine", "euclidean", "mahalanobis")


class ClassCenter:
    r"""Distance to the nearest class center as an OOD score (in the spirit of TagOOD, Li et al.
    2024, which scores test features by a cosine-based distance to in-distribution class centers).

    **Fit.** The centers are the class means ``c_k`` of the in-distribution features (optionally
    L2-normalised first), accumulated in float64 (streaming: ``fit`` also takes an iterable of
    ``(x, y)`` batches). TagOOD *learns* its centers (EMA of object features of a small trained
    projection network); here they are the plain class means of whatever features you pass — feed
    it TagOOD-style object features to get the same kind of detector.

    **Score** (higher = more OOD), ``(M, D)`` → ``(M,)`` float32:

    * ``metric="cosine"`` (default): ``min_k (1 − cos(x, c_k)) = 1 − max_k x̂·ĉ_k`` in ``[0, 2]``;
      a zero feature vector has cosine 0 with every center and scores 1.
    * ``metric="euclidean"``: ``min_k ‖x − c_k‖`` (squared with ``squared=True``), evaluated as
      ``‖x − c̄‖² − 2 (x − c̄)·(c_k − c̄) + ‖c_k − c̄‖²`` around the mean of the centers ``c̄`` and
      clamped at 0 (no ``(M, K, D)`` tensor; an ``(M, K)`` one).
    * ``metric="mahalanobis"``: ``min_k ‖x − c_k‖_{Σ⁻¹}`` (squared with ``squared=True``) with the
      tied (pooled within-class) covariance Σ + ridge·I, through the fused
      :func:`distkern.mahalanobis_k` (``reduce="min"``). With ``squared=True`` and
      ``normalize=False`` this is exactly the ``mahalanobis-ood`` score.

    With ``normalize=True`` the features are L2-normalised both before the centers are computed and
    before scoring (the centers themselves are means of unit vectors, not renormalised).

    Args:
        metric: ``"cosine"``, ``"euclidean"`` or ``"mahalanobis"``.
        normalize: L2-normalise features (fit and score).
        squared: return squared distances (euclidean / mahalanobis only).
        num_classes: K; ``None`` takes ``max(label) + 1``. Every class must occur.
        estimator, ridge: the shared covariance of the ``"mahalanobis"`` metric, as in
            ``mahalanobis-ood`` (``"empirical"`` / ``"ledoit-wolf"`` / ``"oas"``; ridge ≥ 0).

    Attributes (after ``fit``): ``centers`` ``(K, D)`` float64; ``factor`` ``(D, D)`` float64
    (``"mahalanobis"`` only, ``(Σ + ridge·I)⁻¹ = L Lᵀ``); ``class_counts_`` ``(K,)``; ``n_samples_``.
    """

    name = "class-center"
    kind = "detector"
    distkern_api = 1

    def __init__(self, metric: str = "cosine", *, normalize: bool = False, squared: bool = False,
                 num_classes: Optional[int] = None, estimator: str = "empirical", ridge: float = 1e-6):
        self.metric = check_choice(self.name, "metric", metric, METRICS)
        if squared and metric == "cosine":
            raise ValueError(f"{self.name}: squared=True applies to the euclidean and mahalanobis metrics, not cosine")
        self.normalize = bool(normalize)
        self.squared = bool(squared)
        self.num_classes = check_num_classes(self.name, num_classes)
        self.estimator = check_choice(self.name, "estimator", estimator, ESTIMATORS)
        self.ridge = check_ridge(self.name, ridge)
        self.centers: Optional[torch.Tensor] = None
        self.factor: Optional[torch.Tensor] = None
        self.class_counts_: Optional[torch.Tensor] = None
        self.n_samples_: int = 0
        self.shrinkage_: float = 0.0
        self._cache: Optional[tuple] = None

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: Any, labels: Optional[torch.Tensor] = None) -> "ClassCenter":
        """Compute the class centers (and, for ``"mahalanobis"``, the shared covariance factor).

        Args:
            features: in-distribution features ``(N, D)`` (finite, floating), or an iterable of
                ``(x (B, D), y (B,))`` batches (then ``labels`` must be ``None``).
            labels: integer class labels ``(N,)`` in ``[0, K)``; required with a tensor.

        Returns ``self``. Errors as :meth:`MahalanobisOOD.fit <distkern_ood.mahalanobis.MahalanobisOOD.fit>`.
        """
        stats = class_stats(self.name, features, labels, self.num_classes,
                            transform=self._normalize if self.normalize else None,
                            pooled=self.metric != "mahalanobis" or self.estimator != "ledoit-wolf")
        if self.metric == "mahalanobis":
            self.factor, self.shrinkage_ = shared_factor(self.name, stats, self.estimator, self.ridge)
        else:
            self.factor, self.shrinkage_ = None, 0.0
        self.centers = stats.mean
        self.class_counts_ = stats.count.cpu()
        self.n_samples_ = int(self.class_counts_.sum())
        self._cache = None
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Distance to the nearest center, ``(M, D)`` → ``(M,)`` float32 on the features' device;
        higher = more OOD. Float64 arithmetic for float64 features, float32 otherwise. A row with an
        inf / NaN scores NaN."""
        values, _ = self._nearest(features, "score")
        return values.to(torch.float32)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest center under the metric, ``(M, D)`` → ``(M,)`` int64."""
        return self._nearest(features, "predict")[1]

    def to(self, device) -> "ClassCenter":
        """Move the fitted parameters to ``device``; returns ``self``."""
        device = check_device(device, self.name)
        if self.centers is not None:
            self.centers = self.centers.to(device)
            if self.factor is not None:
                self.factor = self.factor.to(device)
        self._cache = None
        return self

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one ``.safetensors`` file (``centers``, ``factor`` for the
        mahalanobis metric, ``class_counts``; JSON metadata with method, format version, config)."""
        self._require_fit("save", "nothing to save: ")
        tensors = {"centers": self.centers, "class_counts": self.class_counts_}
        if self.factor is not None:
            tensors["factor"] = self.factor
        save_detector(path, self.name, tensors,
                      {"metric": self.metric, "normalize": self.normalize, "squared": self.squared,
                       "num_classes": self.num_classes, "estimator": self.estimator, "ridge": self.ridge},
                      {"n_samples_": self.n_samples_, "shrinkage_": self.shrinkage_})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "ClassCenter":
        """Read a detector written by :meth:`save`; refuses a file of another method or of a newer format."""
        config, fitted, t = read_detector(path, cls.name)
        det = cls(**config)
        centers = t.get("centers")
        if centers is None or centers.dim() != 2 or (det.metric == "mahalanobis" and t.get("factor") is None):
            raise ValueError(f"{cls.name}: {os.fspath(path)!r} lacks the centers (K, D)"
                             f"{' / factor (D, D)' if det.metric == 'mahalanobis' else ''} tensors")
        det.centers, det.factor = centers, t.get("factor")
        det.class_counts_ = t.get("class_counts")
        det.n_samples_, det.shrinkage_ = int(fitted.get("n_samples_", 0)), float(fitted.get("shrinkage_", 0.0))
        return det.to(device)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _normalize(x: torch.Tensor) -> torch.Tensor:  # fit: in float64, like the statistics
        return F.normalize(x.to(torch.float64), dim=1)

    def _require_fit(self, where: str, what: str = "") -> None:
        if self.centers is None:
            raise RuntimeError(f"{self.name}: {what}{where}() called before fit(); fit the detector on "
                               "in-distribution features and labels first")

    def _params(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (dtype, device)
        if self._cache is None or self._cache[0] != key:
            c = self.centers.to(device=device, dtype=dtype)
            p: dict[str, torch.Tensor] = {"centers": c}
            if self.metric == "cosine":
                p["unit"] = F.normalize(self.centers, dim=1).to(device=device, dtype=dtype)
            elif self.metric == "euclidean":
                c64 = self.centers
                mid = c64.mean(0)
                v = c64 - mid
                p.update(mid=mid.to(device=device, dtype=dtype), v=v.to(device=device, dtype=dtype),
                         v2=(v * v).sum(1).to(device=device, dtype=dtype))
            else:
                p["factor"] = self.factor.to(device=device, dtype=dtype)
            self._cache = (key, p)
        return self._cache[1]

    def _nearest(self, features: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_fit(where)
        x = check_features(self.name, where, features, dim=self.centers.shape[1])
        dt = compute_dtype(x)
        x = x.to(dt)
        if self.normalize:
            x = F.normalize(x, dim=1)
        p = self._params(dt, x.device)
        if self.metric == "cosine":
            sim, idx = (F.normalize(x, dim=1) @ p["unit"].T).max(1)
            return 1.0 - sim, idx
        if self.metric == "euclidean":
            xc = x - p["mid"]
            d2 = torch.addmm(p["v2"][None, :], xc, p["v"].T, alpha=-2.0).add_((xc * xc).sum(1, keepdim=True))
            d2, idx = d2.clamp_min_(0).min(1)
        else:
            d2, idx = distkern.mahalanobis_k(x, p["centers"], p["factor"], reduce="min")
        return (d2 if self.squared else d2.sqrt()), idx

    def __repr__(self) -> str:
        state = (f"fitted on {self.n_samples_} samples, K={self.centers.shape[0]}, D={self.centers.shape[1]}"
                 if self.centers is not None else "not fitted")
        return f"ClassCenter(metric={self.metric!r}, normalize={self.normalize}, squared={self.squared}; {state})"
