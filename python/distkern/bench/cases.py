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
``_FAMILIES``. A plugin adds cases through the ``distkern.benchmarks`` entry-point group
(:mod:`distkern.bench.hooks`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
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
    peers: dict[str, Impl] = dataclasses.field(default_factory=dict)  # peer libraries (CPU only unless in cuda_peers)
    acceptance: dict[str, Any] | None = None  # e.g. {"baseline": "eager", "max_time_ratio": 1.0, "max_mem_fraction": 0.25}
    note: str = ""
    tol: float | None = None  # agreement tolerance when the input dtype alone does not set it
    origin: str = "distkern"  # who registered the case: distkern, or a plugin's distribution (bench hooks)
    matmul_ceiling: str = "matmul_fp32"  # the measured matmul rate its FLOPs are held against
    cuda_peers: tuple[str, ...] = ()  # peers that run on CUDA tensors too (the others go through NumPy)

    @property
    def name(self) -> str:
        return f"{self.op}/{self.label}"

    @property
    def primary_baseline(self) -> str:
        return next(iter(self.baselines))

    def peers_on(self, device: str) -> dict[str, Impl]:
        """The peers timed on ``device``: all of them on the CPU, those in ``cuda_peers`` on CUDA."""
        if torch.device(device).type == "cpu":
            return dict(self.peers)
        return {k: f for k, f in self.peers.items() if k in self.cuda_peers}


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
    # the scikit-learn peer (single-threaded float64, ~2 s a call) only where the acceptance is judged
    peers = {"sklearn": _maha_sklearn} if ("cpu" in devices and acceptance and _has("sklearn")) else {}
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
        _mahalanobis_case(1_000_000, 512, torch.float32, cuda, note="issue target: >= 1.5x eager"),
        _mahalanobis_case(1_000_000, 512, torch.bfloat16, cuda, note="issue target: >= 1.5x eager; baselines convert x.float() first"),
        _mahalanobis_case(100_000, 1024, torch.float32, cuda),
        _mahalanobis_case(4096, 128, torch.float32, cuda, note="small: latency"),
        # quick suite (tests, smoke runs)
        _mahalanobis_case(2000, 64, torch.float32, both, quick=True),
        _mahalanobis_case(2000, 64, torch.bfloat16, both, quick=True),
    ]


# ---------------------------------------------------------------------------------------------
# K Gaussians (mahalanobis_k): tied covariance with min over classes (Mahalanobis OOD, Lee et al.)
# and per-component covariances with logsumexp (GMM log-likelihood)
# ---------------------------------------------------------------------------------------------


def _mixture_setup(N: int, D: int, K: int, shared: bool):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + 31 * K + N)
        C = 1 if shared else K
        a = torch.randn(C, D, 2 * D, generator=g, device=device, dtype=torch.float64)
        cov = a @ a.transpose(1, 2) / (2 * D) + 0.05 * torch.eye(D, device=device, dtype=torch.float64)
        means = torch.randn(K, D, generator=g, device=device, dtype=torch.float64)
        from ..gaussian import whitening_factor

        L64 = whitening_factor(cov, dtype=None)
        labels = torch.randint(K, (N,), generator=g, device=device)
        x = (means[labels] + torch.randn(N, D, generator=g, device=device, dtype=torch.float64)).to(dtype)
        logw = torch.full((K,), -math.log(K), dtype=torch.float64, device=device)
        inputs: Inputs = {
            "x": x,
            "means": means.float(),
            "factors": (L64[0] if shared else L64).float().contiguous(),
            "precision": (L64 @ L64.transpose(1, 2)).float().contiguous(),  # (C, D, D)
            "log_weights": logw.float(),
        }
        if device.type == "cpu" and not shared and _has("sklearn"):
            from sklearn.mixture import GaussianMixture

            gm = GaussianMixture(K, covariance_type="full")
            gm.weights_ = logw.exp().numpy()
            gm.means_ = means.numpy()
            gm.covariances_ = cov.numpy()
            gm.precisions_cholesky_ = L64.numpy()  # sklearn's precisions_cholesky_ is our L
            gm.precisions_ = (L64 @ L64.transpose(1, 2)).numpy()
            gm.n_features_in_ = D
            inputs["sklearn_gmm"] = gm
            inputs["x_numpy"] = x.float().numpy()
        return inputs

    return setup


def _x32(i: Inputs):
    x = i["x"]
    return x if x.dtype == torch.float32 else x.float()


def _tied_ours(i: Inputs):
    from ..ops.mahalanobis import mahalanobis_k

    return mahalanobis_k(i["x"], i["means"], i["factors"], reduce="min").values


def _tied_eager(i: Inputs):
    # pytorch-ood Mahalanobis: one (x − μ_k) P (x − μ_k) pass per class, then the min over classes.
    x, mu, P = _x32(i), i["means"], i["precision"][0]
    return torch.stack([((x - mu[k]) @ P * (x - mu[k])).sum(1) for k in range(mu.shape[0])], 1).min(1).values


def _tied_eager_expand(i: Inputs):
    # The savvy eager form: xᵀPx − 2 xᵀPμ_k + μ_kᵀPμ_k with two GEMMs (N×K and N×D temporaries).
    x, mu, P = _x32(i), i["means"], i["precision"][0]
    xP = x @ P
    d2 = (xP * x).sum(1, keepdim=True) - 2 * xP @ mu.T + ((mu @ P) * mu).sum(1)
    return d2.clamp_min(0).min(1).values


