"""The issues' full-size shapes on the CPU, which the default CPU suite leaves out to keep its time
budget (they are CUDA cases there): min over K = 100 tied Gaussians and a K = 32 GMM at N = 100,000,
D = 256; PaDiM at B = 32, P = 3136, D = 550 (3.8 GB of fp32 factors); the anomaly map and the RCA
forward at B = 32 and the RCA forward + backward at B = 8.

    python benchmarks/issue_shapes_cpu.py [--cases REGEX] [--json FILE]

Runs the same Case objects through ``distkern.bench.run`` (same timing, memory and error
checks), with their device set to the CPU; ~7 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from distkern import bench
from distkern.bench import cases as bench_cases

NAMES = ("mahalanobis_k/min tied N=100000 D=256 K=100 fp32", "mahalanobis_k/gmm full N=100000 D=256 K=32 fp32",
         "mahalanobis_pos/B=32 P=3136 D=550 x fp32 factors fp32",
         "anomaly_map/L=4 B=32 P=1369 D=768 K=30 fp32", "prompt_align/fwd B=32 T=60 P=1369 D=768 H=4 fp32",
         "prompt_align/fwd+bwd B=8 T=60 P=1369 D=768 H=4 fp32")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="only the cases whose name matches this regular expression")
    ap.add_argument("--json", help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    full = {c.name: c for c in bench_cases.all_cases()}
    missing = [n for n in NAMES if n not in full]
    if missing:
        print(f"cases not found (renamed?): {missing}", file=sys.stderr)
        return 2
    selected = [dataclasses.replace(full[n], devices=("cpu",)) for n in NAMES
                if not args.cases or re.search(args.cases, n)]
    original = bench.cases_for
    bench.cases_for = lambda *a, **k: selected
    try:
        res = bench.run("cpu", progress=True)
    finally:
        bench.cases_for = original
    bench.print_results(res)
    if args.json:
        bench.write_json(res, args.json)
    return 0 if all(c["status"] == "ok" for c in res["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
