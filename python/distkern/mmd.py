"""MMD² estimators, the median-heuristic bandwidth, an MMD loss module and a permutation test,
all on top of :func:`distkern.kernel_matmul` (no N×M matrix anywhere)."""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

from .ops._cpu import vector_cpu_math
from .ops.kernel_sum import KERNELS, kernel_matmul, kernel_params

__all__ = ["mmd2", "median_bandwidth", "MMDLoss", "mmd_test", "MMDTestResult", "permutation_weights", "kid"]

ESTIMATORS = ("biased", "unbiased", "ustat", "linear")


def _check_samples(op: str, x, y, names=("x", "y"), min_rows: int = 1) -> None:
    """Two floating (n, D) and (m, D) samples with one D and at least ``min_rows`` rows each."""
    for name, t in zip(names, (x, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {t.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must be (n, D) and (m, D) with one D; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{op}: {names[0]} is on {x.device} but {names[1]} is on {y.device}; the samples must be "
                         "on one device")
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(f"{op}: needs at least {min_rows} sample{'s' if min_rows > 1 else ''} on each side; got "
                         f"{x.shape[0]} and {y.shape[0]}")


def median_bandwidth(x: torch.Tensor, y: torch.Tensor | None = None, *, max_points: int = 1000, seed: int = 0) -> float:
    """Median heuristic: the median pairwise distance of (a random subsample of at most
    ``max_points`` of) the pooled samples, excluding zero self-distances."""
    z = x if y is None else torch.cat([x, y.to(x.dtype)])
    z = z.detach().to(torch.float64)
    if z.shape[0] > max_points:
        g = torch.Generator(device="cpu").manual_seed(seed)
        z = z[torch.randperm(z.shape[0], generator=g)[:max_points].to(z.device)]
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), 1, device=z.device)
    med = float(d[iu[0], iu[1]].median()) if iu.shape[1] else 1.0
    if math.isnan(med) or not bool(torch.isfinite(z).all()):
        raise ValueError("distkern.median_bandwidth: the samples hold inf or NaN values; no bandwidth from them")
    return med if med > 0 else 1.0