def _gmm_bias(i: Inputs):
    L = i["factors"]
    D = L.shape[-1]
    return i["log_weights"] + torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) - 0.5 * D * math.log(2 * math.pi)


def _gmm_ours(i: Inputs):
    from ..ops.mahalanobis import gmm_log_likelihood

    return gmm_log_likelihood(i["x"], i["means"], i["factors"], i["log_weights"])


def _gmm_eager(i: Inputs):
    # Per component: (x − μ_k) P_k (x − μ_k), then logsumexp over components (N×K kept).
    x, mu, P = _x32(i), i["means"], i["precision"]
    d2 = torch.stack([((x - mu[k]) @ P[k] * (x - mu[k])).sum(1) for k in range(mu.shape[0])], 1)
    return torch.logsumexp(_gmm_bias(i) - 0.5 * d2, dim=1)


def _gmm_sklearn(i: Inputs):
    return i["sklearn_gmm"].score_samples(i["x_numpy"])


def _mixture_case(N: int, D: int, K: int, shared: bool, dtype: torch.dtype, devices, *, quick=False, note=""):
    elem = torch.empty((), dtype=dtype).element_size()
    C = 1 if shared else K
    tri = N * (D * D + D) + 2 * N * D  # one triangular product + sum of squares
    flops = tri + 2 * N * D * K if shared else K * tri
    peers = {"sklearn": _gmm_sklearn} if (not shared and "cpu" in devices and _has("sklearn")) else {}
    return Case(
        op="mahalanobis_k",
        label=f"{'min tied' if shared else 'gmm full'} N={N} D={D} K={K} {dtype_name(dtype)}",
        params={"N": N, "D": D, "K": K},
        dtype=dtype,
        setup=_mixture_setup(N, D, K, shared),
        ours=_tied_ours if shared else _gmm_ours,
        baselines={"eager": _tied_eager, "eager-expand": _tied_eager_expand} if shared else {"eager": _gmm_eager},
        peers=peers,
        bytes=N * D * elem + C * D * D * 4 + K * D * 4 + N * 4,
        flops=flops,
        devices=tuple(devices),
        quick=quick,
        note=note,
    )


def _mixture_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    small = "N reduced from 100k on the CPU to keep the default run within its time budget"
    return [
        _mixture_case(20_000, 256, 100, True, torch.float32, cpu, note=small),
        _mixture_case(20_000, 256, 32, False, torch.float32, cpu, note=small),
        _mixture_case(100_000, 256, 100, True, torch.float32, cuda),
        _mixture_case(100_000, 256, 32, False, torch.float32, cuda),
        _mixture_case(100_000, 256, 100, True, torch.bfloat16, cuda, note="baselines convert x.float() first"),
        _mixture_case(1000, 32, 10, True, torch.float32, both, quick=True),
        _mixture_case(1000, 32, 4, False, torch.float32, both, quick=True),
    ]


# ---------------------------------------------------------------------------------------------
# Per-position Gaussians (mahalanobis_pos, PaDiM) vs anomalib's batched matmul over inverses
# ---------------------------------------------------------------------------------------------


def _positions_setup(B: int, P: int, D: int, fdtype: torch.dtype):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + P + B)
        # Random well-conditioned lower-triangular factors (drawing P covariances and factorising
        # them would dominate the run at D = 550); the baseline gets P_p = L_p L_pᵀ, anomalib's
        # inverse covariance.
        L = torch.randn(P, D, D, generator=g, device=device, dtype=torch.float32).mul_(0.3 / math.sqrt(D)).tril_()
        L.diagonal(dim1=1, dim2=2).add_(1.0)
        prec = torch.bmm(L, L.transpose(1, 2))
        means = torch.randn(P, D, generator=g, device=device, dtype=torch.float32)
        emb = torch.randn(B, D, P, generator=g, device=device, dtype=torch.float32).add_(means.T).to(dtype)
        return {
            "x": emb.transpose(1, 2),  # (B, P, D) view of the (B, C, H·W) embedding, as anomalib holds it
            "emb": emb,
            "means": means,
            "factors": L.to(fdtype).contiguous(),
            "precision": prec,
        }

    return setup


def _pos_ours(i: Inputs):
    from ..ops.mahalanobis import mahalanobis_pos

    return mahalanobis_pos(i["x"], i["means"], i["factors"])


def _pos_anomalib(i: Inputs):
    # anomalib PaDiM: delta = (embedding − mean).permute(2, 0, 1); ((delta @ inv_cov) * delta).sum(2)
    emb = i["emb"] if i["emb"].dtype == torch.float32 else i["emb"].float()
    delta = (emb - i["means"].T).permute(2, 0, 1)
    return (torch.matmul(delta, i["precision"]) * delta).sum(2).permute(1, 0)


def _positions_case(B: int, P: int, D: int, dtype: torch.dtype, fdtype: torch.dtype, devices, *, quick=False, note=""):
    elem, felem = (torch.empty((), dtype=t).element_size() for t in (dtype, fdtype))
    return Case(
        op="mahalanobis_pos",
        label=f"B={B} P={P} D={D} x {dtype_name(dtype)} factors {dtype_name(fdtype)}",
        params={"B": B, "P": P, "D": D},
        dtype=dtype,
        setup=_positions_setup(B, P, D, fdtype),
        ours=_pos_ours,
        baselines={"anomalib": _pos_anomalib},
        bytes=P * D * (D + 1) // 2 * felem + B * P * D * elem + P * D * 4 + B * P * 4,
        flops=B * P * (D * D + D) + 2 * B * P * D,
        devices=tuple(devices),
        quick=quick,
        note=note,
        # ours reads the factors in their own dtype; the baseline keeps fp32 inverses
        tol=max(tolerance(dtype), tolerance(fdtype)),
    )


