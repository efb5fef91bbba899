"""distkern.kernel_matmul and the MMD estimators against dense float64 references."""

import numpy as np
import pytest
import torch

import distkern
from distkern.ops.kernel_sum import kernel_matmul
from cuda_refs import cuda_schedule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
KERNELS = [("gaussian", dict(bandwidth=[0.7, 2.0])), ("laplacian", dict(bandwidth=1.3)), ("imq", dict(bandwidth=[1.0, 3.0])),
           ("polynomial", dict()), ("distance", dict())]


def dense_kernel(x, y, kernel, kw, exact=False):
    """k(x, y) in float64; exact: distances from the coordinates (cdist without its GEMM form: exactly 0
    at x = y, with a zero gradient there)."""
    x, y = x.double(), y.double()
    r = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") if exact else torch.cdist(x, y)
    if kernel == "polynomial":
        return (x @ y.T / x.shape[1] + 1.0) ** 3
    if kernel == "distance":
        return r
    bw = kw["bandwidth"] if isinstance(kw["bandwidth"], list) else [kw["bandwidth"]]
    f = {"gaussian": lambda s: torch.exp(-r ** 2 / (2 * s * s)), "laplacian": lambda s: torch.exp(-r / s),
         "imq": lambda s: (1 + r ** 2 / (s * s)).rsqrt()}[kernel]
    return sum(f(s) for s in bw)


def rel(a, b):
    return float((a.double().cpu() - b.cpu()).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,kw", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,M,D,C", [(1, 1, 1, 1), (7, 130, 3, 2), (300, 257, 33, 5), (600, 1100, 8, 1)])
