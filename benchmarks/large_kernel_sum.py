"""kernel_matmul at a size no kernel matrix fits: N = M = 1,000,000 points, D = 64, three Gaussian
bandwidths (the issue's "runs" target on a GPU; the float32 matrix alone would be 4 TB).

    python benchmarks/large_kernel_sum.py [--n 1000000] [--d 64] [--mode auto|fma|tf32|3xtf32] [--check 512]

Prints one JSON line: time of one call (CUDA events), peak extra device memory, the matmul mode,
and the largest relative error of ``--check`` output rows against a float64 computation of the
same rows on the GPU (full y, chunked). Needs a CUDA GPU and a CUDA build of distkern; exits with
status 1 and a clear message otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--mode", default="auto", choices=["auto", "fma", "tf32", "3xtf32"])
    ap.add_argument("--check", type=int, default=512, help="rows checked against float64 (0: none)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("large_kernel_sum: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    import distkern

    if not distkern.build_info().get("cuda"):
        print("large_kernel_sum: distkern was built without its CUDA kernels", file=sys.stderr)
        return 1
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, bw = args.n, args.d, [0.5, 1.0, 2.0]
    scale = 2.0 / d**0.5  # pairwise distances near the bandwidths
    x = torch.randn(n, d, device="cuda", generator=g) * scale
    y = torch.randn(n, d, device="cuda", generator=g) * scale + 0.1 * scale
    with distkern.cuda_matmul(args.mode):
        distkern.kernel_matmul(x[:1024], y[:1024], bandwidth=bw)  # warm-up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = distkern.kernel_matmul(x, y, bandwidth=bw)
        b.record()
        b.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    err = None
    if args.check:
        xs = x[: args.check].double()
        ref = torch.zeros(xs.shape[0], dtype=torch.float64, device="cuda")
        for k in range(0, n, 65536):
            d2 = torch.cdist(xs, y[k:k + 65536].double()).square()
            ref += sum(torch.exp(-d2 / (2 * s * s)) for s in bw).sum(1)
        err = float(((out[: args.check].double() - ref).abs() / ref.abs()).max())
    print(json.dumps({"case": f"kernel_matmul gaussian x3 N=M={n} D={d}", "device": torch.cuda.get_device_name(),
                      "mode": args.mode,
                      "seconds": a.elapsed_time(b) / 1e3, "peak_extra_bytes": int(peak),
                      "max_rel_err_checked_rows": err, "checked_rows": args.check}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