def _positions_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    return [
        _positions_case(32, 3136, 100, f32, f32, both, note="resnet18 PaDiM: 56x56 grid, 100 channels"),
        _positions_case(32, 3136, 550, f32, f32, cuda, note="WRN50 PaDiM: 3.8 GB of fp32 factors"),
        _positions_case(32, 3136, 550, f32, bf16, cuda, note="factors in bf16 (1.9 GB); anomalib keeps fp32"),
        _positions_case(32, 400, 550, f32, f32, cpu, note="WRN50 channels on a 20x20 grid (CPU time budget)"),
        _positions_case(4, 64, 32, f32, f32, both, quick=True),
    ]


# ---------------------------------------------------------------------------------------------
# Nearest reference by cosine similarity (nearest_cosine, ResAD) vs the dense similarity matrix
# ---------------------------------------------------------------------------------------------


def _nearest_setup(N: int, M: int, D: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + M + N)
        refs = torch.randn(M, D, generator=g, device=device)
        x = (refs[torch.randint(M, (N,), generator=g, device=device)] + 0.5 * torch.randn(N, D, generator=g, device=device))
        return {"x": x.to(dtype), "refs": refs}

    return setup


def _nearest_ours(i: Inputs):
    from ..ops.mahalanobis import nearest_reference

    return nearest_reference(i["x"], i["refs"]).similarity


def _nearest_dense(i: Inputs):
    # ResAD: normalise both, the full (N, M) similarity matrix, then max / argmax over references.
    import torch.nn.functional as F

    x = i["x"] if i["x"].dtype == torch.float32 else i["x"].float()
    return (F.normalize(x, dim=1) @ F.normalize(i["refs"], dim=1).T).max(1).values


def _nearest_case(N: int, M: int, D: int, dtype: torch.dtype, devices, *, quick=False, note=""):
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(
        op="nearest_cosine",
        label=f"N={N} M={M} D={D} {dtype_name(dtype)}",
        params={"N": N, "M": M, "D": D},
        dtype=dtype,
        setup=_nearest_setup(N, M, D),
        ours=_nearest_ours,
        baselines={"dense": _nearest_dense},
        bytes=N * D * elem + M * D * 4 + N * 12,
        flops=2 * N * M * D,
        devices=tuple(devices),
        quick=quick,
        note=note,
    )


def _nearest_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    return [
        _nearest_case(10_000, 10_000, 256, torch.float32, cpu, note="about 4 reference images x 50x50 positions"),
        _nearest_case(100_352, 12_544, 512, torch.float32, cuda, note="32 images vs 4 references, 56x56 positions"),
        _nearest_case(100_352, 12_544, 512, torch.bfloat16, cuda),
        _nearest_case(500, 700, 32, torch.float32, both, quick=True),
    ]


# ---------------------------------------------------------------------------------------------
# Streaming Gaussian fit (GaussianStats) vs one plain covariance product over the same data
# ---------------------------------------------------------------------------------------------


def _fit_setup(N: int, D: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + N)
        a = torch.randn(D, D, generator=g, device=device) / math.sqrt(D)
        x = torch.randn(N, D, generator=g, device=device) @ a + 3.0
        return {"x": x.to(dtype), "batch": 8192}

    return setup


def _fit_ours(product_dtype):
    def run(i: Inputs):
        from ..gaussian import GaussianStats

        x, b = i["x"], i["batch"]
        stats = GaussianStats(product_dtype=product_dtype)
        for k in range(0, x.shape[0], b):
            stats.update(x[k:k + b])
        return stats.covariance().to(torch.float32)

    return run


def _fit_plain(i: Inputs):
    # What a user writes with the whole data set in memory: centre, one X^T X, divide.
    x = i["x"] if i["x"].dtype == torch.float32 else i["x"].float()
    xc = x - x.mean(0)
    return xc.T @ xc / x.shape[0]


def _padim_fit_setup(B: int, D: int, H: int, W: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + H * W + B)
        means = torch.randn(D, H, W, generator=g, device=device)
        return {"emb": (torch.randn(B, D, H, W, generator=g, device=device) + means).to(dtype)}

    return setup


def _padim_fit_ours(i: Inputs):
    # distkern's PaDiM fit: one batch of a streaming fit, then anomalib's unbiased covariance + 0.01·I
    from ..gaussian import GaussianStats

    emb = i["emb"]
    B, _, H, W = emb.shape
    stats = GaussianStats(num_positions=H * W, fourth_moments=False).update(emb)  # as the padim plugin fits
    cov = stats.covariance().mul_(B / (B - 1))
    cov.diagonal(dim1=-2, dim2=-1).add_(0.01)
    return cov.to(torch.float32)


def _padim_fit_anomalib(i: Inputs):
    # anomalib's MultiVariateGaussian.forward: the mean, then one covariance per position in a Python loop
    # (the inverse after it is left out on both sides)
    emb = i["emb"].float()
    B, C, H, W = emb.shape
    vectors = emb.view(B, C, H * W)
    torch.mean(vectors, dim=0)
    cov = torch.zeros(C, C, H * W, device=emb.device)
    eye = torch.eye(C, device=emb.device)
    for p in range(H * W):
        obs = vectors[:, :, p]
        obs = obs - obs.mean(0)
        cov[:, :, p] = obs.t().mm(obs) / (B - 1) + 0.01 * eye
    return cov.permute(2, 0, 1)