def test_matches_dense(device, kernel, kw, dtype, N, M, D, C, rng):
    if device == "cuda" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64 inputs are not supported on CUDA"):
            kernel_matmul(torch.zeros(2, D, device=device, dtype=dtype), torch.zeros(3, D, device=device, dtype=dtype), kernel=kernel, **kw)
        return
    x = torch.randn(N, D, generator=rng).to(device, dtype)
    y = (torch.randn(M, D, generator=rng) + 0.5).to(device, dtype)
    v = torch.randn(M, C, generator=rng, dtype=torch.float64).to(device)
    K = dense_kernel(x, y, kernel, kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    out = kernel_matmul(x, y, v.to(dtype if dtype == torch.float64 else torch.float32), kernel=kernel, **kw)
    assert out.shape == (N, C)
    assert rel(out, K @ v.to(out.dtype).double()) < tol
    rows = kernel_matmul(x, y, kernel=kernel, **kw)
    assert rows.shape == (N,) and rel(rows, K.sum(1)) < tol


@pytest.mark.parametrize("device", ["cpu"])  # CUDA runs float32 only: see test_cuda_backward_matches_cpu
@pytest.mark.parametrize("kernel,kw", KERNELS)
def test_gradcheck(device, kernel, kw, rng):
    x = torch.randn(9, 4, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(11, 4, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(11, 2, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: kernel_matmul(a, b, c, kernel=kernel, **kw), (x, y, v))
    assert torch.autograd.gradcheck(lambda a, b: kernel_matmul(a, b, kernel=kernel, **kw), (x, y))


@pytest.mark.parametrize("kernel", ["laplacian", "distance"])
def test_no_nan_gradient_at_zero_distance(kernel):
    x = torch.randn(5, 3, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    kw = {"bandwidth": 1.0} if kernel == "laplacian" else {}
    kernel_matmul(xs, x, kernel=kernel, **kw).sum().backward()  # x_i = y_i for every i
    assert torch.isfinite(xs.grad).all()


def test_opcheck(rng):
    x, y, v = torch.randn(20, 6, generator=rng), torch.randn(30, 6, generator=rng), torch.randn(30, 2, generator=rng)
    torch.library.opcheck(torch.ops.distkern.kernel_matmul.default, (x, y, v, 0, [1.0, 2.0]))
    torch.library.opcheck(torch.ops.distkern.kernel_matmul.default, (x, y, None, 3, [1 / 6, 1.0, 3.0]))


def test_mmd_estimators(rng):
    x = torch.randn(60, 5, generator=rng, dtype=torch.float64)
    y = torch.randn(45, 5, generator=rng, dtype=torch.float64) + 0.4
    s = 1.7
    K = lambda a, b: dense_kernel(a, b, "gaussian", {"bandwidth": s})  # noqa: E731
    Kxx, Kyy, Kxy = K(x, x), K(y, y), K(x, y)
    n, m = 60, 45
    assert float(distkern.mmd2(x, y, bandwidth=s, estimator="biased")) == pytest.approx(float(Kxx.mean() + Kyy.mean() - 2 * Kxy.mean()), rel=1e-10)
    unb = (Kxx.sum() - n) / (n * (n - 1)) + (Kyy.sum() - m) / (m * (m - 1)) - 2 * Kxy.mean()
    assert float(distkern.mmd2(x, y, bandwidth=s)) == pytest.approx(float(unb), rel=1e-10)
    y2 = y[:45]
    x2 = x[:45]
    Kxx2, Kxy2 = K(x2, x2), K(x2, y2)
    ust = ((Kxx2.sum() - 45) + (Kyy.sum() - 45) - 2 * (Kxy2.sum() - Kxy2.diagonal().sum())) / (45 * 44)
    assert float(distkern.mmd2(x2, y2, bandwidth=s, estimator="ustat")) == pytest.approx(float(ust), rel=1e-10)
    h = 22
    lin = torch.stack([K(x[2 * i:2 * i + 1], x[2 * i + 1:2 * i + 2])[0, 0] + K(y[2 * i:2 * i + 1], y[2 * i + 1:2 * i + 2])[0, 0]
                       - K(x[2 * i:2 * i + 1], y[2 * i + 1:2 * i + 2])[0, 0] - K(x[2 * i + 1:2 * i + 2], y[2 * i:2 * i + 1])[0, 0]
                       for i in range(h)]).mean()
    assert float(distkern.mmd2(x, y, bandwidth=s, estimator="linear")) == pytest.approx(float(lin), rel=1e-10)
    # the KID form: polynomial kernel, unbiased
    Kp = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    kid = (Kp(x, x).sum() - Kp(x, x).diagonal().sum()) / (n * (n - 1)) + (Kp(y, y).sum() - Kp(y, y).diagonal().sum()) / (m * (m - 1)) - 2 * Kp(x, y).mean()
    assert float(distkern.mmd2(x, y, kernel="polynomial")) == pytest.approx(float(kid), rel=1e-10)


def test_mmd_loss_gradient_and_median(rng):
    x = torch.randn(40, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.randn(50, 3, generator=rng, dtype=torch.float64) + 1.0
    loss = distkern.MMDLoss(bandwidth=[0.5, 1.0, 2.0, 4.0])
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x,))
    med = distkern.median_bandwidth(x.detach(), y)
    z = torch.cat([x.detach(), y])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(90, 90, 1)
    assert med == pytest.approx(float(d[iu[0], iu[1]].median()))


def test_permutation_test_calibrated():
    g = torch.Generator().manual_seed(0)
    rejections = 0
    trials = 120
    for t in range(trials):
        x, y = torch.randn(25, 2, generator=g), torch.randn(25, 2, generator=g)
        rejections += distkern.mmd_test(x, y, permutations=99, seed=t, bandwidth=1.0).p_value <= 0.1
    assert 0.03 <= rejections / trials <= 0.2  # nominal 0.1 under H0
    x, y = torch.randn(60, 2, generator=g), torch.randn(60, 2, generator=g) + 1.0
    assert distkern.mmd_test(x, y, permutations=199, bandwidth=1.0).p_value <= 0.01


def test_mmd_test_in_chunks_of_permutations(monkeypatch):
    """Large samples: the weight columns go through kernel_matmul a memory-bounded chunk at a time, the
    same permutations in the same order — the statistic and p-value of one pass."""
    import distkern.mmd as mmd

    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(60, 5, generator=g), torch.randn(50, 5, generator=g) + 0.15
    whole = distkern.mmd_test(x, y, permutations=299, seed=3, bandwidth=1.5)
    W = mmd.permutation_weights(60, 50, 299, 3)
    assert W.shape == (110, 300) and torch.allclose(W.sum(0), torch.zeros(300), atol=1e-6)
    for cols in (1, 7, 64, 300):  # budget for `cols` columns of 110 rows (W, K·W, their product)
        monkeypatch.setattr(mmd, "_MMD_TEST_BYTES", 3 * 110 * 4 * cols)
        assert torch.equal(torch.cat(list(mmd._weight_chunks(60, 50, 299, 3, cols, "cpu", torch.float32)), 1), W)
        part = distkern.mmd_test(x, y, permutations=299, seed=3, bandwidth=1.5)
        assert part.p_value == whole.p_value and part.statistic == pytest.approx(whole.statistic, rel=1e-6)


def test_bad_inputs():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="y must be \\(M, D\\) with D = 3"):
        kernel_matmul(x, torch.randn(4, 2), bandwidth=1.0)
    with pytest.raises(ValueError, match="bandwidths must be finite and > 0"):
        kernel_matmul(x, y, bandwidth=[1.0, -2.0])
    with pytest.raises(ValueError, match="needs bandwidth="):
        kernel_matmul(x, y)
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernel_matmul(x, y, kernel="rbf", bandwidth=1.0)
    with pytest.raises(ValueError, match="v must be \\(M, C\\) with M = 4"):
        kernel_matmul(x, y, torch.randn(5, 2), bandwidth=1.0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        distkern.mmd2(x, y, estimator="nope")
    with pytest.raises(TypeError, match="x must be float32"):
        kernel_matmul(x.long(), y, bandwidth=1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel,kw", KERNELS)
@pytest.mark.parametrize("D", [9, 40])  # the backward's v has C·D columns: fused at 27, K panels at 120
def test_cuda_backward_matches_cpu(kernel, kw, D):
    g = torch.Generator().manual_seed(7)
    x, y, v = torch.randn(70, D, generator=g), torch.randn(130, D, generator=g), torch.randn(130, 3, generator=g)
    grads = []
    # float64 on the CPU, then float32 on the GPU; each from fresh leaves (a .to() of a tensor that already
    # requires grad is not a leaf: its .grad would stay None)
    for dev, dt in (("cpu", torch.float64), ("cuda", torch.float32)):
        xs, ys, vs = (t.detach().to(device=dev, dtype=dt).requires_grad_() for t in (x, y, v))
        kernel_matmul(xs, ys, vs, kernel=kernel, **kw).square().sum().backward()
        grads.append([t.grad.cpu() for t in (xs, ys, vs)])
    for ref, got in zip(*grads):
        assert rel(got, ref) < 2e-5  # the CPU's float32 gradients are 1e-7..1e-6 off float64 here


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", [1, 2])  # tiles / Gram panels (cuBLAS x·y, then φ in place) at every D
@pytest.mark.parametrize("kernel,kw", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,M,D,C", [(1, 1, 300, 1), (2100, 9000, 260, 3), (70, 130, 9, 70)])
def test_cuda_schedules_match_dense(schedule, kernel, kw, dtype, N, M, D, C, rng):
    """Both CUDA schedules of kernel_matmul against float64, whatever D the automatic one would pick for:
    several row and column panels (2100 > 2048 rows, 9000 > 8192 columns), v = None, near pairs."""
    x = torch.randn(N, D, generator=rng)
    y = torch.randn(M, D, generator=rng) + 0.1
    y[: min(N, M) // 2] = x[: min(N, M) // 2]  # coincident pairs: r² from the coordinates
    v = torch.randn(M, C, generator=rng, dtype=torch.float64)
    x, y, v = x.to(dtype).cuda(), y.to(dtype).cuda(), v.cuda()
    # the reference in float64 on the GPU, its gradient 0 at x = y as ours; the gradient in blocks of 64 rows
    # (the loss is a sum over rows): cdist's exact backward allocates N × M × D, 39 GB here in one piece
    with torch.no_grad():
        Kv = dense_kernel(x.double(), y, kernel, kw, exact=True) @ v
    xd_grad = []
    for xb in x.split(64):
        xd = xb.double().requires_grad_()
        (dense_kernel(xd, y, kernel, kw, exact=True) @ v).square().sum().backward()
        xd_grad.append(xd.grad)
    xd_grad = torch.cat(xd_grad)
    with cuda_schedule("kernel_sum", schedule):
        out = kernel_matmul(x, y, v.float(), kernel=kernel, **kw)
        rows = kernel_matmul(x, y, kernel=kernel, **kw)
        xs = x.float().requires_grad_()
        kernel_matmul(xs, y, v.float(), kernel=kernel, **kw).square().sum().backward()
    with torch.no_grad():
        assert rel(out, Kv) < 2e-5 and rel(rows, dense_kernel(x, y, kernel, kw, exact=True).sum(1)) < 2e-5
    assert rel(xs.grad, xd_grad) < 1e-4
    with pytest.raises(ValueError, match="set_kernel_sum_schedule"):
        distkern._C.set_kernel_sum_schedule(3)


@pytest.mark.cuda
def test_cuda_sanitizer_case_kernel_sum():
    g = torch.Generator().manual_seed(4)
    for N, M, D, C in [(1, 1, 1, 1), (67, 130, 33, 70), (130, 65, 5, 1)]:
        x, y = torch.randn(N, D, generator=g).cuda(), torch.randn(M, D, generator=g).cuda()
        v = torch.randn(M, C, generator=g).cuda()
        for kernel, kw in KERNELS:
            out = kernel_matmul(x.to(torch.bfloat16), y, v, kernel=kernel, **kw)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("subset_size", [50, 600])  # dense small-batch path and the tiled op
def test_kid_matches_torchmetrics(subset_size):
    kid_mod = pytest.importorskip("torchmetrics.image.kid")

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    real = torch.randn(700, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(650, 16, generator=g, dtype=torch.float64) * 1.1 + 0.2
    with pytest.warns(UserWarning):
        metric = kid_mod.KernelInceptionDistance(feature=Identity(), subsets=4, subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)
    ref_mean, ref_std = metric.compute()
    torch.manual_seed(11)
    mean, std = distkern.kid(real, fake, subsets=4, subset_size=subset_size)
    assert float(mean) == pytest.approx(float(ref_mean), rel=1e-9)
    assert float(std) == pytest.approx(float(ref_std), rel=1e-6)


_SHARD_WORKER = """
import sys, torch, torch.distributed as dist
import distkern
rank, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
g = torch.Generator().manual_seed(0)
x, y, v = torch.randn(50, 6, generator=g), torch.randn(90, 6, generator=g), torch.randn(90, 2, generator=g)
lo, hi = (0, 70) if rank == 0 else (70, 90)   # uneven shards of y
out = distkern.distributed.kernel_matmul(x, y[lo:hi], v[lo:hi], kernel="gaussian", bandwidth=[1.0, 2.0])
# gradients: the same loss of the result on every rank; a third call where rank 1 holds no rows
w = torch.randn(50, 2, generator=g)
xg, yg, vg = x.clone().requires_grad_(), y[lo:hi].clone().requires_grad_(), v[lo:hi].clone().requires_grad_()
res = distkern.distributed.kernel_matmul(xg, yg, vg, kernel="laplacian", bandwidth=2.0)
(res * w).sum().backward()
lo2, hi2 = (0, 90) if rank == 0 else (90, 90)
xe = x.clone().requires_grad_()
(distkern.distributed.kernel_matmul(xe, y[lo2:hi2], v[lo2:hi2], kernel="imq", bandwidth=1.5) * w).sum().backward()
torch.save({"out": out, "res": res.detach(), "x": xg.grad, "y": yg.grad, "v": vg.grad, "x_empty": xe.grad},
           f"{path}.{rank}")
dist.destroy_process_group()
"""


def test_sharded_y_two_gloo_processes(tmp_path, gloo_run):
    """y split 70 / 20 (and 90 / 0) over two ranks: the one-process result on both, and its gradients — x's
    (all-reduced in the backward) on both ranks, each rank's own rows of y's and v's."""
    gloo_run(_SHARD_WORKER, str(tmp_path / "out"))
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    for k in ("out", "res", "x", "x_empty"):
        assert torch.equal(r0[k], r1[k]), k
    g = torch.Generator().manual_seed(0)
    x, y, v = torch.randn(50, 6, generator=g), torch.randn(90, 6, generator=g), torch.randn(90, 2, generator=g)
    single = kernel_matmul(x, y, v, kernel="gaussian", bandwidth=[1.0, 2.0])
    # float32 rounding of sums with cancellation: relative to Σ_j K_ij·|v_j|, not to the sum itself
    scale = kernel_matmul(x, y, v.abs(), kernel="gaussian", bandwidth=[1.0, 2.0])
    assert ((r0["out"] - single).abs() <= 1e-5 * scale).all()
    w = torch.randn(50, 2, generator=g)
    xs, ys, vs = (t.double().requires_grad_() for t in (x, y, v))
    res = kernel_matmul(xs, ys, vs, kernel="laplacian", bandwidth=2.0)
    (res * w.double()).sum().backward()
    torch.testing.assert_close(r0["res"].double(), res.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["x"].double(), xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]).double(), ys.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["v"], r1["v"]]).double(), vs.grad, rtol=1e-4, atol=1e-5)
    xe = x.double().requires_grad_()
    (kernel_matmul(xe, y.double(), v.double(), kernel="imq", bandwidth=1.5) * w.double()).sum().backward()
    torch.testing.assert_close(r0["x_empty"].double(), xe.grad, rtol=1e-4, atol=1e-5)


def test_distributed_needs_init():
    with pytest.raises(RuntimeError, match="not initialised"):
        distkern.distributed.kernel_matmul(torch.randn(3, 2), torch.randn(4, 2), bandwidth=1.0)


@pytest.mark.parametrize("n,m", [(300, 200), (700, 650)])  # dense small-batch path and the tiled op
def test_mmd2_biased_matches_geomloss(n, m):
    # GeomLoss' Gaussian SamplesLoss (kernel exp(-|x-y|²/(2σ²)), uniform weights) is half the biased MMD²
    geomloss = pytest.importorskip("geomloss")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(m, 5, generator=g, dtype=torch.float64) * 1.3 + 0.4).requires_grad_()
    blur = 0.8
    ours = distkern.mmd2(x, y, kernel="gaussian", bandwidth=blur, estimator="biased")
    peer = 2 * geomloss.SamplesLoss("gaussian", blur=blur, backend="tensorized")(x, y)
    assert abs(float(ours) - float(peer)) < 1e-10 * max(1.0, abs(float(peer)))
    gx, gy = torch.autograd.grad(ours, (x, y))
    px, py = torch.autograd.grad(peer, (x, y))
    assert (gx - px).abs().max() < 1e-10 and (gy - py).abs().max() < 1e-10


_MMD_SHARD_WORKER = """
import sys, json, torch, torch.distributed as dist
import distkern
rank, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 4, generator=g, dtype=torch.float64)
y = torch.randn(29, 4, generator=g, dtype=torch.float64) * 1.2 + 0.3
xs = (0, 30) if rank == 0 else (30, 37)   # uneven shards; rank 1 holds no y rows
ys = (0, 29) if rank == 0 else (29, 29)
out = {}
for name, kw in [("gauss", dict(kernel="gaussian", bandwidth=[0.7, 1.5])), ("poly", dict(kernel="polynomial"))]:
    for est in ("biased", "unbiased"):
        xl = x[xs[0]:xs[1]].clone().requires_grad_()
        yl = y[ys[0]:ys[1]].clone().requires_grad_()
        v = distkern.distributed.mmd2(xl, yl, estimator=est, **kw)
        v.backward()
        out[f"{name}-{est}"] = (float(v), xl.grad, yl.grad)
torch.save(out, f"{path}.{rank}")
dist.destroy_process_group()
"""


def test_sharded_mmd2_two_gloo_processes(tmp_path, gloo_run):
    gloo_run(_MMD_SHARD_WORKER, str(tmp_path / "mmd"))
    r0, r1 = (torch.load(tmp_path / f"mmd.{r}") for r in range(2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 4, generator=g, dtype=torch.float64)
    y = torch.randn(29, 4, generator=g, dtype=torch.float64) * 1.2 + 0.3
    for name, kw in [("gauss", dict(kernel="gaussian", bandwidth=[0.7, 1.5])), ("poly", dict(kernel="polynomial"))]:
        for est in ("biased", "unbiased"):
            xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
            ref = distkern.mmd2(xa, ya, estimator=est, **kw)
            ref.backward()
            key = f"{name}-{est}"
            assert r0[key][0] == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
            assert r1[key][0] == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
            gx = torch.cat([r0[key][1], r1[key][1]])
            gy = torch.cat([r0[key][2], r1[key][2]])
            assert (gx - xa.grad).abs().max() < 1e-10, key
            assert (gy - ya.grad).abs().max() < 1e-10, key


def test_sharded_mmd2_argument_errors():
    with pytest.raises(ValueError, match="bandwidth"):
        distkern.distributed.mmd2(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="estimator"):
        distkern.distributed.mmd2(torch.randn(3, 2), torch.randn(4, 2), bandwidth=1.0, estimator="linear")
    with pytest.raises(RuntimeError, match="not initialised"):
        distkern.distributed.mmd2(torch.randn(3, 2), torch.randn(4, 2), bandwidth=1.0)


def test_kernel_matmul_matches_pykeops():
    # KeOps (a peer, not a test dependency: it compiles each formula with the system compiler on first use)
    lazy = pytest.importorskip("pykeops.torch")
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(300, 7, generator=g), torch.randn(250, 7, generator=g)
    v = torch.randn(250, 2, generator=g)
    d2 = ((lazy.LazyTensor(x[:, None, :]) - lazy.LazyTensor(y[None, :, :])) ** 2).sum(-1)
    peer = ((-d2 / (2 * 0.7**2)).exp() + (-d2 / (2 * 1.9**2)).exp()) @ v
    ours = kernel_matmul(x, y, v, kernel="gaussian", bandwidth=[0.7, 1.9])
    assert torch.allclose(ours, peer, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,kw", [("laplacian", {"bandwidth": 1.0}), ("distance", {}),
                                       ("gaussian", {"bandwidth": [0.7, 2.0]}), ("imq", {"bandwidth": 1.0}),
                                       ("polynomial", {})])
@pytest.mark.parametrize("estimator", ["biased", "unbiased", "ustat"])
def test_mmd2_dense_path_gradcheck(kernel, kw, estimator):
    # the small-batch dense path: a sample against itself has an exactly-zero distance diagonal, so the
    # Laplacian / distance kernels are exact there and their gradients are not rounding noise
    g = torch.Generator().manual_seed(4)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(25 if estimator == "ustat" else 19, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: distkern.mmd2(a, b, kernel=kernel, estimator=estimator, **kw),
                                    (x, y))


@pytest.mark.parametrize("kernel,kw", [("laplacian", {"bandwidth": 1.5}), ("distance", {}),
                                       ("gaussian", {"bandwidth": [0.7, 2.0]}), ("imq", {"bandwidth": 1.0}),
                                       ("polynomial", {})])
@pytest.mark.parametrize("estimator", ["biased", "unbiased", "ustat"])
@pytest.mark.parametrize("grads", ["x", "y", "xy"])
def test_mmd2_small_path_equals_tiled_path(monkeypatch, kernel, kw, estimator, grads):
    """The fused small-batch estimator in float32 against the kernel_matmul path in float64 (forced
    by lowering the size switch), values and gradients, with repeated rows within and across the
    samples (their Gram-trick distance is rounding noise, whose square root the Laplacian and
    distance kernels would show: both paths take such pairs from the coordinates)."""
    import distkern.mmd as mmd

    g = torch.Generator().manual_seed(11)
    n, m = 37, 37 if estimator == "ustat" else 29
    x0, y0 = torch.randn(n, 6, generator=g), torch.randn(m, 6, generator=g) + 0.3
    x0[5] = x0[3]
    y0[2] = x0[1]

    def run(dtype):
        x = x0.detach().to(dtype).clone().requires_grad_("x" in grads)
        y = y0.detach().to(dtype).clone().requires_grad_("y" in grads)
        v = distkern.mmd2(x, y, kernel=kernel, estimator=estimator, **kw)
        v.backward()
        return v.detach(), x.grad, y.grad

    small = run(torch.float32)
    monkeypatch.setattr(mmd, "_DENSE_MAX", 0)
    ref = run(torch.float64)
    assert float(small[0]) == pytest.approx(float(ref[0]), rel=2e-5, abs=1e-6)
    for a, b in zip(small[1:], ref[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == torch.float32
            assert float((a.double() - b).abs().max()) < 1e-4 * float(b.abs().max()), (a.double() - b).abs().max()


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_mmd2_small_path_duplicates_across_samples(estimator):
    """A Laplacian MMD between samples sharing rows, at a bandwidth near the spread: the norm form's
    rounding at the shared pairs (r ~ 1e-3 instead of 0) was 2e-3 of the value in float32; those pairs
    now come from the coordinates, as in kernel_matmul."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(200, 64, generator=g) * 0.05 + 3
    y = torch.cat([x[:120], torch.randn(80, 64, generator=g) * 0.05 + 3])
    xd, yd = x.double(), y.double()

    def kbar(a, b, drop_diag):
        k = torch.exp(-torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") / 0.05)
        if not drop_diag:
            return k.mean()
        return (k.sum() - k.diagonal().sum()) / (len(a) * (len(a) - 1))

    drop = estimator == "unbiased"
    ref = kbar(xd, xd, drop) + kbar(yd, yd, drop) - 2 * kbar(xd, yd, False)
    ours = distkern.mmd2(x, y, kernel="laplacian", bandwidth=0.05, estimator=estimator)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_mmd2_small_path_half_inputs_and_errors():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(20, 8, generator=g), torch.randn(15, 8, generator=g)
    xb = x.bfloat16().requires_grad_()
    v = distkern.mmd2(xb, y.bfloat16(), kernel="gaussian", bandwidth=2.0)
    v.backward()
    assert v.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    ref = distkern.mmd2(xb.detach().float(), y.bfloat16().float(), kernel="gaussian", bandwidth=2.0)
    assert float(v) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        distkern.mmd2(x[:1], y, bandwidth=1.0)
    with pytest.raises(ValueError, match="needs n = m"):
        distkern.mmd2(x, y, bandwidth=1.0, estimator="ustat")


def test_mmd2_small_path_under_torch_compile():
    """MMD-DDM trains through torch.compile: the fused small-batch estimator (an autograd.Function)
    traces in one graph and gives eager's value and gradient."""
    g = torch.Generator().manual_seed(13)
    x0, y = torch.randn(16, 8, generator=g), torch.randn(12, 8, generator=g)

    def loss(a, b):
        return distkern.mmd2(a, b, kernel="gaussian", bandwidth=[1.0, 2.0])

    x = x0.clone().requires_grad_()
    v = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y)
    v.backward()
    xe = x0.clone().requires_grad_()
    ve = loss(xe, y)
    ve.backward()
    assert float(v) == pytest.approx(float(ve), rel=1e-6)
    assert torch.allclose(x.grad, xe.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel,kw", [("gaussian", {"bandwidth": [0.7, 2.0]}), ("imq", {"bandwidth": 1.0}),
                                       ("polynomial", {}), ("laplacian", {"bandwidth": 1.0}), ("distance", {})])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_mmd2_small_path_double_backward(kernel, kw, estimator):
    """Second derivatives (MMD-GAN's gradient penalty differentiates the gradient): the fused
    backward recomputes differentiably under create_graph."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x[4], y[2] = x[2] + 1e-3, x[6] - 1e-3  # near pairs: distances from the coordinates, differentiated too
    x.requires_grad_()
    y.requires_grad_()

    def f(a, b):
        return distkern.mmd2(a, b, kernel=kernel, estimator=estimator, **kw)

    assert torch.autograd.gradgradcheck(f, (x, y))
    # the recomputation behind create_graph gives the fused backward's first derivatives
    for a, b in zip(torch.autograd.grad(f(x, y), (x, y), create_graph=True), torch.autograd.grad(f(x, y), (x, y))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bandwidths_checked_on_every_path():
    """mmd2's small-batch path never reaches the op, so the arguments are checked before the branch: the same
    errors at n = 100 as at n = 600 (a negative bandwidth used to give a number)."""
    g = torch.Generator().manual_seed(2)
    for n in (100, 600):
        x, y = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        for bw in (-1.0, 0.0, float("nan"), [1.0] * 17):
            with pytest.raises(ValueError, match="bandwidths"):
                distkern.mmd2(x, y, kernel="laplacian", bandwidth=bw)
        with pytest.raises(ValueError, match="degree must be >= 1"):
            distkern.mmd2(x, y, kernel="polynomial", degree=0.5)
    with pytest.raises(ValueError, match="MMDLoss: bandwidths"):
        distkern.MMDLoss(bandwidth=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        distkern.mmd2(torch.ones(10, 3, dtype=torch.long), torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least 1 sample"):
        distkern.mmd2(torch.randn(0, 3), torch.randn(5, 3), bandwidth=1.0, estimator="biased")
    with pytest.raises(ValueError, match="one D"):
        distkern.mmd_test(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="inf or NaN"):
        distkern.median_bandwidth(torch.tensor([[float("nan")], [1.0], [2.0]]))
    x = torch.randn(50, 3, generator=g)
    ref = distkern.kernel_matmul(x, x, bandwidth=[1.0, 2.0])
    assert torch.equal(distkern.kernel_matmul(x, x, bandwidth=np.array([1.0, 2.0])), ref)
    assert torch.equal(distkern.kernel_matmul(x, x, bandwidth=torch.tensor([1.0, 2.0])), ref)


def test_backward_with_no_columns_of_v():
    x, y = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    v = torch.randn(4, 0, requires_grad=True)
    out = distkern.kernel_matmul(x, y, v, bandwidth=1.0)
    assert out.shape == (5, 0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))
    assert v.grad.shape == (4, 0)


@pytest.mark.parametrize("kernel", ["laplacian", "distance", "gaussian"])
def test_coincident_points_are_exact(kernel):
    """Near-coincident pairs take r² from the coordinates: k(x, x) is exact (the norm form left 1.8e-3 relative
    error in the Laplacian row sums of K(x, x) at D = 256 in float32), the sums agree with float64 to ~1e-6."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 256, generator=g) + 3
    kw = {} if kernel == "distance" else {"bandwidth": 3.6}
    K = distkern.kernel_matmul(x, x, torch.eye(600), kernel=kernel, **kw)
    assert torch.equal(K.diagonal(), torch.zeros(600) if kernel == "distance" else torch.ones(600))
    d = torch.cdist(x.double(), x.double())
    ref = {"laplacian": torch.exp(-d / 3.6), "distance": d, "gaussian": torch.exp(-d**2 / (2 * 3.6**2))}[kernel].sum(1)
    out = distkern.kernel_matmul(x, x, kernel=kernel, **kw).double()
    assert float((out - ref).abs().max() / ref.abs().max()) < 2e-6


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "imq", "distance", "polynomial"])
def test_non_finite_rows_give_nan(kernel):
    """A NaN or inf row of x (or of y) makes its sums NaN, as mahalanobis does; the clamp of r² at 0 used to
    turn NaN into 0, so a NaN row looked like a point on top of every y (the kde detector scored it normal)."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 5, generator=g), torch.randn(6, 5, generator=g)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    kw = {"bandwidth": 1.5} if kernel in ("gaussian", "laplacian", "imq") else {}
    out = distkern.kernel_matmul(x, y, kernel=kernel, **kw)
    assert out[[1, 3]].isnan().all() and torch.isfinite(out[[0, 2]]).all()
    y[4, 1] = float("nan")
    assert distkern.kernel_matmul(x[[0, 2]], y, kernel=kernel, **kw).isnan().all()


_SHARD_ERRORS_WORKER = """
import sys, torch, torch.distributed as dist
import distkern
rank, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
km, mmd = distkern.distributed.kernel_matmul, distkern.distributed.mmd2
x = torch.randn(5, 3)
cases = {
    "x's D differs": lambda: km(torch.randn(5, 3 + rank), torch.randn(4, 3 + rank), bandwidth=1.0),
    "x's rows differ": lambda: km(torch.randn(5 + rank, 3), torch.randn(4, 3), bandwidth=1.0),
    "v on one rank": lambda: km(x, torch.randn(4, 3), torch.randn(4, 2) if rank else None, bandwidth=1.0),
    "bad bandwidth, empty shard": lambda: km(x, torch.randn(4 * (1 - rank), 3), bandwidth=-1.0),
    "x requires grad on one rank": lambda: km(x.clone().requires_grad_(rank == 1), torch.randn(4, 3), bandwidth=1.0),
    "mmd2 D differs": lambda: mmd(torch.randn(4, 3 + rank), torch.randn(4, 3 + rank), bandwidth=1.0),
    "mmd2 dtype differs": lambda: mmd(torch.randn(4, 3, dtype=torch.float64 if rank else torch.float32),
                                      torch.randn(4, 3), bandwidth=1.0),
    "mmd2 bad shards on one rank": lambda: mmd(torch.randn(4, 3), torch.randn(4, 3 + rank), bandwidth=1.0),
}
got = {}
for name, call in cases.items():
    try:
        call()
        got[name] = "no error"
    except (ValueError, RuntimeError) as e:
        got[name] = f"{type(e).__name__}: {e}"
