"""The benchmark case registry behind ``distkern bench``.

A :class:`Case` is one op at one shape and dtype on one kind of device: how to make its inputs,
our implementation, the eager-PyTorch baselines (written the way the anchor projects write them),
the peer libraries that are installed, and the op's byte / FLOP count model — the least memory
traffic and arithmetic any implementation of the op must do, from which the harness derives the
achieved GB/s and GFLOP/s and the fraction of the device's ceilings.

Every implementation is a callable ``fn(inputs) -> result`` taking the dict ``setup`` returned.
The first baseline is the *primary* one: ours is checked against it (a benchmark of a wrong
result is worthless), speed and memory ratios are reported against every baseline and peer.

To add an op: write a ``_<op>_cases()`` function returning its cases and add it to
``_FAMILIES``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable

import torch

__all__ = ["Case", "all_cases", "cases_for", "known_ops", "tolerance"]

Inputs = dict[str, Any]
Impl = Callable[[Inputs], Any]


@dataclasses.dataclass
class Case:
    """One benchmark case (see the module docstring)."""

    op: str
    label: str
    params: dict[str, int]
    dtype: torch.dtype
    setup: Callable[..., Inputs]  # setup(device, dtype, *, seed=0) -> inputs (fresh random data)
    ours: Impl
    baselines: dict[str, Impl]  # first one is the primary baseline
    bytes: int  # count model: minimum bytes moved by ours (read + write)
    flops: int  # count model: FLOPs of ours' arithmetic
    devices: tuple[str, ...]  # "cpu", "cuda"
    quick: bool = False  # belongs to the --quick suite (else to the full suite)
    peers: dict[str, Impl] = dataclasses.field(default_factory=dict)
    acceptance: dict[str, Any] | None = None  # e.g. {"baseline": "eager", "max_time_ratio": 1.0, "max_mem_fraction": 0.25}
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.op}/{self.label}"

    @property
    def primary_baseline(self) -> str:
        return next(iter(self.baselines))


_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted relative error of ours against the primary baseline, by input dtype."""
    return _TOLERANCE.get(dtype, 1e-3)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------
# Mahalanobis
# ---------------------------------------------------------------------------------------------


def mahalanobis_bytes(N: int, D: int, elem: int) -> int:
    """x read once (N·D·elem), factor (D²·4) and mean (D·4) read, N fp32 distances written."""
    return N * D * elem + D * D * 4 + D * 4 + N * 4


def mahalanobis_flops(N: int, D: int) -> int:
    """Triangular product Lᵀ(x − μ): 2·N·D(D+1)/2 = N·(D² + D); then the sum of squares: 2·N·D."""
    return N * (D * D + D) + 2 * N * D


def _mahalanobis_setup(N: int, D: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + N)
        # A well-conditioned random covariance (Wishart with 2D degrees of freedom plus a ridge:
        # condition number ~ 30) and a mean away from zero.
        a = torch.randn(D, 2 * D, generator=g, device=device, dtype=torch.float64)
        cov = a @ a.T / (2 * D) + 0.05 * torch.eye(D, device=device, dtype=torch.float64)
        mean = 0.5 * torch.randn(D, generator=g, device=device, dtype=torch.float64)
        from ..gaussian import whitening_factor

        L64 = whitening_factor(cov, dtype=None)  # Σ⁻¹ = L Lᵀ, float64
        x = torch.randn(N, D, generator=g, device=device, dtype=torch.float32)
        x.add_(mean.float())
        x = x.to(dtype)
        inputs: Inputs = {
            "x": x,
            "mean": mean.float(),
            "factor": L64.float().contiguous(),
            "precision": (L64 @ L64.T).float().contiguous(),  # P = Σ⁻¹, what the anchors store
        }
        if device.type == "cpu" and _has("sklearn"):
            inputs["sklearn"] = _sklearn_estimator(mean, cov, L64)
            # Peers take numpy float32 rows (users of those libraries hold numpy data already).
            inputs["x_numpy"] = x.float().numpy()
        return inputs

    return setup


