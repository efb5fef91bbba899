"""The PaDiM plugin's whole fit on the CPU: time and peak memory, at WideResNet-50's D = 550 by default.

Three feature levels as a WideResNet-50 / ResNet-18 backbone gives them at 224 px (256 × 56², 512 × 28²,
1024 × 14² channels; random values, the backbone's cost left out), ``--num-features`` of the 1792 channels
kept, P = 3136 positions. What the fit does: the streaming statistics (``GaussianStats``, float64, one
batched GEMM a chunk of images into the P × D² scatter), then the P whitening factors straight from the
scatter (``GaussianStats.factor`` → ``distkern.whitening_factors``). At D = 550 the scatter alone is 7.6 GB
of float64 and the float32 factors 3.8 GB: the peak is about their sum plus the batches.

    python benchmarks/padim_fit_cpu.py [--num-features 550] [--images 64] [--batch 32]

Prints the fit's wall time, the peak resident set of the process and the time of the main steps (from
torch's profiler). 2-core Zen 4 EPYC, 2026-11-29, defaults: 30–34 s and 12.1–12.3 GB (44.6 s and 15.9 GB
when the covariances were materialised beside the scatter); of that, the factors 12.6–17.1 s (LAPACK's
Cholesky, ~4 ms a matrix on one core) and the first touch of the 7.6 GB scatter (``torch.zeros``) 1.7–8.7 s
— page faults, whose cost on this VM varies that much from hour to hour. Since the first batch writes the
scatter with its own product (no zeroed accumulators to fill, shift and add into): 26.2–26.3 s, 12.3 GB.
Since the factors call LAPACK's Cholesky directly and invert through trsm, and the scatter's memory is handed
back as each matrix is factorised (``factor(release=True)``): 16.2–17.9 s, 9.0 GB; the factors 10.5–11.3 s.
Since the plugin keeps no fourth moments (``GaussianStats(fourth_moments=False)``: only Ledoit-Wolf needs them,
and keeping them read the 7.6 GB scatter once more each update): 14.0–14.05 s (three runs), 9.2 GB; an
update of 32 images 1.45 → 0.90 s. Since the factors run eight matrices at a time on AVX-512 lanes (3.35 ms a
matrix on one core against LAPACK's 5.7): 12.1–15.4 s (four runs), 9.2 GB; the factors 6.5–7.7 s.
"""
from __future__ import annotations

import argparse
import time

import torch


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-features", type=int, default=550)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        from distkern_padim import PaDiM
    except ImportError:
        raise SystemExit("needs the padim plugin (make install installs it)") from None

    g = torch.Generator().manual_seed(args.seed)
    sizes = [b for b in range(0, args.images, args.batch)]
    batches = [[torch.randn(min(args.batch, args.images - s), c, h, h, generator=g)
                for c, h in ((256, 56), (512, 28), (1024, 14))] for s in sizes]
    before = peak_rss_gb()
    det = PaDiM(num_features=args.num_features)
    from torch.profiler import profile

    with profile() as prof:
        t0 = time.perf_counter()
        det.fit(iter(batches))
        wall = time.perf_counter() - t0
    print(f"PaDiM fit: {args.images} images, D={args.num_features}, P=3136: {wall:.2f} s, peak RSS "
          f"{peak_rss_gb():.2f} GB ({before:.2f} GB before, the input batches included)")
    keep = ("distkern::whitening_factors", "distkern::whitening_factors_release_", "aten::baddbmm_", "aten::zeros", "aten::bmm", "aten::copy_")
    for ev in prof.key_averages():
        if ev.key in keep:
            print(f"  {ev.key:32s} {ev.cpu_time_total / 1e6:7.2f} s  ({ev.count} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
