"""distkern.centred_moments: one batch's moments for GaussianStats (one Gaussian), against float64."""
import numpy as np
import pytest
import torch

import distkern  # noqa: F401  (registers the ops)
from distkern.gaussian import GaussianStats

OP = torch.ops.distkern.centred_moments.default
EPS32 = torch.finfo(torch.float32).eps


def reference(x, double_products=False):
    """The op's formulas in float64: z = x − mean (rounded once to float32 unless double_products)."""
    xd = x.double()
    total = xd.sum(0)
    z = xd - total / x.shape[0]
    if not double_products:
        z = z.float().double()
    s = (z * z).sum(1)
    return total, z.T @ z, s @ z, (s * s).sum(), z


def check(x, double_products=False):
    total, scatter, cubic, quartic = OP(x, double_products)
    rt, rs, rc, rq, z = reference(x, double_products)
    eps = torch.finfo(torch.float64).eps if double_products else EPS32
    assert total.dtype == scatter.dtype == cubic.dtype == quartic.dtype == torch.float64
    assert scatter.shape == rs.shape and quartic.shape == ()
    torch.testing.assert_close(total, rt, rtol=1e-12, atol=1e-12 * float(x.double().abs().sum()))
    # float32 products summed over at most 512 rows a tile, then in float64 (float64 products: over all N
    # rows): each entry within the classical bound of such a sum, 2·terms·ε·Σ_k |z_ki||z_kj|, for ours and the
    # reference alike (a wrong entry is off by about its own size, ~1/√N of that sum or more)
    terms = x.shape[0] if double_products else min(x.shape[0], 512)
    bound = 2 * terms * eps * (z.abs().T @ z.abs()) + 1e-300
    err = (scatter - rs).abs()
    assert bool((err <= bound).all()), f"scatter off by {float((err / bound).max()):.3g} x its bound"
    assert torch.equal(scatter, scatter.T)
    # float64 sums of the rounded rows; the two float64 means may differ in their last bit and then round an
    # entry of z the other way: 2ε₃₂ of each term (a missing or wrong row is off by its whole term)
    s = (z * z).sum(1)
    assert bool(((cubic - rc).abs() <= 2 * EPS32 * (s @ z.abs()) + 1e-300).all())
    torch.testing.assert_close(quartic, rq, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("double_products", [False, True])
@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (513, 48), (1000, 100), (2049, 257), (300, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_float64_reference(n, d, dtype, double_products):
    """Tiles of 512 rows (256 for float64 products) and the row blocks of 48 cut through (513, 2049, 257); at
    D = 1100 a tile holds 119 rows (59); every input dtype."""
    g = torch.Generator().manual_seed(n * 1009 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    x = (x + 100.0).to(dtype)  # an offset the float64 centring must remove
    check(x, double_products)


def test_strided_and_transposed_inputs():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(700, 90, generator=g)
    for f64 in (False, True):
        check(big[:, 3:70], f64)  # rows 90 apart, read in place
        check(big[::3, ::2], f64)  # columns strided: copied first
        check(big.T[:, :500], f64)  # column-major
        check(big.expand(2, 700, 90)[1], f64)


def test_empty():
    t, s, c, q = OP(torch.empty(0, 5))
    assert t.shape == (5,) and s.shape == (5, 5) and float(s.abs().sum() + c.abs().sum() + q) == 0
    assert OP(torch.empty(4, 0))[1].shape == (0, 0)


@pytest.mark.parametrize("double_products", [False, True])
@pytest.mark.parametrize("n,d", [(5000, 64), (700, 2950)])
def test_same_bits_whatever_the_thread_count(n, d, double_products):
    """Tiles go to at most 8 groups of consecutive tiles, summed in order; each block of the product is one
    thread's: one thread (a torch.distributed worker) and many give the same bits. At D = 2950 there is one
    group, and the blocks of each tile's product run in parallel."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d)) + 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, double_products)
    finally:
        torch.set_num_threads(threads)
    many = OP(x, double_products)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    if d > 1000:
        check(x, double_products)


def test_other_devices_share_the_formulas():
    """The CompositeExplicitAutograd kernel (every device but the CPU) on the same input, and the fake."""
    x = torch.randn(3000, 70, generator=torch.Generator().manual_seed(2)) * 2 - 7
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for f64, tol in [(False, 1e-6), (True, 1e-12)]:
        cpu, other = OP(x, f64), OP.redispatch(keys, x, f64)
        for a, b in zip(cpu, other):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
        meta = OP(x.to("meta"), f64)
        assert [tuple(t.shape) for t in meta] == [(70,), (70, 70), (70,), ()]
        torch.library.opcheck(OP, (x[:200], f64))


def test_micro_kernel_and_blas_paths_agree(with_and_without_avx512):
    """The AVX-512 products, the AVX2 micro-kernel and torch's BLAS (DISTKERN_CPU_GEMM=1 / avx2 / 0)."""
    code = (
        "import sys, torch, distkern\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x = torch.randn(1500, 131, generator=g) + 5\n"
        "torch.save(torch.ops.distkern.centred_moments(x), sys.argv[1])\n"
    )
    outs = with_and_without_avx512(code)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_errors_name_the_op():
    with pytest.raises(ValueError, match=r"distkern.centred_moments: x must be a 2-D tensor of shape \(N, D\)"):
        OP(torch.randn(3))
    with pytest.raises(TypeError, match="distkern.centred_moments: x must be float32"):
        OP(torch.ones(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("product_dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_stats_through_the_op(product_dtype, rtol, rng):
    """GaussianStats (one Gaussian) goes through the op: the streamed covariance against numpy's in float64, a
    large offset, batches of 1, float32 and float64 batches, and a bad batch named and left out."""
    x = torch.randn(3001, 37, generator=rng, dtype=torch.float64) * 0.5 + 1e4
    st = GaussianStats(product_dtype=product_dtype)
    batches = [x[k0:k1].float() if k0 else x[k0:k1] for k0, k1 in [(0, 1), (1, 1000), (1000, 1001), (1001, 3001)]]
    for b in batches:
        st.update(b)
    x = torch.cat([b.double() for b in batches])  # what was fed
    ref = np.cov(x.numpy(), rowvar=False, bias=True)
    err = np.abs(st.covariance().numpy() - ref).max() / np.abs(ref).max()
    assert err < rtol, err
    torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-9, atol=0)
    bad = torch.randn(4, 37)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"batch 4 contains inf or NaN in rows \[3\]"):
        st.update(bad)
    assert st.count == 3001


@pytest.mark.cuda
@pytest.mark.parametrize("double_products", [False, True])
def test_cuda_matches_cpu(double_products, rng):
    """On CUDA the op is the ATen composition of the same formulas, and GaussianStats fits on the device."""
    x = (torch.randn(5000, 200, generator=rng) * 2 + 50).to(torch.bfloat16)
    for a, b in zip(OP(x.cuda(), double_products), OP(x, double_products)):
        assert a.is_cuda and a.dtype == torch.float64
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    dtype = torch.float64 if double_products else torch.float32
    st = GaussianStats(product_dtype=dtype)
    for k in range(0, 5000, 1024):
        st.update(x[k:k + 1024].cuda())
    ref = GaussianStats(product_dtype=dtype).update(x)
    torch.testing.assert_close(st.covariance().cpu(), ref.covariance(), rtol=1e-5, atol=1e-5)
