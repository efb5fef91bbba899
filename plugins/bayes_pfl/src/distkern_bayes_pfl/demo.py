"""Zero-shot demo: train Bayes-PFL on some synthetic texture categories, test on held-out ones.

    python -m distkern_bayes_pfl.demo            # full recipe (~1-3 min on 2 CPU cores)
    python -m distkern_bayes_pfl.demo --quick    # small version (< 40 s)

Auxiliary (training) categories: stripes, checkers, blobs, waves; held-out (zero-shot test) categories: grid,
dots, weave — each with scratches, spots and holes pasted into half of the images. The encoder is the tiny
random :class:`~distkern_bayes_pfl.encoders.TinyEncoder`, so absolute numbers are far below the paper's
(which uses pretrained CLIP ViT-L/14); the point is the comparison with the same model untrained.
Metrics per held-out category (pixel AUROC over all pixels; image AUROC of the Bayes-PFL image score,
min-max normalised within the category as the paper does), then averaged over the categories.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from distkern.metrics import auroc

from .data import make_dataset
from .encoders import TinyEncoder
from .model import BayesPFL

__all__ = ["run", "TRAIN_CATEGORIES", "TEST_CATEGORIES", "SETTINGS"]

TRAIN_CATEGORIES = ("stripes", "checkers", "blobs", "waves")
TEST_CATEGORIES = ("grid", "dots", "weave")

SETTINGS = {
    "full": {"train_per_category": 48, "test_per_category": 80, "epochs": 30, "batch_size": 16,
             "model": {"n_prompts": 3, "context_length": 5, "state_length": 5, "n_flows": 10, "samples": 10},
             "fit": {"lr_prompt": 1e-2, "lr_flow": 1e-2, "lr_linear": 1e-2, "lr_temperature": 1e-2}},
    "quick": {"train_per_category": 32, "test_per_category": 30, "epochs": 15, "batch_size": 16,
              "model": {"n_prompts": 3, "context_length": 5, "state_length": 5, "n_flows": 4, "samples": 4},
              "fit": {"lr_prompt": 1e-2, "lr_flow": 1e-2, "lr_linear": 1e-2, "lr_temperature": 1e-2}},
}


def evaluate(model: BayesPFL, test: dict) -> dict:
    """Per-category pixel / image AUROC on a :func:`~distkern_bayes_pfl.data.make_dataset` set, and means."""
    per = {}
    for ci, cat in enumerate(test["categories"]):
        sel = test["category"] == ci
        pix, scores, parts = model.predict(test["images"][sel], batch_size=64, return_parts=True)
        y = test["labels"][sel]
        per[cat] = {"pixel_auroc": auroc(pix, test["masks"][sel]), "image_auroc": auroc(scores, y),
                    "image_auroc_topk": auroc(parts["topk"], y), "image_auroc_text": auroc(parts["text_score"], y)}
    n = len(per)
    means = {k: sum(v[k] for v in per.values()) / n for k in next(iter(per.values()))}
    return {**means, "per_category": per}


def run(quick: bool = False, *, seed: int = 0, epochs: int | None = None, image_size: int = 64,
        threads: int | None = 1, progress: bool = False, verbose: bool = False) -> dict:
    """Run the recipe and return its numbers: ``{"untrained": {...}, "trained": {...}, "seconds": {...},
    "settings": {...}}`` where each result holds mean ``pixel_auroc`` / ``image_auroc`` over the held-out
    categories and ``per_category`` (``image_auroc`` is the paper's score, ``0.5·minmax(text score) +
    0.5·minmax(top-k)``; ``image_auroc_topk`` / ``image_auroc_text`` rank by one part alone). ``threads``: torch CPU threads for the run (restored after; None leaves
    torch's setting); one thread is fastest for these small tensors on a busy 2-core machine."""
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        cfg = SETTINGS["quick" if quick else "full"]
        ep = cfg["epochs"] if epochs is None else int(epochs)
        t0 = time.perf_counter()
        train = make_dataset(TRAIN_CATEGORIES, cfg["train_per_category"], size=image_size, seed=1000 + seed)
        test = make_dataset(TEST_CATEGORIES, cfg["test_per_category"], size=image_size, seed=2000 + seed)
        t_data = time.perf_counter() - t0

        model = BayesPFL(TinyEncoder(seed=seed), seed=seed, **cfg["model"])
        t0 = time.perf_counter()
        before = evaluate(model, test)
        t_eval0 = time.perf_counter() - t0
        if verbose:
            print(f"untrained: pixel AUROC {before['pixel_auroc']:.3f}  image AUROC {before['image_auroc']:.3f}",
                  flush=True)
        t0 = time.perf_counter()
        model.fit(train["images"], train["masks"], train["labels"], epochs=ep, batch_size=cfg["batch_size"],
                  seed=seed, progress=progress, **cfg["fit"])
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = evaluate(model, test)
        t_eval1 = time.perf_counter() - t0
        settings = {"quick": quick, "seed": seed, "epochs": ep, "image_size": image_size, "threads": threads,
                    "train_categories": list(TRAIN_CATEGORIES), "test_categories": list(TEST_CATEGORIES),
                    "train_images": int(train["images"].shape[0]), "test_images": int(test["images"].shape[0]),
                    "batch_size": cfg["batch_size"], **cfg["model"], **cfg["fit"],
                    "encoder": model.encoder.config()}
        return {"untrained": before, "trained": after, "model": model,
                "history": model.history_,
                "seconds": {"data": t_data, "eval_untrained": t_eval0, "train": t_train, "eval_trained": t_eval1,
                            "total": time.perf_counter() - t_start},
                "settings": settings}
    finally:
        torch.set_num_threads(old_threads)


def _table(res: dict) -> str:
    cats = list(res["trained"]["per_category"])
    lines = ["| model | " + " | ".join(f"{c} px / img" for c in cats)
             + " | mean pixel AUROC | mean image AUROC | image AUROC, top-k only | image AUROC, text only |",
             "|---|" + "---|" * (len(cats) + 4)]
    for key in ("untrained", "trained"):
        r = res[key]
        cells = [f"{r['per_category'][c]['pixel_auroc']:.3f} / {r['per_category'][c]['image_auroc']:.3f}" for c in cats]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {r['pixel_auroc']:.3f} | {r['image_auroc']:.3f} | "
                     f"{r['image_auroc_topk']:.3f} | {r['image_auroc_text']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distkern_bayes_pfl.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small data, fewer epochs and samples (< 40 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--save", default=None, help="save the trained model to this .safetensors path")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    res = run(a.quick, seed=a.seed, epochs=a.epochs, threads=a.threads, progress=not a.no_progress, verbose=not a.json)
    if a.save:
        res["model"].save(a.save)
    if a.json:
        print(json.dumps({k: v for k, v in res.items() if k != "model"}, indent=2))
        return 0
    s = res["settings"]
    print(f"Bayes-PFL zero-shot demo ({'quick' if a.quick else 'full'}): trained on {', '.join(s['train_categories'])} "
          f"({s['train_images']} images), tested on {', '.join(s['test_categories'])} ({s['test_images']} images), "
          f"{s['image_size']} px, {s['epochs']} epochs, {s['samples']} MC samples x {s['n_prompts']} prompts")
    print(_table(res))
    sec = res["seconds"]
    print(f"time: train {sec['train']:.1f} s, evaluation {sec['eval_untrained'] + sec['eval_trained']:.1f} s, "
          f"total {sec['total']:.1f} s ({s['threads']} thread(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
