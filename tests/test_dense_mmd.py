"""mmd2's small-sample CPU path: distkern's AVX-512 products (dense_gram, dense_mm) and the one-pass
estimator (dense_mmd, dense_mmd_grad) against float64 references, the fallback without the AVX-512
kernel, and that mmd2 takes the fused path where it should."""


import pytest
import torch

import distkern  # noqa: F401  (loads the ops)
from distkern.mmd import _ESTIMATOR_ID, _FUSED_KERNELS, _fused_cpu, mmd2
from distkern.ops._cpu import vector_cpu_math
from distkern.ops.kernel_sum import KERNELS, kernel_params

from test_kernel_sum import KERNELS as KERNEL_CASES, dense_kernel

ops = torch.ops.distkern


@pytest.mark.parametrize("n,K", [(1, 1), (5, 17), (13, 300), (37, 2048), (128, 2048), (100, 0), (257, 64), (9, 2049),
                                 (20, 5000)])  # K > 2048: several of the AVX2 kernel's K blocks, the last partial
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_dense_gram(n, K, layout, rng):
    z = torch.randn(n, 2 * K, generator=rng)[:, ::2] if layout == "strided" else torch.randn(n, K, generator=rng)
    g = ops.dense_gram(z)
    ref = z.double() @ z.double().T
    assert g.shape == (n, n) and g.dtype == torch.float32
    assert torch.equal(g, g.T)  # symmetric to the bit
    assert (g.double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (13, 7, 33), (64, 128, 2048), (100, 50, 31), (12, 0, 5), (25, 300, 17),
                                   (3, 600, 40), (5, 40, 1001), (200, 64, 300), (500, 64, 100)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_dense_mm(M, K, N, ta, tb, rng):
    a = torch.randn(K, M, generator=rng).T if ta else torch.randn(M, K, generator=rng)
    b = torch.randn(N, K, generator=rng).T if tb else torch.randn(K, N, generator=rng)
    out = ops.dense_mm(a, b)
    ref = a.double() @ b.double()
    assert out.shape == (M, N)
    assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)


def test_dense_products_float64_and_errors(rng):
    z = torch.randn(9, 20, generator=rng, dtype=torch.float64)
    assert torch.allclose(ops.dense_gram(z), z @ z.T, rtol=1e-14, atol=1e-12)
    assert torch.allclose(ops.dense_mm(z, z.T), z @ z.T, rtol=1e-14, atol=1e-12)
    # few rows, many columns: split over the threads by columns where BLAS is used
    a, b = torch.randn(7, 64, generator=rng, dtype=torch.float64), torch.randn(64, 1031, generator=rng, dtype=torch.float64)
    assert torch.allclose(ops.dense_mm(a, b), a @ b, rtol=1e-14, atol=1e-12)
    with pytest.raises(ValueError, match="cannot be multiplied"):
        ops.dense_mm(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="2-D"):
        ops.dense_gram(torch.zeros(3))


def test_avx512_kernel_off_gives_the_same_products(with_and_without_avx512):
    """DISTKERN_CPU_GEMM=0 takes at::mm (MKL), =avx2 the AVX2 kernel: every path agrees to float32 rounding
    (the products with many rows pack B, the others read it in place)."""
    code = (
        "import torch, distkern, sys\n"
        "g = torch.Generator().manual_seed(3)\n"
        "z = torch.randn(70, 333, generator=g); b = torch.randn(40, 70, generator=g)\n"
        "w = torch.randn(300, 70, generator=g)\n"
        "x, y = torch.randn(40, 600, generator=g), torch.randn(30, 600, generator=g) + 0.5\n"
        "_, bb, xc, yc = torch.ops.distkern.dense_mmd(x, y, 4, [], 1, True, True)  # [x; y] stacked, never formed\n"
        "torch.save((torch.ops.distkern.dense_gram(z), torch.ops.distkern.dense_mm(b, z),\n"
        "            torch.ops.distkern.dense_mm(w, z), torch.ops.distkern.dense_mm(w, z.t().contiguous().t()),\n"
        "            torch.ops.distkern.dense_mmd_grad(bb, xc, yc, 0, False),\n"
        "            torch.ops.distkern.dense_mmd_grad(bb[:40, :], x, y, 0, True)), sys.argv[1])\n"
    )
    *runs, blas = with_and_without_avx512(code)
    for run in runs:
        for a, b in zip(run, blas):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