def mmd2(x: torch.Tensor, y: torch.Tensor, *, kernel: str = "gaussian", bandwidth=None, estimator: str = "unbiased",
         gamma: float | None = None, coef0: float = 1.0, degree: float = 3) -> torch.Tensor:
    r"""Squared maximum mean discrepancy between samples ``x (n, D)`` and ``y (m, D)``.

    Estimators: ``"biased"`` — the V-statistic ``K̄xx + K̄yy − 2K̄xy`` (GeomLoss' Gaussian
    ``SamplesLoss`` is half of it); ``"unbiased"`` — within-sample sums without their diagonals
    over ``n(n−1)`` and ``m(m−1)``, full cross term over ``nm`` (MMD-DDM, KID); ``"ustat"`` — the
    full U-statistic (``n = m``: also drops the paired cross terms ``k(x_i, y_i)``); ``"linear"``
    — the linear-time estimator over consecutive pairs. ``bandwidth=None`` with a bandwidth
    kernel uses :func:`median_bandwidth`. Differentiable in ``x`` and ``y``. Returns a 0-d
    float32 (float64 for float64 inputs) tensor. With ``kernel="distance"`` (k = r, not positive definite)
    the biased value is minus the energy distance ``2E|X−Y| − E|X−X′| − E|Y−Y′|``.

    Up to 512 samples a side the kernel matrices are formed densely (one fused estimator and
    backward); beyond, and for the Laplacian and distance kernels on CUDA or under torch.compile,
    through :func:`kernel_matmul`. Both take the distance of near-coincident pairs (shared rows)
    from the coordinates where the Laplacian and distance kernels need it, so they agree there.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"distkern.mmd2: estimator must be one of {ESTIMATORS}; got {estimator!r}")
    _check_samples("distkern.mmd2", x, y)
    if x.dtype != y.dtype:  # one working dtype on every path (the tiled path would mix precisions)
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)
    n, m = x.shape[0], y.shape[0]
    if kernel in ("gaussian", "laplacian", "imq") and bandwidth is None:
        bandwidth = median_bandwidth(x, y)
    kw = dict(bandwidth=bandwidth, gamma=gamma, coef0=coef0, degree=degree)
    if estimator == "linear":
        h = min(n, m) // 2
        if h < 1:
            raise ValueError("distkern.mmd2: the linear estimator needs at least 2 samples on each side")
        x1, x2, y1, y2 = x[0:2 * h:2], x[1:2 * h:2], y[0:2 * h:2], y[1:2 * h:2]
        def pairs(a, b):
            return _paired(a, b, kernel, kw)

        return (pairs(x1, x2) + pairs(y1, y2) - pairs(x1, y2) - pairs(x2, y1)).mean()
    if estimator != "biased" and (n < 2 or m < 2):
        raise ValueError(f"distkern.mmd2: the {estimator} estimator needs at least 2 samples on each side")
    if estimator == "ustat" and n != m:
        raise ValueError(f"distkern.mmd2: the full U-statistic needs n = m; got {n} and {m} (use 'unbiased')")
    dense = max(n, m) <= _DENSE_MAX
    if kernel in _REFINED:  # the near-pair refinement of the dense path: CPU, eager
        dense = dense and x.device.type == "cpu" and not torch.compiler.is_compiling()
    if dense:
        # Small batches (MMD-DDM trains with 64): the kernel matrices fit in cache; one fused
        # estimator with two GEMMs forward and one per sample backward (see _SmallMMD).
        params = kernel_params(kernel, x.shape[1], **kw, op="distkern.mmd2")[1]
        return _SmallMMD.apply(x, y, kernel, params, estimator)
    kxx = kernel_matmul(x, x, kernel=kernel, **kw).sum()
    kyy = kernel_matmul(y, y, kernel=kernel, **kw).sum()
    kxy = kernel_matmul(x, y, kernel=kernel, **kw).sum()
    if estimator == "biased":
        return kxx / (n * n) + kyy / (m * m) - 2 * kxy / (n * m)
    dx, dy = _paired(x, x, kernel, kw).sum(), _paired(y, y, kernel, kw).sum()  # k(x_i, x_i)
    if estimator == "unbiased":
        return (kxx - dx) / (n * (n - 1)) + (kyy - dy) / (m * (m - 1)) - 2 * kxy / (n * m)
    kxy_diag = _paired(x, y, kernel, kw).sum()
    return ((kxx - dx) + (kyy - dy) - 2 * (kxy - kxy_diag)) / (n * (n - 1))


_DENSE_MAX = 512  # largest batch for which mmd2 forms the kernel matrices densely
# Kernels whose square root shows the norm form's rounding at near-coincident pairs (r ~ √ε·‖x‖
# instead of 0): their dense path takes those pairs' distances from the coordinates. The Gaussian
# and IMQ kernels see the rounding of r² itself, harmless, and keep the dense path everywhere.
_REFINED = ("laplacian", "distance")


def _as_acc(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.to(acc), b.to(acc)


def _phi_and_grad(kernel: str, params: list[float], t: torch.Tensor, need_grad: bool):
    """The kernel in plain torch, with the op's conventions: φ and (when asked) dφ/dt elementwise,
    t = r² ≥ 0 (or x·y for the polynomial kernel); r and dφ/dt of the Laplacian and distance
    kernels are 0 at r = 0, also under autograd (no NaN at x = y)."""
    if kernel == "polynomial":
        g, c, d = params
        base = g * t + c
        return base ** d, (d * g * base ** (d - 1) if need_grad else None)
    big = torch.finfo(t.dtype).max  # a tiny σ's coefficient capped as the op caps it: k(x, x) = 1, not inf·0
    if kernel in ("distance", "laplacian"):
        pos = ~(t <= 0)  # NaN counts as positive: a NaN pair gives NaN, not k = 1 at r = 0
        r = torch.where(pos, t.clamp_min(1e-30).sqrt(), torch.zeros_like(t))
        if kernel == "distance":
            return r, (torch.where(pos, 0.5 / r.clamp_min(1e-30), torch.zeros_like(t)) if need_grad else None)
        val = grad = None
        for sgm in params:
            inv = min(1.0 / sgm, big)
            e = torch.exp(-r * inv)
            val = e if val is None else val + e
            if need_grad:
                gi = e * (-0.5 * inv) / r.clamp_min(1e-30)
                grad = gi if grad is None else grad + gi
        return val, (torch.where(pos, grad, torch.zeros_like(t)) if need_grad else None)
    val = grad = None
    for sgm in params:
        if kernel == "gaussian":
            c = min(0.5 / sgm / sgm, big)
            e = torch.exp(t * -c)
            gi = e * -c if need_grad else None
        else:  # imq
            c = min(1.0 / sgm / sgm, big)
            u = (1 + t * c).rsqrt()
            e, gi = u, (-0.5 * c) * u * u * u if need_grad else None
        val = e if val is None else val + e
        if need_grad:
            grad = gi if grad is None else grad + gi
    return val, grad


def _exact_near(t, a, b, sa, sb):
    """``t = ‖a_i − b_j‖²`` from the norm form, with the pairs that form does not resolve — below
    2⁻¹⁰(‖a_i‖² + ‖b_j‖²), the rule of kernel_matmul's needs_exact_r2 — recomputed from the
    coordinates (exactly 0 for duplicates across or within the samples). Out of place, so
    differentiable. Used for the kernels of ``_REFINED`` only; finding the pairs has a data-dependent
    shape (a host sync on CUDA, a graph break under torch.compile), so there mmd2 takes
    kernel_matmul's path instead, which refines in the kernel."""
    idx = (t < (sa[:, None] + sb[None, :]) * (1.0 / 1024)).nonzero()
    if idx.numel() == 0:
        return t
    i, j = idx[:, 0], idx[:, 1]
    return t.index_put((i, j), (a[i] - b[j]).square().sum(1))