got["still works"] = km(x, torch.randn(4, 3), bandwidth=1.0).shape  # the group is still in step
torch.save(got, f"{path}.{rank}")
dist.destroy_process_group()
"""


def test_sharded_argument_errors_raise_on_every_rank(tmp_path, gloo_run):
    """Ranks that disagree, or one rank refusing its arguments, give the same clear error on every rank —
    they used to hang (a rank without rows skipped the checks and waited in all_reduce), abort the process
    (gloo on mismatched sizes) or silently reduce different things; x requiring grad on some ranks only (its
    backward all-reduces) is refused."""
    gloo_run(_SHARD_ERRORS_WORKER, str(tmp_path / "err"))
    r0, r1 = (torch.load(tmp_path / f"err.{r}") for r in range(2))
    for got in (r0, r1):
        assert "disagree on D" in got["x's D differs"] or "disagree on x's D" in got["x's D differs"]
        assert "disagree on x's shape" in got["x's rows differ"]
        assert "disagree on v" in got["v on one rank"]
        assert got["bad bandwidth, empty shard"].startswith("ValueError")
        assert "disagree on x requires grad" in got["x requires grad on one rank"]
        assert "disagree on D" in got["mmd2 D differs"]
        assert "disagree on x's dtype" in got["mmd2 dtype differs"]
        assert got["mmd2 bad shards on one rank"].startswith("ValueError")  # rank 0: refused by rank 1
        assert tuple(got["still works"]) == (5,)
    assert "bandwidths must be finite" in r0["bad bandwidth, empty shard"]


@pytest.mark.parametrize("kernel,bw", [("gaussian", 1e-20), ("imq", 1e-20), ("laplacian", 1e-40)])
def test_tiny_bandwidths_give_the_kernel_limit_not_nan(kernel, bw):
    """1/(2σ²) overflowed float32 (σ < 1.3e-19 for the Gaussian): inf·0 made k(x, x) NaN in the op and in
    mmd2's dense path. The coefficient is capped: k(x, x) = 1 and k = 0 elsewhere, the kernel's limit."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    for dt in (torch.float32, torch.float64):
        out = distkern.kernel_matmul(x.to(dt), x.to(dt), kernel=kernel, bandwidth=bw)
        assert torch.equal(out, torch.tensor([2.0, 1.0, 2.0], dtype=out.dtype))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for n in (4, 600):  # dense and tiled paths
        a, b = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        v = distkern.mmd2(a, b, kernel=kernel, bandwidth=bw, estimator="biased")
        assert float(v) == pytest.approx(2.0 / n, rel=1e-5)