def _fit_cases() -> list[Case]:
    both = ("cpu", "cuda")
    out = [Case(
        op="gaussian_fit",
        label="positions B=32 P=3136 D=100 fp32 (PaDiM fit, one batch)",
        params={"B": 32, "P": 3136, "D": 100},
        dtype=torch.float32,
        setup=_padim_fit_setup(32, 100, 56, 56),
        ours=_padim_fit_ours,
        baselines={"anomalib": _padim_fit_anomalib},
        bytes=32 * 100 * 3136 * 4 + 3136 * 100 * 100 * 4,
        flops=2 * 32 * 3136 * 100 * 100,
        devices=both,
        note="GaussianStats(num_positions=P, fourth_moments=False).update(fmap) + covariance(): float64 streaming "
             "moments (as the padim plugin fits: no Ledoit-Wolf moments), vs "
             "anomalib's per-position covariance loop over the whole (B, C, H, W) embedding",
    )]
    for N, D, quick in [(1_000_000, 256, False), (20_000, 64, True)]:
        out.append(Case(
            op="gaussian_fit",
            label=f"N={N} D={D} fp32 batches of 8192",
            params={"N": N, "D": D},
            dtype=torch.float32,
            setup=_fit_setup(N, D),
            ours=_fit_ours(torch.float32),
            baselines={"plain": _fit_plain, "ours-fp64-products": _fit_ours(torch.float64)},
            bytes=N * D * 4 + D * D * 8,
            flops=N * D * (D + 1) + 6 * N * D,
            devices=both,
            quick=quick,
            note="GaussianStats(product_dtype=float32): each batch's moments in one op (distkern.centred_moments: "
                 "rows centred in float64 into an L2 tile, the scatter's upper triangle in float32 products), "
                 "float64 merging",
        ))
    return out


# ---------------------------------------------------------------------------------------------
# Kernel sums (kernel_matmul) and MMD vs eager torch.cdist + exp + sum (chunked where needed)
# ---------------------------------------------------------------------------------------------

_BANDWIDTHS = [0.5, 1.0, 2.0]


def _ksum_setup(N: int, M: int, D: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + M + N)
        scale = 1.0 / math.sqrt(D) * 2.0  # typical distances near the bandwidths
        x = torch.randn(N, D, generator=g, device=device) * scale
        y = torch.randn(M, D, generator=g, device=device) * scale + 0.1 * scale
        return {"x": x.to(dtype), "y": y.to(dtype)}

    return setup


def _ksum_ours(i: Inputs):
    from ..ops.kernel_sum import kernel_matmul

    return kernel_matmul(i["x"], i["y"], kernel="gaussian", bandwidth=_BANDWIDTHS)


def _ksum_eager(i: Inputs):
    # torch.cdist + exp + sum, in row chunks that keep the (chunk, M) block near 256 MB.
    x, y = i["x"].float(), i["y"].float()
    rows = max(1, (64 << 20) // max(1, y.shape[0]))
    out = []
    for k in range(0, x.shape[0], rows):
        d2 = torch.cdist(x[k:k + rows], y).square()
        out.append(sum(torch.exp(-d2 / (2 * s * s)) for s in _BANDWIDTHS).sum(1))
    return torch.cat(out)


def _ksum_pykeops(i: Inputs):
    # KeOps: the same Gaussian sum as a symbolic LazyTensor reduction (compiled on first use, then cached)
    from pykeops.torch import LazyTensor

    x, y = i["x"].float(), i["y"].float()
    d2 = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1)
    k = None
    for s in _BANDWIDTHS:
        term = (-d2 / (2 * s * s)).exp()
        k = term if k is None else k + term
    return k.sum(1).reshape(-1)


def _mmd_fb_ours(i: Inputs):
    from ..mmd import mmd2

    with torch.enable_grad():  # the harness times under no_grad
        x = i["x"].detach().requires_grad_()
        loss = mmd2(x, i["y"], kernel="polynomial", estimator="unbiased")
        loss.backward()
    return x.grad


def _mmd_fb_eager(i: Inputs):
    # MMD-DDM's estimator written plainly: polynomial kernel matrices, diagonals dropped.
    with torch.enable_grad():
        x = i["x"].detach().float().requires_grad_()
        y = i["y"].float()
        D, n, m = x.shape[1], x.shape[0], y.shape[0]
        kxx = (x @ x.T / D + 1) ** 3
        kyy = (y @ y.T / D + 1) ** 3
        kxy = (x @ y.T / D + 1) ** 3
        loss = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) \
            - 2 * kxy.mean()
        loss.backward()
    return x.grad


_DAN_BW = [2.0 ** k for k in range(-2, 3)]  # 5 bandwidths spaced x2 (DAN / FedKA) around the typical distance
_DAN_SCALE = 2.0  # _ksum_setup's pairwise distances are ~2.8 at every D


def _mmd_mk_ours(i: Inputs):
    from ..mmd import mmd2

    with torch.enable_grad():
        x = i["x"].detach().requires_grad_()
        mmd2(x, i["y"], kernel="gaussian", bandwidth=[_DAN_SCALE * b for b in _DAN_BW], estimator="biased").backward()
    return x.grad