_ESTIMATOR_ID = {"biased": 0, "unbiased": 1, "ustat": 2}
# Kernels whose small-sample estimator runs as one C++ pass on the CPU (dense_mmd) everywhere: those
# whose φ is a few multiplications. The others (exp, 1/√) take it where that pass evaluates φ on vector
# lanes (float32 work on a CPU with AVX-512F or AVX2+FMA, DISTKERN_CPU_GEMM not 0); elsewhere it would
# evaluate them pair by pair through libm, and the torch composition below, whose exp is vectorised, wins.
_FUSED_KERNELS = ("polynomial", "distance")


def _fused_cpu(x, kernel):
    """Whether mmd2's small path runs as distkern.dense_mmd: CPU, eager, float32/float64 work."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return kernel in _FUSED_KERNELS or (x.dtype != torch.float64 and vector_cpu_math() is not None)


def _dense_cpu(z):
    """Whether the small path's products go to distkern's dense ops: float32 CPU tensors outside grad
    mode (the ops have no autograd; under create_graph the plain products are differentiated)."""
    return z.dtype == torch.float32 and z.device.type == "cpu" and not torch.is_grad_enabled()


def _small_mmd(x, y, kernel, params, estimator, need_x, need_y):
    """MMD² of small samples from their kernel matrices: ``x·[x; y]ᵀ`` and ``y·yᵀ`` (two GEMMs;
    distances from centred data, clamped, exact-zero self-distances), the estimator's weights with
    the diagonals masked (not subtracted). Returns the value, ``z = [x; y]`` (centred) and, for the
    samples that need a gradient, the weighted kernel derivatives ``B`` of each block. Plain
    out-of-place torch: differentiable when called under grad mode (the double-backward path)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m = x.shape[0], y.shape[0]
    xa, ya = x.to(acc), y.to(acc)
    dot = kernel == "polynomial"
    if not dot:  # translation-invariant: centre on y's mean for accurate distances
        c = ya.mean(0).detach()
        xa, ya = xa - c, ya - c
    z = torch.cat([xa, ya])
    if _dense_cpu(z):  # one symmetric product (the upper triangle) on distkern's AVX-512 kernel
        g = torch.ops.distkern.dense_gram(z)
        gx, gyy = g[:n], g[n:, n:]
    else:
        gx = xa @ z.T  # (n, n + m): [x·xᵀ | x·yᵀ]
        gyy = ya @ ya.T
    eye_n = torch.eye(n, dtype=torch.bool, device=x.device)
    eye_m = torch.eye(m, dtype=torch.bool, device=x.device)
    if dot:
        tx, tyy = gx, gyy
    else:
        sx, sy = (xa * xa).sum(1), (ya * ya).sum(1)
        zero = torch.zeros((), dtype=acc, device=x.device)
        diag_x = torch.cat([eye_n, torch.zeros(n, m, dtype=torch.bool, device=x.device)], 1)
        # |x_i − x_i|² is 0, not its rounding
        sz = torch.cat([sx, sy])
        tx = torch.where(diag_x, zero, (sx[:, None] + sz[None, :] - 2 * gx).clamp_min(0))
        tyy = torch.where(eye_m, zero, (sy[:, None] + sy[None, :] - 2 * gyy).clamp_min(0))
        if kernel in _REFINED:  # other near-coincident pairs from the coordinates, as kernel_matmul
            tx = _exact_near(tx, xa, z, sx, sz)
            tyy = _exact_near(tyy, ya, ya, sy, sy)
    kx, dkx = _phi_and_grad(kernel, params, tx, need_x or need_y)
    kyy, dkyy = _phi_and_grad(kernel, params, tyy, need_y)
    if estimator == "biased":
        wxx, wyy, wxy = 1.0 / (n * n), 1.0 / (m * m), -2.0 / (n * m)
        mxx = mxy = myy = None
    else:
        wxx, wyy = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1))
        wxy = -2.0 / (n * m) if estimator == "unbiased" else -2.0 / (n * (n - 1))
        mxx, myy = eye_n, eye_m
        mxy = eye_n if estimator == "ustat" else None

    def masked(t, mask):
        return t if mask is None else t.masked_fill(mask, 0)

    out = (wxx * masked(kx[:, :n], mxx).sum() + wyy * masked(kyy, myy).sum()
           + wxy * masked(kx[:, n:], mxy).sum())
    bxx = bxy = byy = None
    if need_x or need_y:
        # B = weight ⊙ dφ/dt per block; a within-sample block counts each pair twice (i, j and j, i)
        bxx = masked((2 * wxx) * dkx[:, :n], mxx)
        bxy = masked(wxy * dkx[:, n:], mxy)
        if need_y:
            byy = masked((2 * wyy) * dkyy, myy)
    return out, z, bxx, bxy, byy