def test_mixed_dtypes_take_one_working_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(513, 4, generator=g, dtype=torch.float64)
    y = torch.randn(513, 4, generator=g, dtype=torch.float64).float().double()  # exact in float32
    for n in (512, 513):  # the tiled path (513) used to compute the y terms in float32
        assert float(distkern.mmd2(x[:n], y[:n], bandwidth=1.0)) == float(distkern.mmd2(x[:n], y[:n].float(), bandwidth=1.0))


# The CPU evaluates φ 16 pairs at a time with an exp of its own (csrc/kernel_sum/phi_cpu.cpp) where the CPU
# has AVX-512F, and kernel_math.h's scalar phi elsewhere (and with DISTKERN_CPU_GEMM=0): both are held to
# the float64 formula here, on every kind the op evaluates, the backward's derivative kinds included.
_ALL_KINDS = [("gaussian", 0, [0.7, 2.0]), ("laplacian", 1, [1.3]), ("imq", 2, [1.0, 3.0]),
              ("polynomial", 3, None), ("distance", 4, []), ("gaussian'", 5, [0.7, 2.0]), ("laplacian'", 6, [1.3]),
              ("imq'", 7, [1.0, 3.0]), ("polynomial'", 8, None), ("distance'", 9, [])]


def _phi64(kind, params, x, y):
    """φ of kernel_math.h in float64, distances from the coordinates."""
    x, y = x.double(), y.double()
    r2 = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    r = r2.sqrt()
    bw = params or []
    if kind in (3, 8):
        g, c, d = params
        base = g * (x @ y.T) + c
        return base ** d if kind == 3 else d * g * base ** (d - 1)
    out = torch.zeros_like(r2)
    for s in bw:
        if kind == 0: out += torch.exp(-r2 / (2 * s * s))
        if kind == 1: out += torch.exp(-r / s)
        if kind == 2: out += (1 + r2 / (s * s)).rsqrt()
        if kind == 5: out -= torch.exp(-r2 / (2 * s * s)) / (2 * s * s)
        if kind == 6: out -= torch.exp(-r / s) / s
        if kind == 7: out -= 0.5 / (s * s) * (1 + r2 / (s * s)) ** -1.5
    if kind == 4: out = r
    if kind == 6: out = torch.where(r2 > 0, out / (2 * r).clamp_min(1e-300), torch.zeros_like(r2))
    if kind == 9: out = torch.where(r2 > 0, 0.5 / r.clamp_min(1e-300), torch.zeros_like(r2))
    return out