def _mmd_mk_eager(i: Inputs):
    # DAN's multi-kernel MMD as its code writes it: the pairwise squared distances of the joined
    # batch (through cdist here, not the (2n)²·D broadcast of the original), a sum of Gaussian
    # kernels, the V-statistic from the four blocks.
    with torch.enable_grad():
        x = i["x"].detach().float().requires_grad_()
        y = i["y"].float()
        n = x.shape[0]
        total = torch.cat([x, y])
        d2 = torch.cdist(total, total).square()
        k = sum(torch.exp(-d2 / (2 * (_DAN_SCALE * b) ** 2)) for b in _DAN_BW)
        loss = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
        loss.backward()
    return x.grad


_MMD_BW = 1.0


def _mmd_biased_ours(i: Inputs):
    from ..mmd import mmd2

    return mmd2(i["x"], i["y"], kernel="gaussian", bandwidth=_MMD_BW, estimator="biased")


def _mmd_biased_eager(i: Inputs):
    # the V-statistic written plainly: three Gaussian kernel matrices through torch.cdist
    x, y = i["x"].float(), i["y"].float()

    def kbar(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * _MMD_BW**2)).mean()

    return kbar(x, x) + kbar(y, y) - 2 * kbar(x, y)


def _mmd_biased_geomloss(i: Inputs):
    import geomloss  # GeomLoss' Gaussian SamplesLoss is half the biased MMD²

    return 2 * geomloss.SamplesLoss("gaussian", blur=_MMD_BW, backend="tensorized")(i["x"].float(), i["y"].float())


_PERMS = 1000


def _mmd_test_ours(i: Inputs):
    from ..mmd import mmd_test

    res = mmd_test(i["x"], i["y"], permutations=_PERMS, kernel="gaussian", bandwidth=_MMD_BW)
    return torch.tensor([res.statistic, res.p_value], dtype=torch.float64)


