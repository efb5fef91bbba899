"""Synthetic textures with pasted defects and pixel masks, for the zero-shot demo and tests.

Seven procedural texture categories (random frequency, orientation, phase, sharpness and two random colours
each) and three defect kinds (scratches, spots, holes). Everything is drawn from one seeded
``torch.Generator``, so a data set is a pure function of its arguments.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CATEGORIES", "DEFECTS", "make_texture", "add_defects", "make_dataset"]

CATEGORIES = ("stripes", "checkers", "blobs", "waves", "grid", "dots", "weave")
DEFECTS = ("scratch", "spot", "hole")


def _u(g, lo=0.0, hi=1.0, n=()):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _coords(size: int, g: torch.Generator):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    th = float(_u(g, 0, math.pi))
    return x * math.cos(th) + y * math.sin(th), -x * math.sin(th) + y * math.cos(th)


def _colours(g: torch.Generator):
    while True:
        c0, c1 = torch.rand(3, generator=g), torch.rand(3, generator=g)
        if float((c0 - c1).norm()) > 0.45:
            return c0, c1


def _pattern(category: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A ``(size, size)`` pattern in [0, 1]."""
    u, v = _coords(size, g)
    f = float(_u(g, 4, 9))
    ph = float(_u(g, 0, 2 * math.pi))
    sharp = float(_u(g, 1.5, 8))
    if category == "stripes":
        s = torch.sin(2 * math.pi * f * u + ph)
    elif category == "checkers":
        s = torch.sin(2 * math.pi * f / 2 * u + ph) * torch.sin(2 * math.pi * f / 2 * v)
        s = s / s.abs().amax()
    elif category == "blobs":
        n = torch.randn(1, 1, 6, 6, generator=g)
        s = F.interpolate(n, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
        s = s / s.abs().amax()
    elif category == "waves":
        a = float(_u(g, 0.5, 2.0))
        s = torch.sin(2 * math.pi * f * u + a * torch.sin(2 * math.pi * f / 2 * v) + ph)
    elif category == "grid":
        period = 1 / f
        du = torch.remainder(u, period) / period - 0.5
        dv = torch.remainder(v, period) / period - 0.5
        w = float(_u(g, 0.08, 0.18))
        s = 2 * torch.maximum(torch.exp(-(du / w) ** 2), torch.exp(-(dv / w) ** 2)) - 1
    elif category == "dots":
        period = 1 / f
        du = torch.remainder(u + ph, period) / period - 0.5
        dv = torch.remainder(v, period) / period - 0.5
        r = float(_u(g, 0.2, 0.35))
        s = torch.tanh(3 * (r - torch.sqrt(du ** 2 + dv ** 2)) / r)
    elif category == "weave":
        a = torch.sin(2 * math.pi * f * u) * (torch.sin(2 * math.pi * f / 2 * v + ph) > 0)
        b = torch.sin(2 * math.pi * f * v) * (torch.sin(2 * math.pi * f / 2 * v + ph) <= 0)
        s = a + b
    else:
        raise ValueError(f"unknown texture category {category!r}; choose from {CATEGORIES}")
    return torch.sigmoid(sharp * s)


def make_texture(category: str, size: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``(3, size, size)`` texture in [0, 1] of one category."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p = _pattern(category, size, g)
    c0, c1 = _colours(g)
    img = c0[:, None, None] * (1 - p) + c1[:, None, None] * p
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def _segment_dist(x, y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = (((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9)).clamp(0, 1)
    return torch.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2)


def add_defects(img: torch.Tensor, generator: torch.Generator, n: int = 1,
                kinds: tuple[str, ...] = DEFECTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``n`` defects into a ``(3, H, W)`` image → (image, mask ``(H, W)`` in {0, 1})."""
    g = generator
    _, H, W = img.shape
    scale = H / 64
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    out, mask = img.clone(), torch.zeros(H, W)
    mean = img.mean((1, 2))
    for _ in range(n):
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
        cx, cy = float(_u(g, 0.15, 0.85)) * W, float(_u(g, 0.15, 0.85)) * H
        if kind == "scratch":
            ang, length = float(_u(g, 0, math.pi)), float(_u(g, 12, 28)) * scale
            x0, y0 = cx - 0.5 * length * math.cos(ang), cy - 0.5 * length * math.sin(ang)
            x1, y1 = cx + 0.5 * length * math.cos(ang), cy + 0.5 * length * math.sin(ang)
            width = float(_u(g, 0.8, 1.6)) * scale
            alpha = (1 - (_segment_dist(x, y, x0, y0, x1, y1) - width / 2).clamp(0, 1))
            colour = (1 - mean + 0.25 * torch.randn(3, generator=g)).clamp(0, 1)
        elif kind == "spot":
            rx, ry = float(_u(g, 2.5, 6)) * scale, float(_u(g, 2.5, 6)) * scale
            d = torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
            alpha = (1 - (d - 1) * min(rx, ry)).clamp(0, 1)
            colour = torch.rand(3, generator=g)
            while float((colour - mean).norm()) < 0.35:
                colour = torch.rand(3, generator=g)
        elif kind == "hole":
            r = float(_u(g, 2.5, 5.5)) * scale
            d = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
            alpha = (1 - (d - r)).clamp(0, 1)
            colour = torch.full((3,), 0.04) + 0.02 * torch.rand(3, generator=g)
        else:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
        out = out * (1 - alpha) + colour[:, None, None] * alpha
        mask = torch.maximum(mask, (alpha > 0.5).float())
    return out.clamp(0, 1), mask


def make_dataset(categories, n_per_category: int, *, size: int = 64, anomaly_ratio: float = 0.5, seed: int = 0,
                 max_defects: int = 2) -> dict:
    """Images of each category, a fraction ``anomaly_ratio`` with 1..max_defects defects.

    Returns ``{"images" (N, 3, size, size), "masks" (N, size, size), "labels" (N,), "category" (N,) index into
    "categories", "categories" list}``."""
    g = torch.Generator().manual_seed(seed)
    imgs, masks, labels, cats = [], [], [], []
    n_bad = int(round(anomaly_ratio * n_per_category))
    for ci, cat in enumerate(categories):
        for i in range(n_per_category):
            img = make_texture(cat, size, g)
            if i < n_bad:
                k = 1 + int(torch.randint(max_defects, (1,), generator=g))
                img, m = add_defects(img, g, k)
            else:
                m = torch.zeros(size, size)
            imgs.append(img)
            masks.append(m)
            labels.append(int(m.any()))
            cats.append(ci)
    return {"images": torch.stack(imgs), "masks": torch.stack(masks), "labels": torch.tensor(labels),
            "category": torch.tensor(cats), "categories": list(categories)}