@pytest.mark.parametrize("name,kind,params", _ALL_KINDS, ids=[k[0] for k in _ALL_KINDS])
@pytest.mark.parametrize("degree", [3.0, 2.5])  # integer degrees on AVX-512 lanes, others through pow
def test_every_kind_in_float32_matches_float64(name, kind, params, degree, rng):
    if params is None:
        params = [1 / 6, 1.0 if degree == 3.0 else 6.0, degree]  # a positive base for a fractional power
    elif degree != 3.0:
        pytest.skip("the degree is the polynomial kernels' parameter")
    # ragged sizes (neither a multiple of 16 lanes nor of the tiles), duplicates (the pairs whose r² the
    # norm form does not resolve and the coordinates give), a near-copy of a row
    x = torch.randn(37, 6, generator=rng)
    y = torch.cat([torch.randn(531, 6, generator=rng) * 0.8, x[:5], x[5:6] + 0.01])
    v = torch.randn(y.shape[0], 3, generator=rng, dtype=torch.float64)
    out = torch.ops.distkern.kernel_matmul(x, y, v.float(), kind, params)
    phi = _phi64(kind, params, x, y)
    ref = phi @ v
    # Each entry's error against what float32 can promise for it, Σ_j |φ_ij||v_j|·ε: a norm-wise ‖out − ref‖/‖ref‖
    # is at the mercy of the cancellation in a random-signed v (a rare draw took it past 2e-6 at ~10 ε per
    # term). Observed over 300 seeds on the AVX-512, AVX2 and scalar paths: ≤ 2.4e-7 (2 ε) for the smooth
    # kinds. r² from the norm form is good to ~2¹⁰·ε relative just above the refinement threshold; the
    # square-root kinds (1/r in the derivatives) show it (≤ 5.4e-6 observed).
    err = ((out.double() - ref).abs() / (phi.abs() @ v.abs()).clamp_min(1e-300)).max()
    assert err < (1e-4 if kind in (1, 4, 6, 9) else 1e-6), name
    assert torch.isfinite(out).all()