def _mmd_test_eager(i: Inputs):
    # the permutation test written plainly: K(z, z) through cdist + exp (row chunks of ~256 MB),
    # times the same weight matrix, one GEMM per chunk
    from ..mmd import permutation_weights

    x, y = i["x"].float(), i["y"].float()
    z = torch.cat([x, y])
    W = permutation_weights(x.shape[0], y.shape[0], _PERMS, device=z.device)
    rows = max(1, (64 << 20) // z.shape[0])
    KW = torch.cat([torch.exp(-torch.cdist(z[k:k + rows], z).square() / (2 * _MMD_BW**2)) @ W
                    for k in range(0, z.shape[0], rows)])
    stats = (W * KW).sum(0)
    p = (1 + (stats[1:] >= stats[0]).sum()) / (1 + _PERMS)
    return torch.stack([stats[0].double(), p.double()])


def _ksum_cases() -> list[Case]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    out = []
    for N, D, devs, quick in [(20_000, 64, cpu, False), (65_536, 64, cuda, False), (65_536, 512, cuda, False),
                              (65_536, 2048, cuda, False), (2_000, 16, both, True)]:
        out.append(Case(
            op="kernel_matmul",
            label=f"gaussian x3 N=M={N} D={D} fp32",
            params={"N": N, "M": N, "D": D},
            dtype=torch.float32,
            setup=_ksum_setup(N, N, D),
            ours=_ksum_ours,
            baselines={"eager": _ksum_eager},
            peers={"pykeops": _ksum_pykeops} if _has("pykeops") else {},
            cuda_peers=("pykeops",),
            bytes=2 * N * D * 4 + N * 4,
            flops=2 * N * N * D + 3 * 4 * N * N,
            devices=devs,
            quick=quick,
        ))
    out.append(Case(
        op="mmd2",
        label="MMD-DDM fwd+bwd N=M=64 D=2048 fp32",
        params={"N": 64, "M": 64, "D": 2048},
        dtype=torch.float32,
        setup=_ksum_setup(64, 64, 2048),
        ours=_mmd_fb_ours,
        baselines={"eager": _mmd_fb_eager},
        bytes=2 * 64 * 2048 * 4 * 3,
        # ours: x·[x; y]ᵀ and y·yᵀ forward, B·[x; y] backward (eager: 6 GEMMs of 2·64·64·2048)
        flops=2 * 64 * 128 * 2048 * 2 + 2 * 64 * 64 * 2048,
        devices=both,
        note="polynomial kernel (KID), unbiased estimator, gradient w.r.t. x",
    ))
    out.append(Case(
        op="mmd2",
        label="multi-kernel fwd+bwd N=M=256 D=256 fp32",
        params={"N": 256, "M": 256, "D": 256},
        dtype=torch.float32,
        setup=_ksum_setup(256, 256, 256),
        ours=_mmd_mk_ours,
        baselines={"eager": _mmd_mk_eager},
        bytes=2 * 256 * 256 * 4 * 3,
        flops=2 * 3 * 256 * 256 * 256 + 5 * 4 * 256 * 256 * 4,
        devices=both,
        tol=1e-2,
        note="DAN / FedKA domain alignment: 5 Gaussian bandwidths x2 apart, biased estimator, gradient w.r.t. x "
             "(tolerance 1e-2: the eager cdist, a Gram product on uncentred data, is 2e-3 off element-wise even in "
             "float64; ours in float64 equals the direct formula to 1e-14)",
    ))
    N = 4096
    out.append(Case(
        op="mmd2",
        label=f"Gaussian biased N=M={N} D=64 fp32",
        params={"N": N, "M": N, "D": 64},
        dtype=torch.float32,
        setup=_ksum_setup(N, N, 64),
        ours=_mmd_biased_ours,
        baselines={"eager": _mmd_biased_eager},
        peers={"geomloss": _mmd_biased_geomloss} if _has("geomloss") else {},
        cuda_peers=("geomloss",),
        bytes=2 * N * 64 * 4 * 3,
        flops=3 * (2 * N * N * 64 + 4 * N * N),
        devices=both,
        note="V-statistic; GeomLoss' SamplesLoss('gaussian') x2 (tensorized backend) as the peer",
    ))
    n = 2000
    out.append(Case(
        op="mmd_test",
        label=f"Gaussian N=M={n} D=64 {_PERMS} permutations fp32",
        params={"N": n, "M": n, "D": 64, "P": _PERMS},
        dtype=torch.float32,
        setup=_ksum_setup(n, n, 64),
        ours=_mmd_test_ours,
        baselines={"eager": _mmd_test_eager},
        bytes=2 * n * 64 * 4 + 2 * n * (_PERMS + 1) * 4,
        # K(z, z): the z·zᵀ products and the exp, then K @ W over the 1 + P weight columns
        flops=2 * (2 * n) ** 2 * 64 + 4 * (2 * n) ** 2 + 2 * (2 * n) ** 2 * (_PERMS + 1),
        devices=both,
        tol=1e-2,
        note="the statistic and the p-value over the same permutations (torch.randperm, seed 0); on CUDA K(z, z) @ W "
             "runs as K panels + cuBLAS GEMMs (C > 64 columns)",
    ))
    return out


# ---------------------------------------------------------------------------------------------
# Matmul modes of the CUDA tile kernels (distkern.precision): the same cases with ours on TF32 /
# 3xTF32 tensor cores, against the baselines under the matching torch setting (TF32 cuBLAS for
# "tf32", full float32 for "3xtf32", whose accuracy is float32's)
# ---------------------------------------------------------------------------------------------


def _under_mode(fn: Impl, mode: str | None, allow_tf32: bool) -> Impl:
    def run(i: Inputs):
        from ..precision import cuda_matmul

        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            with cuda_matmul(mode) if mode else contextlib.nullcontext():
                return fn(i)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    return run


def _mode_variant(case: Case, mode: str) -> Case:
    tf32 = mode == "tf32"
    wrap = {k: _under_mode(f, None, tf32) for k, f in case.baselines.items()}
    return dataclasses.replace(
        case,
        label=f"{case.label} {mode}",
        ours=_under_mode(case.ours, mode, tf32),
        baselines=wrap,
        peers={k: _under_mode(f, None, tf32) for k, f in case.peers.items()},
        devices=("cuda",),
        quick=False,
        acceptance=None,
        tol=max(case.tol or 0.0, 1e-2 if tf32 else tolerance(case.dtype)),
        matmul_ceiling="matmul_tf32" if tf32 else case.matmul_ceiling,
        note=(f"ours with distkern.cuda_matmul({mode!r}); baselines with allow_tf32={tf32}"
              + (f"; {case.note}" if case.note else "")),
    )


_MODE_VARIANTS = {
    "mahalanobis/N=1000000 D=256 fp32": ("tf32", "3xtf32"),
    "mahalanobis/N=1000000 D=512 fp32": ("tf32",),
    "mahalanobis_k/min tied N=100000 D=256 K=100 fp32": ("tf32",),
    "mahalanobis_pos/B=32 P=3136 D=550 x fp32 factors fp32": ("tf32", "3xtf32"),
    "nearest_cosine/N=100352 M=12544 D=512 fp32": ("tf32",),
    "kernel_matmul/gaussian x3 N=M=65536 D=64 fp32": ("tf32",),
    "kernel_matmul/gaussian x3 N=M=65536 D=512 fp32": ("tf32", "3xtf32"),
    "kernel_matmul/gaussian x3 N=M=65536 D=2048 fp32": ("tf32",),
    "anomaly_map/L=4 B=32 P=1369 D=768 K=30 fp32": ("tf32", "3xtf32"),
}


def _named(base: list[Case], names, what: str) -> dict[str, Case]:
    """The cases of ``base`` named in ``names``; a name that is not there (a renamed case) is an error."""
    by_name = {c.name: c for c in base}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise LookupError(f"bench: no case named {missing} to make {what} variants of")
    return {n: by_name[n] for n in names}


def _mode_cases(base: list[Case]) -> list[Case]:
    """The matmul-mode variants of the cases named in _MODE_VARIANTS, taken from ``base``."""
    cases = _named(base, _MODE_VARIANTS, "matmul-mode")
    return [_mode_variant(cases[name], m) for name, modes in _MODE_VARIANTS.items() for m in modes]


# The Mahalanobis family's FMA kernel with 8×8 thread tiles (128×128 blocks; DISTKERN_CUDA_TILES=128): on the
# H100 it was +10 % at D = 1024 and −11 % at D = 256 before the kernel read its fragments as 128-bit loads;
# with them, 8×8 issues 64 FMAs per 4 shared loads where 4×4 issues 16 per 2 (the H200 ran 4×4 at 37 % of
# the FP32 rate). These cases measure it again, against the automatic 4×4. (Not PaDiM at B = 32: its automatic
# tiles are 2×4 for the 32 rows, which 128-row tiles would mostly leave empty.)
_TILE_VARIANTS = (
    "mahalanobis/N=1000000 D=256 fp32",
    "mahalanobis/N=1000000 D=512 fp32",
    "mahalanobis/N=100000 D=1024 fp32",
    "mahalanobis_k/gmm full N=100000 D=256 K=32 fp32",
)


def _under_switch(fn: Impl, getter: str, setter: str, value) -> Impl:
    """``fn`` with the extension's switch ``_C.<setter>(value)`` on during the call and restored after it."""
    def run(i: Inputs):
        from .. import _C

        old = getattr(_C, getter)()
        getattr(_C, setter)(value)
        try:
            return fn(i)
        finally:
            getattr(_C, setter)(old)

    return run


def _under_tiles(fn: Impl, config: int) -> Impl:
    return _under_switch(fn, "cuda_tile_config", "set_cuda_tile_config", config)


def _switch_cases(base: list[Case], names, what: str, suffix: str, wrap: Callable[[Impl], Impl],
                  note: str) -> list[Case]:
    """CUDA-only variants ``"<label> <suffix>"`` of the cases of ``base`` named in ``names``, ours run under ``wrap``."""
    return [dataclasses.replace(c, label=f"{c.label} {suffix}", ours=wrap(c.ours), devices=("cuda",), quick=False,
                                acceptance=None, note=note + (f"; {c.note}" if c.note else ""))
            for c in _named(base, names, what).values()]


def _tile_cases(base: list[Case]) -> list[Case]:
    """The 8×8-tile variants of the cases named in _TILE_VARIANTS, taken from ``base``."""
    # the tile kernel's shapes: the single-Gaussian forward kept on it where the automatic schedule would take
    # the Gram panels (D >= 512)
    return _switch_cases(base, _TILE_VARIANTS, "8x8-tile", "tiles128",
                         lambda f: _under_schedule(_under_tiles(f, 2), "mahalanobis_schedule", 1),
                         "ours with 8x8 thread tiles (DISTKERN_CUDA_TILES=128)")


# prompt_align with the fused attention kernel (attention_kernel.cu, opt-in: DISTKERN_FUSED_ATTENTION=1) instead
# of the composite tile loop the default CUDA path runs: the H200 timed the composite at 0.40× / 0.47× eager
# (forward / forward + backward, B = 8); these cases measure the fused kernel beside it.
_FUSED_VARIANTS = (
    "prompt_align/fwd B=8 T=60 P=1369 D=768 H=4 fp32",
    "prompt_align/fwd+bwd B=8 T=60 P=1369 D=768 H=4 fp32",
    "prompt_align/fwd+bwd B=32 T=60 P=1369 D=768 H=4 fp32",
)


def _under_fused(fn: Impl) -> Impl:
    return _under_switch(fn, "fused_attention", "set_fused_attention", True)


def _fused_cases(base: list[Case]) -> list[Case]:
    """The fused-attention variants of the cases named in _FUSED_VARIANTS, taken from ``base``."""
    return _switch_cases(base, _FUSED_VARIANTS, "fused-attention", "fused", _under_fused,
                         "ours with the fused attention kernel (DISTKERN_FUSED_ATTENTION=1)")


# The CUDA schedules of kernel_matmul (distkern._C.set_kernel_sum_schedule), nearest_cosine
# (set_nearest_schedule) and the mahalanobis / mahalanobis_pos forwards (set_mahalanobis_schedule): from D = 256 / 128 / 512 on the
# automatic one lets cuBLAS form the products in bounded panels (Gram panels; TF32 tensor cores in the tf32
# mode), below it distkern's tile kernels fuse the products with what follows them. Neither side of either switch has run on a GPU yet:
# each case here forces the schedule the automatic one does not take at its D.
_SCHEDULE_VARIANTS = {  # (op's switch, suffix): (schedule, the cases it is forced on)
    ("kernel_sum_schedule", "gram"): (2, ("kernel_matmul/gaussian x3 N=M=65536 D=64 fp32",)),
    ("kernel_sum_schedule", "tiles"): (1, ("kernel_matmul/gaussian x3 N=M=65536 D=512 fp32",
                                           "kernel_matmul/gaussian x3 N=M=65536 D=512 fp32 tf32",
                                           "kernel_matmul/gaussian x3 N=M=65536 D=2048 fp32")),
    ("mahalanobis_schedule", "gram"): (2, ("mahalanobis/N=1000000 D=256 fp32",
                                           "mahalanobis_pos/B=32 P=3136 D=100 x fp32 factors fp32")),
    ("mahalanobis_schedule", "tiles"): (1, ("mahalanobis/N=1000000 D=512 fp32",
                                            "mahalanobis/N=1000000 D=512 bf16",
                                            "mahalanobis/N=1000000 D=512 fp32 tf32",
                                            "mahalanobis_pos/B=32 P=3136 D=550 x fp32 factors fp32",
                                            "mahalanobis_pos/B=32 P=3136 D=550 x fp32 factors fp32 tf32")),
    ("nearest_schedule", "tiles"): (1, ("nearest_cosine/N=100352 M=12544 D=512 fp32",
                                        "nearest_cosine/N=100352 M=12544 D=512 bf16")),
}


def _under_schedule(fn: Impl, switch: str, schedule: int) -> Impl:
    return _under_switch(fn, switch, f"set_{switch}", schedule)


def _schedule_cases(base: list[Case]) -> list[Case]:
    """The forced-schedule variants of the cases named in _SCHEDULE_VARIANTS."""
    return [c for (switch, suffix), (schedule, names) in _SCHEDULE_VARIANTS.items()
            for c in _switch_cases(base, names, switch.replace("_", " "), suffix,
                                   lambda f, w=switch, s=schedule: _under_schedule(f, w, s),
                                   f"ours with distkern._C.set_{switch}({schedule}) ({suffix} at every D)")]


def _diffusion_cases() -> list[Case]:
    from .diffusion_cases import diffusion_cases

    return diffusion_cases()


# ---------------------------------------------------------------------------------------------
# Whitening factors of P covariances (PaDiM's fit) vs anomalib's float32 inverse
# ---------------------------------------------------------------------------------------------


def _factors_setup(P: int, D: int):
    def setup(device: str | torch.device, dtype: torch.dtype, *, seed: int = 0) -> Inputs:
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(1_000_003 * (seed + 1) + 7919 * D + P)
        cov = torch.empty(P, D, D, dtype=torch.float64, device=device)
        for p0 in range(0, P, 256):  # 256 samples' covariances, + 0.01·I as PaDiM
            a = torch.randn(min(256, P - p0), D, 2 * D, generator=g, device=device, dtype=torch.float64)
            torch.bmm(a, a.transpose(1, 2), out=cov[p0:p0 + 256]).div_(2 * D)
        cov.diagonal(dim1=-2, dim2=-1).add_(0.01)
        u = torch.randn(P, D, generator=g, device=device, dtype=torch.float64)
        return {"cov": cov, "cov32": cov.float(), "u": u}

    return setup


def _probe(i: Inputs, prec_or_factor: torch.Tensor, factor: bool) -> torch.Tensor:
    # what the result is used for, cheaply (P·D² against ~D³ a matrix): u_pᵀ Σ_p⁻¹ u_p at every position
    u = i["u"].to(prec_or_factor.dtype)[:, None, :]
    if factor:
        return torch.bmm(u, prec_or_factor).square().sum(-1)[:, 0].double()
    return (torch.bmm(u, prec_or_factor)[:, 0] * u[:, 0]).sum(-1).double()


def _factors_ours(i: Inputs):
    # PaDiM's factors as GaussianStats.factor computes them: float64, returned in float32
    L, _ = torch.ops.distkern.whitening_factors(i["cov"], 0.0, False, torch.float32)
    return _probe(i, L, True)


def _factors_anomalib(i: Inputs):
    # anomalib's MultiVariateGaussian: torch.linalg.inv of the float32 covariances
    return _probe(i, torch.linalg.inv(i["cov32"]), False)


def _factors_torch64(i: Inputs):
    # the same factor in eager torch, float64: Cholesky of the reversed matrix, triangular solve, reversed back
    c = torch.linalg.cholesky(i["cov"].flip(-2, -1))
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device).expand_as(c)
    L = torch.linalg.solve_triangular(c, eye, upper=False).mT.flip(-2, -1).float()
    return _probe(i, L, True)


