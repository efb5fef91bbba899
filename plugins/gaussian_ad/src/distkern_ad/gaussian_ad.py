"""``gaussian-ad``: multivariate Gaussians on pooled deep features, Mahalanobis distance as score.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in Pre-Trained Deep Features
for Anomaly Detection" (ICPR 2020; reference code ORippler/gaussian-ad-mvtec): each feature level
of a pretrained network is averaged over its spatial positions, one Gaussian is fitted per level
to the normal training images (Ledoit-Wolf shrinkage), and an image's anomaly score is the sum
over levels of its Mahalanobis distances. Variants keep only the high-variance principal
components (PCA) or only the low-variance tail (NPCA, the paper's finding: the tail carries
the discriminative signal), and a χ² threshold gives a decision at a chosen false-positive rate.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

import distkern
from distkern.gaussian import GaussianStats, chi2_threshold, pca_whitening, whitening_factor
from distkern.io import check_device, normal_only, read_model, write_model

FORMAT_VERSION = 1
_ESTIMATORS = ("ledoit-wolf", "oas", "empirical")
_REDUCTIONS = ("none", "pca", "npca")


def _levels(batch: Any) -> list[torch.Tensor]:
    """A batch as its list of per-level (N, D) features: 4-D maps are averaged over H×W."""
    if isinstance(batch, torch.Tensor):
        batch = [batch]
    elif isinstance(batch, (list, tuple)):
        batch = list(batch)
    else:
        raise TypeError(f"gaussian-ad: features must be a tensor or a list/tuple of per-level tensors; got {type(batch).__name__}")
    if not batch:
        raise ValueError("gaussian-ad: empty list of feature levels")
    out = []
    for i, f in enumerate(batch):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"gaussian-ad: level {i} is a {type(f).__name__}, not a tensor")
        if not f.is_floating_point():
            raise TypeError(f"gaussian-ad: level {i} must be floating; got {f.dtype}")
        if f.dim() == 4:
            f = f.mean(dim=(2, 3))  # the paper pools each level over its spatial positions
        elif f.dim() != 2:
            raise ValueError(f"gaussian-ad: level {i} must be (N, D) features or an (N, C, H, W) map; got shape {tuple(f.shape)}")
        out.append(f)
    n = {f.shape[0] for f in out}
    if len(n) != 1:
        raise ValueError(f"gaussian-ad: every level must hold the same number of samples; got {sorted(n)}")
    return out


class GaussianAD:
    """Gaussian anomaly detector on (pooled) deep features.

    Args:
        estimator: covariance estimate per level: ``"ledoit-wolf"`` (default, as the paper via
            scikit-learn's ``LedoitWolf``), ``"oas"`` or ``"empirical"`` (maximum likelihood).
        ridge: added to each covariance's diagonal before factorising (``≥ 0``).
        reduction: ``"none"`` (full Mahalanobis distance), ``"pca"`` (keep the leading principal
            components explaining ``variance_ratio`` of the variance) or ``"npca"`` (keep the
            remaining low-variance tail).
        variance_ratio: for PCA / NPCA, in ``(0, 1)``.
        paper_selection: use the reference code's component selection (its PCA and NPCA sets
            overlap by two components; see :func:`distkern.gaussian.pca_whitening`). The
            reference also refits Ledoit-Wolf in the reduced space; here the reduced model is the
            projection of the full-space estimate (its eigenvalues), which differs slightly.
        combine: ``"sum"`` (default, the paper) or ``"mean"`` of the per-level distances.

    Features: ``fit`` / ``score`` take one level ``(N, D)`` or ``(N, C, H, W)`` (averaged over
    H×W), or a list/tuple of such tensors, one per level; ``fit`` also takes any other iterable
    (a DataLoader) yielding such batches (or ``(batch, labels)`` tuples, labels ignored), streamed
    through float64 statistics so the training set need not fit in memory.
    """

    name = "gaussian-ad"
    kind = "detector"
    distkern_api = 1

    def __init__(self, estimator: str = "ledoit-wolf", ridge: float = 0.0, reduction: str = "none",
                 variance_ratio: float = 0.99, paper_selection: bool = False, combine: str = "sum"):
        if estimator not in _ESTIMATORS:
            raise ValueError(f"gaussian-ad: estimator must be one of {_ESTIMATORS}; got {estimator!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
            raise ValueError(f"gaussian-ad: ridge must be a finite number >= 0; got {ridge!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"gaussian-ad: reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        if reduction != "none" and not 0.0 < variance_ratio < 1.0:
            raise ValueError(f"gaussian-ad: variance_ratio must lie in (0, 1); got {variance_ratio}")
        if combine not in ("sum", "mean"):
            raise ValueError(f"gaussian-ad: combine must be 'sum' or 'mean'; got {combine!r}")
        self.estimator, self.ridge, self.reduction = estimator, float(ridge), reduction
        self.variance_ratio, self.paper_selection, self.combine = float(variance_ratio), bool(paper_selection), combine
        self.means: list[torch.Tensor] = []
        self.factors: list[torch.Tensor] = []  # (D, D) lower-triangular, or (D, R) PCA whitening
        self.shrinkage_: list[float] = []
        self.n_samples_: int = 0

    # -- contract ---------------------------------------------------------------------------------
    def fit(self, features: Any, labels: Optional[torch.Tensor] = None, *, progress: bool = False) -> "GaussianAD":
        """Fit one Gaussian per level to normal features. ``labels``, when given, must all be 0 (normal): the
        method fits normal data only, and a non-zero label is refused with its rows rather than fitted.

        Raises ``ValueError`` on non-finite features (naming the batch and rows) or fewer than 2
        samples, and ``distkern.gaussian.NotPositiveDefiniteError`` (naming the level and the
        smallest eigenvalue) when a covariance cannot be factorised (use shrinkage or a ridge).
        """
        normal_only(labels, "gaussian-ad")
        batches = [features] if isinstance(features, (torch.Tensor, list, tuple)) else features
        stats: list[GaussianStats] = []
        for batch in batches:
            # (features, labels) from a DataLoader (default collate gives a list): labels are 1-D, one per
            # sample; a level of features is never 1-D
            if isinstance(batch, (list, tuple)) and len(batch) == 2 and not isinstance(features, (list, tuple)) \
                    and isinstance(batch[1], torch.Tensor) and batch[1].dim() == 1 \
                    and isinstance(batch[0], torch.Tensor) and batch[1].shape[0] == batch[0].shape[0]:
                batch = batch[0]
            levels = _levels(batch)
            if not stats:
                stats = [GaussianStats() for _ in levels]
            if len(levels) != len(stats):
                raise ValueError(f"gaussian-ad: a batch has {len(levels)} levels, earlier ones had {len(stats)}")
            for s, f in zip(stats, levels):
                s.update(f.detach())
        if not stats:
            raise ValueError("gaussian-ad: fit() got no data")
        means, factors, shrink = [], [], []
        for lvl, s in enumerate(stats):
            try:
                cov = s.covariance(self.estimator)
            except ValueError as e:
                raise ValueError(f"gaussian-ad: level {lvl}: {e}") from None
            shrink.append(float(s.shrinkage(self.estimator)) if self.estimator != "empirical" else 0.0)
            if self.reduction == "none":
                try:
                    W = whitening_factor(cov, ridge=self.ridge, dtype=torch.float32)
                except distkern.gaussian.NotPositiveDefiniteError as e:
                    raise distkern.gaussian.NotPositiveDefiniteError(
                        f"gaussian-ad: level {lvl}: {e}", index=(lvl,), min_eigenvalue=e.min_eigenvalue) from None
            else:
                W = pca_whitening(cov, self.variance_ratio, self.reduction, ridge=self.ridge,
                                  paper=self.paper_selection, dtype=torch.float32).whitening
            means.append(s.mean.to(torch.float32))
            factors.append(W.contiguous())
        self.means, self.factors, self.shrinkage_ = means, factors, shrink
        self.n_samples_ = int(stats[0].count)
        return self

    def level_scores(self, features: Any) -> torch.Tensor:
        """Mahalanobis distance per level, ``(N, L)`` float32 on the features' device."""
        if not self.means:
            raise RuntimeError("gaussian-ad: score() called before fit(); fit the detector on normal features first")
        levels = _levels(features)
        if len(levels) != len(self.means):
            raise ValueError(f"gaussian-ad: got {len(levels)} feature levels but the detector was fitted with {len(self.means)}")
        cols = []
        for lvl, (f, mu, W) in enumerate(zip(levels, self.means, self.factors)):
            if f.shape[1] != mu.shape[0]:
                raise ValueError(f"gaussian-ad: level {lvl} has D={f.shape[1]} but the detector was fitted with D={mu.shape[0]}")
            dev = f.device
            d2 = distkern.mahalanobis(f, mu.to(dev), W.to(dev), lower=self.reduction == "none")
            cols.append(d2.sqrt())
        return torch.stack(cols, dim=1)

    def score(self, features: Any) -> torch.Tensor:
        """Anomaly score ``(N,)`` float32: the sum (or mean) over levels of the Mahalanobis
        distances; higher = more anomalous. A non-finite row scores NaN."""
        s = self.level_scores(features)
        return s.sum(1) if self.combine == "sum" else s.mean(1)

    def dims(self) -> list[int]:
        """Degrees of freedom per level: D, or the number of components kept by PCA / NPCA."""
        return [int(W.shape[1]) for W in self.factors]

    def threshold(self, fpr: float = 0.05) -> torch.Tensor:
        """Per-level distance thresholds ``(L,)``: under the Gaussian model d² ~ χ²(dof) for a
        normal sample, so ``sqrt(χ²_dof.isf(fpr / L))`` bounds each level's false-positive rate by
        ``fpr / L`` and :meth:`predict`'s overall rate by ``fpr`` (union bound)."""
        if not self.means:
            raise RuntimeError("gaussian-ad: threshold() needs a fitted detector")
        L = len(self.factors)
        return torch.tensor([math.sqrt(chi2_threshold(k, fpr / L)) for k in self.dims()], dtype=torch.float32)

    def predict(self, features: Any, fpr: float = 0.05) -> torch.Tensor:
        """Anomalous (True) where any level's distance exceeds its :meth:`threshold` at ``fpr``."""
        s = self.level_scores(features)
        return (s > self.threshold(fpr).to(s.device)).any(1)

    def to(self, device) -> "GaussianAD":
        device = check_device(device, self.name)
        self.means = [m.to(device) for m in self.means]
        self.factors = [W.to(device) for W in self.factors]
        return self

    # -- persistence (safetensors + JSON, no pickle) ------------------------------------------------
    def _config(self) -> dict:
        return {"estimator": self.estimator, "ridge": self.ridge, "reduction": self.reduction,
                "variance_ratio": self.variance_ratio, "paper_selection": self.paper_selection, "combine": self.combine}

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one ``.safetensors`` file (tensors + JSON metadata)."""
        if not self.means:
            raise RuntimeError("gaussian-ad: nothing to save: fit() the detector first")
        tensors = {}
        for i, (m, W) in enumerate(zip(self.means, self.factors)):
            tensors[f"level{i}.mean"] = m
            tensors[f"level{i}.factor"] = W
        write_model(path, self.name, tensors, config=self._config(), format_version=FORMAT_VERSION,
                    fitted={"levels": len(self.means), "shrinkage_": self.shrinkage_, "n_samples_": self.n_samples_})

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "GaussianAD":
        """Read a detector written by :meth:`save`; refuses a file of another method or format."""
        p = os.fspath(path)
        config, fitted, tensors = read_model(p, cls.name, format_version=FORMAT_VERSION, package="distkern-gaussian-ad")
        try:
            det = cls(**config)
            n = int(fitted["levels"])
            det.means = [tensors[f"level{i}.mean"] for i in range(n)]
            det.factors = [tensors[f"level{i}.factor"] for i in range(n)]
            det.shrinkage_, det.n_samples_ = list(fitted["shrinkage_"]), int(fitted["n_samples_"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"gaussian-ad: {p!r} is damaged or incomplete ({type(e).__name__}: {e})") from None
        for i, (m, W) in enumerate(zip(det.means, det.factors)):
            if m.dim() != 1 or W.dim() != 2 or W.shape[0] != m.shape[0]:
                raise ValueError(f"gaussian-ad: {p!r} level {i} has inconsistent shapes {tuple(m.shape)}, {tuple(W.shape)}")
        return det.to(device)

    def __repr__(self) -> str:
        state = (f"fitted on {self.n_samples_} samples, levels D={[m.shape[0] for m in self.means]}" if self.means else "not fitted")
        return f"GaussianAD(estimator={self.estimator!r}, reduction={self.reduction!r}; {state})"
