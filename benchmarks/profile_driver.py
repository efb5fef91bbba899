"""Launch one distkern CUDA kernel at an issue shape, for Nsight Compute (benchmarks/profile_kernels.sh).

    python benchmarks/profile_driver.py CASE      # CASE: one of CASES below

Each case warms up once (so lazy initialisation is not what ncu sees first, with ``-c 1`` and a
kernel-name filter the profiled launch is the second one), then launches the op once more."""
from __future__ import annotations

import sys

import torch


def _maha(mode: str):
    import distkern

    g = torch.Generator(device="cuda").manual_seed(0)
    N, D = 1_000_000, 256
    x = torch.randn(N, D, device="cuda", generator=g)
    L = torch.linalg.cholesky(torch.eye(D, device="cuda") + 0.1 * torch.ones(D, D, device="cuda")).contiguous()
    mu = torch.zeros(D, device="cuda")

    def run():
        with distkern.cuda_matmul(mode):
            return distkern.mahalanobis(x, mu, L)

    return run


def _step():
    from distkern.ops.diffusion import ddim_step

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 16, 256, 256, device="cuda", generator=g)
    m = torch.randn_like(x)
    return lambda: ddim_step(m, x, 0.5, 0.6)


def _anomaly_map():
    from distkern.ops.align import anomaly_map

    g = torch.Generator(device="cuda").manual_seed(0)
    patches = torch.randn(4, 32, 1369, 768, device="cuda", generator=g)
    text = torch.randn(30, 2, 768, device="cuda", generator=g)
    return lambda: anomaly_map(patches, text)


def _kernel_matmul():
    import distkern

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 64, device="cuda", generator=g)
    y = torch.randn(65536, 64, device="cuda", generator=g)
    return lambda: distkern.kernel_matmul(x, y, kernel="gaussian", bandwidth=[0.5, 1.0, 2.0])


CASES = {
    "maha_fma": lambda: _maha("fma"),
    "maha_tf32": lambda: _maha("tf32"),
    "step": _step,
    "anomaly_map": _anomaly_map,
    "kernel_matmul": _kernel_matmul,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CASES:
        print(f"usage: profile_driver.py CASE  (CASE: {', '.join(CASES)})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("profile_driver: needs a CUDA GPU", file=sys.stderr)
        return 1
    run = CASES[argv[0]]()
    run()
    torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    print(f"profile_driver: {argv[0]} done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