def _factors_cases() -> list[Case]:
    out = []
    for P, D, devs, quick, note in [(3136, 100, ("cpu", "cuda"), False, "resnet18 PaDiM: 3136 covariances"),
                                    (128, 550, ("cpu",), False, "WRN50 channels, 128 of the 3136 (CPU time budget)"),
                                    (3136, 550, ("cuda",), False, "WRN50 PaDiM: 7.6 GB of float64 covariances"),
                                    (64, 48, ("cpu", "cuda"), True, "")]:
        out.append(Case(
            op="whitening_factors",
            label=f"P={P} D={D} fp64 -> fp32",
            params={"P": P, "D": D},
            dtype=torch.float32,
            setup=_factors_setup(P, D),
            ours=_factors_ours,
            baselines={"anomalib": _factors_anomalib, "torch-fp64": _factors_torch64},
            bytes=P * D * D * (8 + 4),
            flops=P * 2 * D ** 3 // 3,  # Cholesky D³/3 + triangular inverse D³/3, in float64
            devices=devs,
            quick=quick,
            note=(note + "; " if note else "") + "float64 factors (FLOPs held against the fp32 matmul rate); "
                 "compared through u_pᵀ Σ_p⁻¹ u_p, anomalib's float32 inverse giving the reference",
        ))
    return out