class _SmallMMD(torch.autograd.Function):
    """:func:`_small_mmd` with a fused backward: one GEMM per sample that needs a gradient,
    ``B·[x; y]`` (eager autograd needs two per Gram product). A backward under ``create_graph``
    differentiates a recomputation of :func:`_small_mmd` instead, so higher derivatives (MMD-GAN's
    gradient penalty) are exact. Float32 (float64 for float64) throughout."""

    @staticmethod
    def forward(ctx, x, y, kernel, params, estimator):
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.args = (kernel, params, estimator)
        ctx.dot, ctx.n, ctx.dtypes = kernel == "polynomial", x.shape[0], (x.dtype, y.dtype)
        ctx.fused = _fused_cpu(x, kernel)
        if ctx.fused:  # the whole estimator in one C++ pass (csrc/kernel_sum/dense.cpp)
            out, b, xc, yc = torch.ops.distkern.dense_mmd(x, y, KERNELS[kernel], params, _ESTIMATOR_ID[estimator],
                                                          need_x, need_y)
            if need_x or need_y:  # xc, yc: the centred samples (distance kernels), else empty
                ctx.save_for_backward(x, y, b, xc, yc)
            return out
        out, z, bxx, bxy, byy = _small_mmd(x, y, kernel, params, estimator, need_x, need_y)
        if need_x or need_y:
            ctx.save_for_backward(x, y, z, bxx, bxy, byy)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, *bs = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            with torch.enable_grad():
                val = _small_mmd(x, y, *ctx.args, False, False)[0]
                wrt = [t for t, need in ((x, need_x), (y, need_y)) if need]
                grads = iter(torch.autograd.grad(val, wrt, g, create_graph=True))
            return (next(grads) if need_x else None), (next(grads) if need_y else None), None, None, None
        n = ctx.n
        if ctx.fused:  # B holds x's rows and/or y's: one product for both, g folded into B (linear in it)
            b, xc, yc = bs
            zx, zy = (x, y) if ctx.dot else (xc, yc)  # the polynomial kernel is not centred
            gz = torch.ops.distkern.dense_mmd_grad(g * b, zx, zy, 0 if need_x else n, ctx.dot)
            gx = gz[:n].to(ctx.dtypes[0]) if need_x else None
            gy = gz[n if need_x else 0:].to(ctx.dtypes[1]) if need_y else None
            return gx, gy, None, None, None
        z, bxx, bxy, byy = bs
        gx = gy = None

        def grad_rows(b, rows):  # (b·z)ᵀ through zᵀ·bᵀ: MKL is faster with the long axis outermost
            bz = torch.ops.distkern.dense_mm(b, z) if _dense_cpu(z) else (z.T @ b.T).T
            if ctx.dot:
                return bz
            return 2 * (b.sum(1, keepdim=True) * rows - bz)

        if need_x:
            gx = (g * grad_rows(torch.cat([bxx, bxy], 1), z[:n])).to(ctx.dtypes[0])
        if need_y:
            gy = (g * grad_rows(torch.cat([bxy.T, byy], 1), z[n:])).to(ctx.dtypes[1])
        return gx, gy, None, None, None


