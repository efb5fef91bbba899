"""End-to-end anomaly / OOD evaluation on scikit-learn's digits (8×8 images, 64 features, ships
with scikit-learn: nothing is downloaded).

Two protocols, each run for every digit c, with a seeded 50/50 split of each class:
  one-class  train on the training half of class c (normal); test on the test half of c
             (normal) against the test halves of all other classes (anomalous).
             Methods: gaussian-ad (Ledoit-Wolf), gaussian-ad NPCA, and every detector that
             takes unlabelled data.
  held-out   train with labels on the other nine classes; test on their test halves
             (in-distribution) against all of class c (OOD). Methods that use labels:
             mahalanobis-ood, gmm-ood, class-center.
Prints a markdown table of AUROC (%) per digit and the mean; `--json FILE` writes the numbers.

    python benchmarks/eval/digits.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import distkern
from distkern.metrics import auroc


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        sys.exit("this evaluation needs scikit-learn (pip install scikit-learn): its digits data set ships with it")
    d = sk_load()
    x = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def split(y: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train[idx[: len(idx) // 2]] = True
    return train


ONE_CLASS = {
    "gaussian-ad": ("gaussian-ad", {}),
    "gaussian-ad npca 0.99": ("gaussian-ad", {"reduction": "npca", "variance_ratio": 0.99}),
    "gaussian-ad pca 0.95": ("gaussian-ad", {"reduction": "pca", "variance_ratio": 0.95}),
}
HELD_OUT = {
    "mahalanobis-ood": ("mahalanobis-ood", {}),
    "mahalanobis-ood ledoit-wolf": ("mahalanobis-ood", {"estimator": "ledoit-wolf"}),
    "gmm-ood": ("gmm-ood", {}),
    "gmm-ood 2 comp, reg_covar 1": ("gmm-ood", {"components_per_class": 2, "reg_covar": 1.0}),
    "class-center (cosine)": ("class-center", {"metric": "cosine"}),
}


def _get(name):
    try:
        return distkern.methods.get(name)
    except Exception as e:  # noqa: BLE001 - a missing plugin is reported, not fatal
        print(f"# skipping {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def run(seed: int = 0) -> dict:
    x, y = load_digits()
    # tiny pixel noise: several border pixels are constant within a class (singular covariances)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    train = split(y, seed)
    results: dict[str, dict[int, float]] = {}
    for label, (method, opts) in ONE_CLASS.items():
        cls = _get(method)
        if cls is None:
            continue
        row = {}
        for c in range(10):
            det = cls(**opts).fit(x[train & (y == c)].float())
            test = ~train
            s = det.score(x[test].float())
            row[c] = 100 * auroc(s, (y[test] != c).long())
        results[f"one-class: {label}"] = row
    for label, (method, opts) in HELD_OUT.items():
        cls = _get(method)
        if cls is None:
            continue
        row = {}
        for c in range(10):
            ind = train & (y != c)
            labels = y[ind]
            labels = labels - (labels > c).long()  # classes 0..8
            det = cls(**opts).fit(x[ind].float(), labels)
            test = (~train & (y != c)) | (y == c)
            s = det.score(x[test].float())
            row[c] = 100 * auroc(s, (y[test] == c).long())
        results[f"held-out: {label}"] = row
    return results


def table(results: dict) -> str:
    head = "| method | " + " | ".join(str(c) for c in range(10)) + " | mean |"
    lines = [head, "|" + "---|" * 12]
    for name, row in results.items():
        vals = [row[c] for c in range(10)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | **{sum(vals) / 10:.1f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the AUROCs to this file")
    args = ap.parse_args(argv)
    res = run(args.seed)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "auroc_percent": res, "distkern": distkern.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
