"""Benchmark cases for ``distkern bench``, registered in the ``distkern.benchmarks`` entry-point group.

``cases()`` returns :class:`distkern.bench.cases.Case` objects; the harness measures and reports them exactly
like distkern's own: the fused op (``ours``) against the eager formula a user would write, checked for
agreement first, with the byte / FLOP count model giving GB/s and the fraction of the device's ceilings.
"""
from __future__ import annotations

import torch

from distkern.bench.cases import Case, dtype_name


def _setup(N: int, D: int):
    def setup(device, dtype, *, seed: int = 0):
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + N)
        x = torch.randn(N, D, generator=g, device=device).mul_(2.0).add_(1.0).to(dtype)
        mean = torch.randn(D, generator=g, device=device)
        inv_std = torch.rand(D, generator=g, device=device).add_(0.5)
        return {"x": x, "mean": mean, "inv_std": inv_std}

    return setup


def _ours(i):
    from .ops import standardized_sqdist

    return standardized_sqdist(i["x"], i["mean"], i["inv_std"])


def _eager(i):
    # what one writes in plain PyTorch: an (N, D) temporary for (x − μ)·s, squared, summed
    x = i["x"] if i["x"].dtype == torch.float32 else i["x"].float()
    return ((x - i["mean"]) * i["inv_std"]).square().sum(1)


def _case(N: int, D: int, dtype: torch.dtype, devices: tuple[str, ...], quick: bool = False) -> Case:
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(
        op="distkern_example_kernel.standardized_sqdist",
        label=f"N={N} D={D} {dtype_name(dtype)}",
        params={"N": N, "D": D},
        dtype=dtype,
        setup=_setup(N, D),
        ours=_ours,
        baselines={"eager": _eager},
        bytes=N * D * elem + 2 * D * 4 + N * 4,  # x read once, μ and σ⁻¹ read, N floats written
        flops=3 * N * D,  # subtract, multiply, fused square-add
        devices=devices,
        quick=quick,
        note="distkern-example-kernel: a plugin's own op through the distkern.benchmarks hook",
    )


def cases() -> list[Case]:
    """The plugin's benchmark cases (full and quick suites, CPU and CUDA)."""
    return [
        _case(200_000, 256, torch.float32, ("cpu",)),
        _case(1_000_000, 512, torch.float32, ("cuda",)),
        _case(1_000_000, 512, torch.bfloat16, ("cuda",)),
        _case(2_000, 64, torch.float32, ("cpu", "cuda"), quick=True),
    ]
