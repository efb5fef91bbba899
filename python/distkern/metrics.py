"""Ranking metrics for anomaly scores (higher = more anomalous), in plain torch.

Written here so the CLI and the evaluations need no scikit-learn; tested against
``sklearn.metrics.roc_auc_score`` / ``average_precision_score``.
"""
from __future__ import annotations

import torch

__all__ = ["auroc", "average_precision", "binary_labels"]


def binary_labels(labels, name: str = "labels") -> torch.Tensor:
    """``labels`` as a flat bool CPU tensor (True = anomalous); refuses anything but 0 / 1 / bool values (class
    labels or ±1 would otherwise be read as "nonzero = anomalous", silently)."""
    y = torch.as_tensor(labels).detach().flatten().cpu()
    if y.dtype == torch.bool:
        return y
    if not bool(((y == 0) | (y == 1)).all()):
        vals = torch.unique(y[torch.isfinite(y)] if y.is_floating_point() else y).tolist()
        raise ValueError(f"{name}: labels must be 0 (normal) or 1 (anomalous); got the values "
                         f"{vals[:6]}{'...' if len(vals) > 6 else ''}"
                         f"{' and inf/NaN' if y.is_floating_point() and not bool(torch.isfinite(y).all()) else ''}")
    return y != 0


def _prep(scores, labels, name):
    s = torch.as_tensor(scores).detach().flatten().to(torch.float64).cpu()
    y = torch.as_tensor(labels).detach().flatten().cpu()
    if s.shape != y.shape:
        raise ValueError(f"{name}: scores and labels must have the same number of entries; got {s.numel()} and {y.numel()}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: scores contain inf or NaN")
    y = binary_labels(y, name)
    if bool(y.all()) or not bool(y.any()):
        raise ValueError(f"{name}: labels must contain both normal (0) and anomalous (1) samples")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that an anomalous sample outscores a normal one
    (ties count one half), computed from ranks in O(N log N)."""
    s, y = _prep(scores, labels, "auroc")
    order = torch.argsort(s)
    ss = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv, counts = torch.unique_consecutive(ss, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = first.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    ranks[order] = avg[inv]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score``:
    Σ (R_n − R_{n−1}) P_n over the distinct score thresholds, descending."""
    s, y = _prep(scores, labels, "average_precision")
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order].to(torch.float64)
    # the last index of each run of equal scores is a threshold
    distinct = torch.nonzero(s[1:] != s[:-1]).flatten()
    idx = torch.cat([distinct, torch.tensor([len(s) - 1])])
    tp = torch.cumsum(y, 0)[idx]
    fp = (idx + 1).to(torch.float64) - tp
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - prev) * precision).sum())