def reference_mmd(x, y, kernel, kw, estimator):
    """The estimator in float64 from dense kernel matrices."""
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = (dense_kernel(a, b, kernel, kw, exact=True) for a, b in ((x, x), (y, y), (x, y)))
    if estimator == "biased":
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    sxx, syy = kxx.sum() - kxx.diagonal().sum(), kyy.sum() - kyy.diagonal().sum()
    if estimator == "unbiased":
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * kxy.mean()
    return (sxx + syy - 2 * (kxy.sum() - kxy.diagonal().sum())) / (n * (n - 1))


@pytest.mark.parametrize("kernel,kw", KERNEL_CASES)
@pytest.mark.parametrize("estimator", ["biased", "unbiased", "ustat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True), (False, False)])
def test_dense_mmd_op(kernel, kw, estimator, dtype, need, rng):
    n = m = 23 if estimator == "ustat" else None
    n, m, D = (n or 19), (m or 31), 45
    x = torch.randn(n, D, generator=rng, dtype=dtype)
    y = torch.randn(m, D, generator=rng, dtype=dtype) * 1.1 + 0.2
    bw = kw.get("bandwidth")
    params = kernel_params(kernel, D, bandwidth=bw, op="test")[1]
    val, b, xc, yc = ops.dense_mmd(x, y, KERNELS[kernel], params, _ESTIMATOR_ID[estimator], *need)
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    ref = reference_mmd(xr, yr, kernel, kw, estimator)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert val.dtype == dtype and abs(float(val) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    rows = (n if need[0] else 0) + (m if need[1] else 0)
    assert b.shape == (rows, n + m)
    if kernel == "polynomial":  # x and y are read as they are
        assert xc.shape == yc.shape == (0, D)
        xc, yc = x.detach(), y.detach()  # (x itself requires grad below for float64)
    else:  # centred on y's mean
        ybar = y.double().mean(0)
        assert torch.allclose(xc.double(), x.double() - ybar, atol=1e-5) and torch.allclose(yc.double(), y.double() - ybar, atol=1e-5)
    if not any(need):
        return
    gx_ref, gy_ref = torch.autograd.grad(ref, (xr, yr))
    g = ops.dense_mmd_grad(b, xc, yc, 0 if need[0] else n, kernel == "polynomial")
    # the gradient cancels (to ~1e-5 for a biased Gaussian MMD of these samples); its terms are ~1e-3
    scale = max(float(gx_ref.abs().max()), float(gy_ref.abs().max()), 1e-3)
    gtol = 1e-9 if dtype == torch.float64 else 5e-4
    if need[0]:
        assert (g[:n].double() - gx_ref).abs().max() <= gtol * scale
    if need[1]:
        assert (g[n if need[0] else 0:].double() - gy_ref).abs().max() <= gtol * scale


def test_dense_mmd_shared_rows_exact(rng):
    """Duplicated rows across the samples: their distance is 0 from the coordinates, as kernel_matmul's."""
    x = torch.randn(40, 256, generator=rng) * 10
    y = torch.cat([x[:25], torch.randn(15, 256, generator=rng) * 10])
    p = kernel_params("laplacian", 256, bandwidth=50.0, op="test")[1]
    val = ops.dense_mmd(x, y, KERNELS["laplacian"], p, 0, False, False)[0]
    ref = reference_mmd(x.double(), y.double(), "laplacian", dict(bandwidth=50.0), "biased")
    assert abs(float(val) - float(ref)) < 1e-6


def test_dense_mmd_bad_inputs():
    x, y = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="U-statistic needs n = m"):
        ops.dense_mmd(x, y, 3, [1.0, 1.0, 3.0], 2, True, False)
    with pytest.raises(ValueError, match="at least 2"):
        ops.dense_mmd(x[:1], y, 3, [1.0, 1.0, 3.0], 1, True, False)
    with pytest.raises(ValueError, match="D = 3"):
        ops.dense_mmd(x, torch.zeros(5, 4), 3, [1.0, 1.0, 3.0], 0, True, False)
    with pytest.raises(ValueError, match="bandwidths must be finite"):
        ops.dense_mmd(x, y, 0, [-1.0], 0, True, False)


def test_opcheck(rng):
    x, y, z = torch.randn(6, 5, generator=rng), torch.randn(7, 5, generator=rng), torch.randn(9, 11, generator=rng)
    torch.library.opcheck(ops.dense_gram.default, (z,))
    torch.library.opcheck(ops.dense_mm.default, (z, z.T.contiguous()))
    torch.library.opcheck(ops.dense_mmd.default, (x, y, 3, [0.2, 1.0, 3.0], 1, True, True))
    torch.library.opcheck(ops.dense_mmd.default, (x, y, 4, [], 0, True, False))
    _, b, xc, yc = ops.dense_mmd(x, y, 4, [], 0, True, False)
    torch.library.opcheck(ops.dense_mmd_grad.default, (b, xc, yc, 0, False))
    _, b, _, _ = ops.dense_mmd(x, y, 3, [0.2, 1.0, 3.0], 1, True, True)
    torch.library.opcheck(ops.dense_mmd_grad.default, (b, x, y, 0, True))


@pytest.mark.parametrize("kernel,kw", KERNEL_CASES)
def test_mmd2_takes_the_fused_path(kernel, kw, rng):
    """The polynomial and distance kernels always; the exponential ones where φ runs on AVX-512 lanes."""
    x = torch.randn(64, 300, generator=rng).requires_grad_()
    y = torch.randn(64, 300, generator=rng)
    kw = {k: [b * 25 for b in v] if isinstance(v, list) else v * 25 for k, v in kw.items()}  # σ ~ the distances
    with torch.no_grad():
        fused = _fused_cpu(x, kernel)
        assert fused == (kernel in _FUSED_KERNELS or vector_cpu_math() is not None)
        assert not _fused_cpu(x.double(), kernel) or kernel in _FUSED_KERNELS
    with torch.autograd.profiler.profile() as prof:
        loss = mmd2(x, y, kernel=kernel, estimator="unbiased", **kw)
        loss.backward()
    names = {e.name for e in prof.function_events}
    assert ("distkern::dense_mmd" in names and "distkern::dense_mmd_grad" in names) == fused
    xr = x.detach().double().requires_grad_()
    ref = reference_mmd(xr, y.double(), kernel, kw, "unbiased")
    (gref,) = torch.autograd.grad(ref, xr)
    assert abs(float(loss) - float(ref)) <= 2e-5 * max(1.0, abs(float(ref)))
    assert (x.grad.double() - gref).abs().max() <= 5e-4 * float(gref.abs().max())


def test_mmd2_fused_double_backward(rng):
    """create_graph differentiates the torch composition: a gradient penalty on the fused path is exact."""
    x = torch.randn(12, 6, generator=rng, dtype=torch.float64).requires_grad_()
    y = torch.randn(10, 6, generator=rng, dtype=torch.float64)
    (g,) = torch.autograd.grad(mmd2(x, y, kernel="polynomial"), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(reference_mmd(xr, y, "polynomial", {}, "unbiased"), xr, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.square().sum(), xr)
    assert torch.allclose(g, gr, rtol=1e-10, atol=1e-12) and torch.allclose(gg, ggr, rtol=1e-9, atol=1e-12)
