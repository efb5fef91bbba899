"""Shared pieces of the OOD detectors: input checks, class statistics, safetensors persistence."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

import torch

import distkern
from distkern.io import read_model, write_model
from distkern.gaussian import GaussianStats, NotPositiveDefiniteError, whitening_factor

FORMAT_VERSION = 1
ESTIMATORS = ("empirical", "ledoit-wolf", "oas")


# -- checks ------------------------------------------------------------------------------------------
def check_features(who: str, where: str, x: Any, *, dim: Optional[int] = None, finite: bool = False,
                   name: str = "features", batch: Optional[int] = None) -> torch.Tensor:
    """``x`` must be a floating ``(N, D)`` tensor (with ``D == dim`` when given; finite when ``finite``)."""
    at = f" (batch {batch})" if batch is not None else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {where}() takes {name} as a torch.Tensor of shape (N, D){at}; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{who}: {where}() takes {name} of shape (N, D){at}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {where}() takes floating-point {name}{at}; got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{who}: {name}{at} have D={x.shape[1]} but the detector was fitted with D={dim}")
    if finite:
        ok = torch.isfinite(x).all(1)
        if not bool(ok.all()):
            rows = torch.nonzero(~ok)[:5, 0].tolist()
            more = "..." if len(rows) == 5 else ""
            raise ValueError(f"{who}: {where}() {name}{at} contain inf or NaN (rows {rows}{more}); "
                             "a model fitted to them would be meaningless")
    return x


def check_labels(who: str, labels: Any, n: int, num_classes: Optional[int], batch: Optional[int] = None) -> torch.Tensor:
    """Integer labels ``(n,)`` in ``[0, num_classes)`` (only ``≥ 0`` when ``num_classes`` is None) → int64."""
    at = f" (batch {batch})" if batch is not None else ""
    if labels is None:
        raise ValueError(f"{who}: fit() needs class labels (N,){at}: the method fits one center per "
                         "in-distribution class (for a single Gaussian on unlabelled data use gaussian-ad)")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"{who}: labels{at} must be an integer tensor of shape (N,); "
                        f"got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (n,):
        raise ValueError(f"{who}: labels{at} must have shape ({n},) to match the features; got {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:5, 0].tolist()
        rng = "must be >= 0" if num_classes is None else f"must lie in [0, {num_classes})"
        raise ValueError(f"{who}: labels{at} {rng}; rows {rows} have {labels[rows].tolist()}")
    return labels


def check_choice(who: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_num_classes(who: str, num_classes: Any) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{who}: num_classes must be a positive int or None; got {num_classes!r}")
    return num_classes


def check_ridge(who: str, ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or ridge == float("inf"):
        raise ValueError(f"{who}: ridge must be a finite float >= 0; got {ridge!r}")
    return float(ridge)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half / bfloat16 inputs are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# -- class statistics ------------------------------------------------------------------------------
def _grow(stats: GaussianStats, K: int) -> GaussianStats:
    """The same statistics with K ≥ stats.num_groups classes (the new classes empty)."""
    st = stats.state_dict()
    G = st["num_groups"]
    if "mean" in st:
        pad = K - G
        for k in ("count", "mean") if st["pooled"] else ("count", "mean", "scatter", "cubic", "quartic"):
            t = st[k]
            st[k] = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
    st["num_groups"] = K
    return GaussianStats.from_state_dict(st)


def class_stats(who: str, features: Any, labels: Any, num_classes: Optional[int],
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                pooled: bool = False) -> GaussianStats:
    """Streaming float64 per-class statistics of ``features (N, D)`` + ``labels (N,)``, or of an
    iterable of ``(x, y)`` batches. Without ``num_classes`` the class count is ``max(label) + 1``
    (growing as batches arrive). Every class in ``[0, K)`` must have a sample. ``pooled``: keep one
    within-class scatter instead of K (``GaussianStats(pooled=True)``: D² + K·D floats, not K·D² — at
    ImageNet's 1000 classes and D = 2048, 34 MB instead of 34 GB), for every estimator but Ledoit-Wolf."""
    def batches():
        if isinstance(features, torch.Tensor):
            yield features, labels
            return
        if labels is not None:
            raise ValueError(f"{who}: labels must be None when features is an iterable of (x, y) batches")
        if isinstance(features, (str, bytes, dict)) or not hasattr(features, "__iter__"):
            raise TypeError(f"{who}: fit() takes features (N, D) + labels (N,), or an iterable of (x, y) batches; "
                            f"got {type(features).__name__}")
        for item in features:
            if isinstance(item, (tuple, list)) and len(item) >= 2:
                yield item[0], item[1]
            else:
                yield item, None

    stats: Optional[GaussianStats] = None
    streaming = not isinstance(features, torch.Tensor)
    D = None
    for b, (x, y) in enumerate(batches()):
        bi = b if streaming else None
        x = check_features(who, "fit", x, finite=True, batch=bi)
        if D is None:
            D = x.shape[1]
        elif x.shape[1] != D:
            raise ValueError(f"{who}: batch {b} has D={x.shape[1]} features but the earlier batches have D={D}")
        y = check_labels(who, y, x.shape[0], num_classes, batch=bi)
        if x.shape[0] == 0:
            continue
        if y.device != x.device:
            y = y.to(x.device)
        K = num_classes if num_classes is not None else int(y.max()) + 1
        if stats is None:
            stats = GaussianStats(num_classes=K, pooled=pooled)
        elif K > stats.num_groups:
            stats = _grow(stats, K)
        stats.update(transform(x) if transform is not None else x, y)
    if stats is None or int(stats.count.sum()) == 0:
        raise ValueError(f"{who}: fit() got no samples")
    empty = torch.nonzero(stats.count == 0)[:, 0].tolist()
    if empty:
        more = "..." if len(empty) > 10 else ""
        raise ValueError(f"{who}: classes {empty[:10]}{more} have no samples; every class in [0, {stats.num_groups}) "
                         "needs at least one (labels must be 0..K-1; pass num_classes=K only if all K classes occur)")
    return stats


def shared_factor(who: str, stats: GaussianStats, estimator: str, ridge: float) -> tuple[torch.Tensor, float]:
    """Lower-triangular float64 ``L`` with ``(Σ + ridge·I)⁻¹ = L Lᵀ`` for the pooled within-class
    covariance Σ, and the shrinkage coefficient (0 for ``"empirical"``)."""
    if int(stats.count.sum()) < 2:
        raise ValueError(f"{who}: a shared covariance needs at least 2 samples; got {int(stats.count.sum())}")
    cov = stats.covariance(estimator, pooled=True)
    try:
        L = whitening_factor(cov, ridge=ridge, dtype=None)
    except NotPositiveDefiniteError as e:
        raise NotPositiveDefiniteError(
            f"{who}: the shared ({estimator}) class covariance plus ridge={ridge:g} is not positive definite "
            f"(smallest eigenvalue {e.min_eigenvalue:.6g}); pass a larger ridge or estimator='ledoit-wolf' "
            "(typical when there are fewer samples than feature dimensions)",
            index=e.index, min_eigenvalue=e.min_eigenvalue) from None
    return L, float(stats.shrinkage(estimator, pooled=True))


# -- persistence -------------------------------------------------------------------------------------
def save_detector(path: Any, method: str, tensors: dict[str, torch.Tensor], config: dict, fitted: dict) -> None:
    """One ``.safetensors`` file: ``tensors`` + JSON metadata (distkern's shared model-file format)."""
    write_model(path, method, tensors, config=config, fitted=fitted, format_version=FORMAT_VERSION)


def read_detector(path: Any, method: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(config, fitted, tensors)`` of a file written by :func:`save_detector` for ``method``;
    refuses another method's file or a newer format (:func:`distkern.io.read_model`)."""
    return read_model(path, method, format_version=FORMAT_VERSION, package="distkern-ood")