def _sklearn_estimator(mean64: torch.Tensor, cov64: torch.Tensor, L64: torch.Tensor):
    """An ``EmpiricalCovariance`` carrying this Gaussian, set directly (no fit: same μ and Σ⁻¹)."""
    from sklearn.covariance import EmpiricalCovariance

    est = EmpiricalCovariance()
    est.location_ = mean64.cpu().numpy()
    est.covariance_ = cov64.cpu().numpy()
    est.precision_ = (L64 @ L64.T).cpu().numpy()
    est.n_features_in_ = int(mean64.shape[0])
    return est


def _maha_ours(i: Inputs):
    from ..ops.mahalanobis import mahalanobis

    return mahalanobis(i["x"], i["mean"], i["factor"])


def _maha_eager(i: Inputs):
    # pytorch-ood / anomalib (PaDiM): ((x − μ) P (x − μ)) summed over features, P = Σ⁻¹.
    x, mu, P = i["x"], i["mean"], i["precision"]
    if x.dtype != torch.float32:
        x = x.float()  # what users do with half-precision features before fp32 statistics
    return ((x - mu) @ P * (x - mu)).sum(1)


def _maha_eager_factor(i: Inputs):
    # The careful eager form with the same factor ours takes: ‖Lᵀ(x − μ)‖² (one GEMM, full D×D).
    x, mu, L = i["x"], i["mean"], i["factor"]
    if x.dtype != torch.float32:
        x = x.float()
    return ((x - mu) @ L).square().sum(1)


def _maha_sklearn(i: Inputs):
    # scikit-learn EmpiricalCovariance.mahalanobis (scipy cdist 'mahalanobis', float64, one thread).
    return i["sklearn"].mahalanobis(i["x_numpy"])


def _mahalanobis_case(N: int, D: int, dtype: torch.dtype, devices, *, quick=False, acceptance=None, note=""):
    elem = torch.empty((), dtype=dtype).element_size()
    peers = {"sklearn": _maha_sklearn} if ("cpu" in devices and _has("sklearn")) else {}
    return Case(
        op="mahalanobis",
        label=f"N={N} D={D} {dtype_name(dtype)}",
        params={"N": N, "D": D},
        dtype=dtype,
        setup=_mahalanobis_setup(N, D),
        ours=_maha_ours,
        baselines={"eager": _maha_eager, "eager-factor": _maha_eager_factor},
        peers=peers,
        bytes=mahalanobis_bytes(N, D, elem),
        flops=mahalanobis_flops(N, D),
        devices=tuple(devices),
        quick=quick,
        acceptance=acceptance,
        note=note,
    )


_MAHA_ACCEPT = {"baseline": "eager", "max_time_ratio": 1.0, "max_mem_fraction": 0.25}


def _mahalanobis_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    return [
        # full CPU suite
        _mahalanobis_case(200_000, 256, torch.float32, cpu, acceptance=_MAHA_ACCEPT,
                          note="acceptance: no slower than eager, peak extra memory < 1/4 of eager's"),
        _mahalanobis_case(50_000, 512, torch.float32, cpu),
        _mahalanobis_case(200_000, 256, torch.bfloat16, cpu, note="baselines convert x.float() first"),
        _mahalanobis_case(1024, 64, torch.float32, cpu, note="small: latency"),
        # full CUDA suite
        _mahalanobis_case(1_000_000, 256, torch.float32, cuda),
        _mahalanobis_case(1_000_000, 256, torch.bfloat16, cuda, note="baselines convert x.float() first"),
        _mahalanobis_case(100_000, 1024, torch.float32, cuda),
        _mahalanobis_case(4096, 128, torch.float32, cuda, note="small: latency"),
        # quick suite (tests, smoke runs)
        _mahalanobis_case(2000, 64, torch.float32, both, quick=True),
        _mahalanobis_case(2000, 64, torch.bfloat16, both, quick=True),
    ]


_FAMILIES = [_mahalanobis_cases]


def all_cases() -> list[Case]:
    """Every registered case, all devices and both suites."""
    out: list[Case] = []
    for family in _FAMILIES:
        out += family()
    return out


def known_ops() -> list[str]:
    return sorted({c.op for c in all_cases()})


def cases_for(device: str, *, quick: bool = False, ops: list[str] | None = None) -> list[Case]:
    """The cases of one suite (full or quick) on one device kind, optionally filtered by op name."""
    kind = torch.device(device).type
    return [
        c
        for c in all_cases()
        if kind in c.devices and c.quick == quick and (not ops or c.op in ops)
    ]