def _paired(a: torch.Tensor, b: torch.Tensor, kernel: str, kw: dict) -> torch.Tensor:
    """k(a_i, b_i) for each row i, in plain torch (O(n·D))."""
    a, b = _as_acc(a, b)
    params = kernel_params(kernel, a.shape[1], **kw, op="distkern.mmd2")[1]
    t = (a * b).sum(1) if kernel == "polynomial" else ((a - b) ** 2).sum(1)
    return _phi_and_grad(kernel, params, t, False)[0]


class MMDLoss(torch.nn.Module):
    """``mmd2(x, y, ...)`` as a loss module (a scalar, differentiable in both samples).

    ``MMDLoss(kernel="polynomial", estimator="unbiased")`` is the MMD-DDM / KID objective;
    ``MMDLoss(bandwidth=[1, 2, 4, 8, 16])`` the multi-kernel Gaussian MMD of MMD-GAN / DAN."""

    def __init__(self, kernel: str = "gaussian", bandwidth=None, estimator: str = "unbiased", **kernel_kwargs):
        super().__init__()
        self.kernel, self.bandwidth, self.estimator, self.kernel_kwargs = kernel, bandwidth, estimator, kernel_kwargs
        kernel_params(kernel, 1, bandwidth if bandwidth is not None else 1.0, **kernel_kwargs, op="MMDLoss")  # early
        if estimator not in ESTIMATORS:
            raise ValueError(f"MMDLoss: estimator must be one of {ESTIMATORS}; got {estimator!r}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mmd2(x, y, kernel=self.kernel, bandwidth=self.bandwidth, estimator=self.estimator, **self.kernel_kwargs)


class MMDTestResult(NamedTuple):
    statistic: float
    p_value: float
    permutations: int


def mmd_test(x: torch.Tensor, y: torch.Tensor, *, permutations: int = 1000, seed: int = 0, kernel: str = "gaussian",
             bandwidth=None, **kernel_kwargs) -> MMDTestResult:
    """Permutation two-sample test on the biased MMD², all permutations in one fused pass.

    With z = [x; y] and, per permutation, weights w (+1/n on the relabelled x side, −1/m on the
    y side), MMD²_biased = wᵀ K(z, z) w; ``K(z, z) @ W`` for the (n+m)×P weight matrix is one
    :func:`kernel_matmul` call. p-value = (1 + #{perm ≥ observed}) / (1 + P)."""
    if permutations < 1:
        raise ValueError(f"distkern.mmd_test: permutations must be >= 1; got {permutations}")
    _check_samples("distkern.mmd_test", x, y)
    n, m = x.shape[0], y.shape[0]
    z = torch.cat([x, y.to(x.dtype)]).detach()
    if kernel in ("gaussian", "laplacian", "imq") and bandwidth is None:
        bandwidth = median_bandwidth(x, y)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    # K(z, z) @ W for as many of the 1 + P weight columns at a time as keep W, K·W and their product
    # within _MMD_TEST_BYTES (all of them up to (n + m)·(1 + P) ≈ 22M; on CUDA K in bounded panels,
    # each followed by one GEMM): memory O(n + m), not O((n + m)·P), for large samples
    cols = max(1, _MMD_TEST_BYTES // (3 * (n + m) * torch.finfo(acc).bits // 8))
    stats = torch.cat([(W * kernel_matmul(z, z, W, kernel=kernel, bandwidth=bandwidth, **kernel_kwargs)).sum(0)
                       for W in _weight_chunks(n, m, permutations, seed, cols, z.device, acc)])
    observed = float(stats[0])
    # a NaN statistic (non-finite data) ranks below nothing: its p-value is NaN, not the smallest one
    p = math.nan if math.isnan(observed) else (1 + int((stats[1:] >= observed).sum())) / (1 + permutations)
    return MMDTestResult(observed, p, permutations)


_MMD_TEST_BYTES = 256 << 20  # mmd_test's working set for the weight columns


def permutation_weights(n: int, m: int, permutations: int, seed: int = 0, *, device=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(n + m, 1 + permutations)`` weights of :func:`mmd_test`: column 0 the observed split
    (+1/n on the first n rows, −1/m on the rest), then one column per relabelling drawn with
    ``torch.randperm`` from a CPU generator seeded with ``seed`` (so the same on every device)."""
    return torch.cat(list(_weight_chunks(n, m, permutations, seed, permutations + 1, device, dtype)), 1)


def _weight_chunks(n: int, m: int, permutations: int, seed: int, cols: int, device, dtype):
    """:func:`permutation_weights` ``cols`` columns at a time (the same draws in the same order)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.cat([torch.ones(n), torch.zeros(m)])
    columns = itertools.chain([labels], (labels[torch.randperm(n + m, generator=g)] for _ in range(permutations)))
    while chunk := list(itertools.islice(columns, cols)):
        L = torch.stack(chunk, 1).to(device=device, dtype=dtype)  # 1 = x side
        yield L / n - (1 - L) / m


def kid(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, degree: float = 3,
        gamma: float | None = None, coef: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel Inception Distance on given features, as torchmetrics' ``KernelInceptionDistance``
    computes it: over ``subsets`` random subsets of ``subset_size`` real and fake features, the
    unbiased MMD² with the polynomial kernel ``(γ x·y + coef)^degree`` (γ = 1/D by default);
    returns ``(mean, std)`` (population std, as torchmetrics). The subsets are drawn with
    ``torch.randperm`` in torchmetrics' order (real, then fake, per subset) from ``generator``
    (``None``: torch's global generator, so after the same ``torch.manual_seed`` both give the
    same subsets and the same numbers)."""
    _check_samples("distkern.kid", real, fake, ("real", "fake"), 2)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"distkern.kid: subsets must be >= 1 and subset_size >= 2; got {subsets} and {subset_size}")
    if real.shape[0] < subset_size or fake.shape[0] < subset_size:
        raise ValueError(f"distkern.kid: subset_size ({subset_size}) must not exceed the number of real ({real.shape[0]}) "
                         f"or fake ({fake.shape[0]}) samples")
    scores = []
    for _ in range(subsets):
        fr = real[torch.randperm(real.shape[0], generator=generator)[:subset_size].to(real.device)]
        ff = fake[torch.randperm(fake.shape[0], generator=generator)[:subset_size].to(fake.device)]
        scores.append(mmd2(fr, ff, kernel="polynomial", estimator="unbiased", gamma=gamma, coef0=coef, degree=degree))
    s = torch.stack(scores)
    return s.mean(), s.std(unbiased=False)