def _align_cases() -> list[Case]:
    from .align_cases import align_cases

    return align_cases()


_FAMILIES = [_mahalanobis_cases, _mixture_cases, _positions_cases, _nearest_cases, _fit_cases, _factors_cases,
             _ksum_cases, _diffusion_cases, _align_cases]


def all_cases() -> list[Case]:
    """Every registered case, all devices and both suites: distkern's own, then those of the plugins'
    ``distkern.benchmarks`` hooks (:mod:`distkern.bench.hooks`)."""
    out: list[Case] = []
    for family in _FAMILIES:
        out += family()
    # the tensor-core variants after them: cases that have run on a GPU before come first in a time-limited run
    modes = _mode_cases(out)
    out += modes + _tile_cases(out) + _fused_cases(out) + _schedule_cases(out + modes)
    from .hooks import plugin_cases

    return out + plugin_cases()


def known_ops() -> list[str]:
    return sorted({c.op for c in all_cases()})


def cases_for(device: str, *, quick: bool = False, ops: list[str] | None = None,
              match: str | None = None) -> list[Case]:
    """The cases of one suite (full or quick) on one device kind, optionally filtered by op name and by a
    regular expression searched in the case name (``op/label``)."""
    kind = torch.device(device).type
    pattern = re.compile(match) if match else None
    return [
        c
        for c in all_cases()
        if kind in c.devices and c.quick == quick and (not ops or c.op in ops)
        and (pattern is None or pattern.search(c.name))
    ]