def test_exp_over_the_whole_float32_range():
    """The Gaussian kernel at one point is exp(−r²): from 1 down through the subnormals to 0, within
    1.5 ulp of exp of the same float32 r² wherever the result is normal."""
    t = torch.linspace(0, 110, 400_001, dtype=torch.float64)
    x = t.sqrt().float()[:, None]
    out = kernel_matmul(x, torch.zeros(1, 1), kernel="gaussian", bandwidth=0.5 ** 0.5).double()
    ref = torch.exp(-(x[:, 0] * x[:, 0]).double())
    normal = ref > torch.finfo(torch.float32).tiny
    assert ((out - ref).abs() / ref)[normal].max() < 1.5 * 2.0 ** -23
    assert (out - ref)[~normal].abs().max() <= 2 * 2.0 ** -149  # gradual underflow, then 0
    assert out[-1] == 0 and out[0] == 1


def test_scalar_and_avx512_paths_agree(with_and_without_avx512):
    """With DISTKERN_CPU_GEMM=0 the products go through torch's BLAS and φ through the scalar phi; with
    =avx2 through the AVX2 kernel and φ on AVX2 lanes: both agree with the automatic choice. The AVX-512
    and AVX2 lanes give the same bits, the exponential from 1 through the subnormals to 0 included."""
    code = (
        "import torch, sys\n"
        "import distkern\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x = torch.randn(150, 20, generator=g); y = torch.randn(700, 20, generator=g); v = torch.randn(700, 2, generator=g)\n"
        "ps = {0: [0.8, 3.0], 1: [2.0], 2: [1.5], 3: [0.05, 1.0, 3.0], 4: [], 5: [0.8], 6: [2.0], 7: [1.5],\n"
        "      8: [0.05, 1.0, 3.0], 9: []}\n"
        "out = [torch.ops.distkern.kernel_matmul(x, y, v, k, p) for k, p in ps.items()]\n"
        "r = torch.linspace(0, 110, 100_003, dtype=torch.float64).sqrt().float()[:, None]\n"
        "e = torch.ops.distkern.kernel_matmul(r, torch.zeros(1, 1), None, 0, [0.5 ** 0.5])\n"
        "torch.save((distkern._C.cpu_math_isa(), out, e), sys.argv[1])\n"
    )
    *runs, blas = with_and_without_avx512(code)
    for isa, out, _ in runs:
        assert isa != "none" or distkern._C.cpu_math_isa() == "none"
        for kind, (a, b) in enumerate(zip(out, blas[1])):
            assert torch.allclose(a, b, rtol=2e-5, atol=1e-5 * float(b.abs().max())), kind
    assert blas[0] == "none"
    if runs[0][0] != "none" and runs[1][0] != "none":  # AVX-512 lanes (or AVX2 twice) and AVX2 lanes
        assert torch.equal(runs[0][2], runs[1][2])
        e = runs[0][2]
        assert e[-1] == 0 and ((e > 0) & (e < torch.finfo(torch.float32).tiny)).sum() > 1000  # subnormals


@pytest.mark.parametrize("kernel,kw", [("gaussian", {"bandwidth": [0.7, 2.0]}), ("laplacian", {"bandwidth": 1.5}),
                                       ("polynomial", {})])
def test_column_major_x_gathered(kernel, kw, rng):
    """x = (D, N)ᵀ: the CPU tiles centre its rows 64 at a time along the column. Same bits as the
    contiguous copy, and the float64 dense kernel."""
    D, N, M = 23, 150, 40
    x = torch.randn(D, N, generator=rng).T
    y = torch.randn(M, D, generator=rng)
    v = torch.randn(M, 3, generator=rng)
    out = kernel_matmul(x, y, v, kernel=kernel, **kw)
    assert torch.equal(out, kernel_matmul(x.contiguous(), y, v, kernel=kernel, **kw))
    assert rel(out, dense_kernel(x.double(), y.double(), kernel, kw) @ v.double()) < 1e-5
