"""distkern.mahalanobis against a float64 reference, autograd, torch.compile, errors, CUDA."""
import pytest
import torch

import distkern
from distkern.gaussian import whitening_factor
from cuda_refs import cuda_schedule

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# relative-error bounds on ‖out − ref‖ / ‖ref‖ (inputs are rounded to the dtype first, so the bound
# measures the op's accumulation, not the input rounding)
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_gaussian(D, gen, device="cpu"):
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    cov = A @ A.T / D + 0.05 * torch.eye(D, dtype=torch.float64)
    mean = torch.randn(D, generator=gen, dtype=torch.float64)
    return mean.to(device), cov.to(device)


def reference(x, mean, factor):
    """float64, the plain formula ‖Wᵀ(x − μ)‖²."""
    z = (x.double() - mean.double()) @ factor.double()
    return (z * z).sum(1)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(1, 1), (7, 3), (300, 70), (1000, 130), (65, 257)])
def test_matches_float64_reference(device, dtype, N, D, rng):
    mean, cov = random_gaussian(D, rng, device)
    x = (mean + torch.randn(N, D, generator=rng, dtype=torch.float64).to(device) * 2).to(dtype)
    L = whitening_factor(cov, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = distkern.mahalanobis(x, mean.to(dtype), L)
    assert out.shape == (N,)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.device.type == device
    ref = reference(x, mean.to(dtype), L)
    assert rel_err(out, ref) < TOL[dtype]
    assert bool((out >= 0).all())
    # and against the precision-matrix formula the anchor projects use
    P = torch.linalg.inv(cov)
    xc = x.double() - mean.to(dtype).double()
    ref_p = ((xc @ P) * xc).sum(1)
    assert rel_err(out, ref_p) < (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_strides(device, dtype, rng):
    D = 90
    mean, cov = random_gaussian(D, rng, device)
    L = whitening_factor(cov)
    base = torch.randn(D * 2, 400, generator=rng).to(device, dtype)
    views = [base.T[::3, ::2], base[:D].T, base.T.contiguous()[5:205, 40:130], base[0, :D].expand(50, D)]
    for x in views:
        assert x.shape[1] == D
        out = distkern.mahalanobis(x, mean, L)
        assert rel_err(out, reference(x, mean, L)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R", [1, 17, 64, 150])
def test_general_factor(device, R, rng):
    """lower=False: any (D, R) whitening matrix, e.g. a truncated PCA basis scaled by λ^-½."""
    D = 100
    W = torch.randn(D, R, generator=rng).to(device)
    mean = torch.randn(D, generator=rng).to(device)
    x = torch.randn(333, D, generator=rng).to(device)
    out = distkern.mahalanobis(x, mean, W, lower=False)
    assert rel_err(out, reference(x, mean, W)) < 2e-5


def test_opcheck(rng):
    D = 20
    mean, cov = random_gaussian(D, rng)
    L = whitening_factor(cov)
    x = torch.randn(50, D, generator=rng)
    torch.library.opcheck(torch.ops.distkern.mahalanobis.default, (x, mean.float(), L, True))
    torch.library.opcheck(torch.ops.distkern.mahalanobis.default, (x.double().requires_grad_(), mean.double(), L.double(), True))
    torch.library.opcheck(torch.ops.distkern.mahalanobis.default, (x, mean.float(), torch.randn(D, 7, generator=rng), False))
    g = torch.rand(50, generator=rng)
    torch.library.opcheck(torch.ops.distkern.mahalanobis_backward.default, (g, x, mean.float(), L, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lower", [True, False])
def test_gradcheck(device, lower, rng):
    D, N = 9, 13
    mean, cov = random_gaussian(D, rng, device)
    W = whitening_factor(cov, dtype=torch.float64) if lower else torch.randn(D, 5, generator=rng, dtype=torch.float64).to(device)
    x = torch.randn(N, D, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    m = mean.clone().requires_grad_()
    w = W.clone().requires_grad_()
    # gradcheck perturbs every entry of w, including the (ignored) strict upper triangle: compare
    # against a function of tril(w) so the reference is well defined on the CPU check too.
    fn = (lambda a, b, c: distkern.mahalanobis(a, b, c.tril(), lower=True)) if lower else (
        lambda a, b, c: distkern.mahalanobis(a, b, c, lower=False))
    assert torch.autograd.gradcheck(fn, (x, m, w))
    assert torch.autograd.gradgradcheck(fn, (x, m, w))  # second derivatives: the backward op has its own


def test_hessian_is_twice_the_precision(rng):
    """d²/dx² of (x − μ)ᵀ W Wᵀ (x − μ) is 2·W·Wᵀ, also through create_graph (e.g. input pre-processing losses)."""
    D = 6
    mean, cov = random_gaussian(D, rng, "cpu")
    W = whitening_factor(cov, dtype=torch.float64)
    x = torch.randn(1, D, generator=rng, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda t: distkern.mahalanobis(t, mean, W).sum(), x).reshape(D, D)
    assert torch.allclose(H, 2 * W @ W.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype, rng):
    D, N = 130, 500
    mean, cov = random_gaussian(D, rng, device)
    L = whitening_factor(cov)
    x = torch.randn(N, D, generator=rng).to(device, dtype).requires_grad_()
    m = mean.float().requires_grad_()
    g = torch.randn(N, generator=rng).to(device)
    (distkern.mahalanobis(x, m, L) * g).sum().backward()
    xr = x.detach().double().requires_grad_()
    mr = m.detach().double().requires_grad_()
    (reference(xr, mr, L) * g.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, xr.grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(m.grad, mr.grad) < 1e-5


def test_torch_compile_fullgraph(rng):
    D = 32
    mean, cov = random_gaussian(D, rng)
    L = whitening_factor(cov)
    mean = mean.float()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def score(x):
        return distkern.mahalanobis(x * 2.0, mean, L).sqrt()

    x = torch.randn(100, D, generator=rng)
    assert torch.allclose(score(x), reference(x * 2, mean, L).sqrt().float(), rtol=1e-4)


def test_torch_compile_inductor(rng):
    D = 16
    mean, cov = random_gaussian(D, rng)
    L = whitening_factor(cov)
    mean = mean.float()
    score = torch.compile(lambda x: distkern.mahalanobis(x, mean, L) + 1.0, fullgraph=True)
    x = torch.randn(40, D, generator=rng)
    assert torch.allclose(score(x), reference(x, mean, L).float() + 1.0, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_nonfinite(device, rng):
    D = 12
    mean, cov = random_gaussian(D, rng, device)
    L = whitening_factor(cov)
    mean = mean.float()
    empty = torch.empty(0, D, device=device)
    assert distkern.mahalanobis(empty, mean, L).shape == (0,)
    e = empty.clone().requires_grad_()
    distkern.mahalanobis(e, mean, L).sum().backward()
    assert e.grad.shape == (0, D)

    x = torch.randn(6, D, generator=rng).to(device)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    x[4, 11] = -float("inf")
    out = distkern.mahalanobis(x, mean, L)
    bad = torch.tensor([False, True, False, True, True, False])
    assert bool(out[bad.to(device)].isnan().all())
    ok = ~bad.to(device)
    assert rel_err(out[ok], reference(x[ok], mean, L)) < 2e-5


def test_bad_inputs():
    D = 4
    x = torch.randn(5, D)
    mean = torch.zeros(D)
    L = torch.eye(D)
    op = distkern.mahalanobis
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        op(torch.randn(5), mean, L)
    with pytest.raises(ValueError, match="mean must have D = 4"):
        op(x, torch.zeros(5), L)
    with pytest.raises(ValueError, match="factor must have D = 4 rows"):
        op(x, mean, torch.eye(5))
    with pytest.raises(ValueError, match="square lower-triangular"):
        op(x, mean, torch.randn(D, 3))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64; got Int"):
        op(torch.ones(5, D, dtype=torch.int32), mean, L)
    with pytest.raises(TypeError, match="mean must be float"):
        op(x, torch.zeros(D, dtype=torch.int64), L)
    with pytest.raises(ValueError, match="lower-triangular"):
        op(x, mean, torch.ones(D, D))
    with pytest.raises((ValueError, RuntimeError), match="one device|is on"):
        op(x, mean.to("meta"), L)
    with pytest.raises(ValueError, match="mean must be a 1-D"):
        op(x, torch.zeros(1, D), L)


@pytest.mark.cuda
def test_cuda_mean_on_cpu_is_refused():
    x = torch.randn(5, 4, device="cuda")
    with pytest.raises(ValueError, match="mean is on cpu but x is on cuda"):
        distkern.mahalanobis(x, torch.zeros(4), torch.eye(4, device="cuda"))


@pytest.mark.cuda
def test_cuda_sanitizer_case():
    """Small case run under compute-sanitizer by benchmarks/gpu_check.sh: every launch of the op."""
    g = torch.Generator().manual_seed(0)
    for N, D in [(1, 1), (67, 33), (130, 65)]:
        mean, cov = random_gaussian(D, g, "cuda")
        L = whitening_factor(cov)
        x = torch.randn(N, D, generator=g).to("cuda", torch.bfloat16)[:, :].requires_grad_()
        out = distkern.mahalanobis(x, mean.float(), L)
        out.sum().backward()
        out2 = distkern.mahalanobis(x.detach().float(), mean.float(), torch.randn(D, 3, device="cuda"), lower=False)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(out2).all()


@pytest.mark.cuda
def test_cuda_matches_cpu_large(rng):
    N, D = 20000, 256
    mean, cov = random_gaussian(D, rng)
    L = whitening_factor(cov)
    x = torch.randn(N, D, generator=rng)
    cpu = distkern.mahalanobis(x, mean.float(), L)
    gpu = distkern.mahalanobis(x.cuda(), mean.float().cuda(), L.cuda())
    assert rel_err(gpu.cpu(), cpu.double()) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", [1, 2])  # the tile kernel, Gram panels (centring + cuBLAS + row sums)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,R", [(1, 1, None), (20000, 520, None), (5000, 300, 130), (40000, 64, None)])
def test_cuda_schedules_match_float64(schedule, dtype, N, D, R, rng):
    """Both CUDA forward schedules against float64 whatever D the automatic one would pick for: several row
    panels (20000 × 520 floats is over one 32 MiB panel), a triangular factor in column blocks, a general
    (D, R) factor, column-major x, a non-finite row; the gradient (the tile kernel's backward either way)."""
    mean, cov = random_gaussian(D, rng)
    W = whitening_factor(cov) if R is None else torch.randn(D, R, generator=rng) / D**0.5
    x = (mean + torch.randn(N, D, generator=rng, dtype=torch.float64)).to(dtype)
    if N > 7:
        x[7, D // 3] = float("nan")
    xs = x.cuda().T.contiguous().T if D % 2 == 0 else x.cuda()
    with cuda_schedule("mahalanobis", schedule):
        out = distkern.mahalanobis(xs, mean.float().cuda(), W.cuda(), lower=R is None)
        xg = x[: min(N, 300)].cuda().float().requires_grad_()
        distkern.mahalanobis(xg, mean.float().cuda(), W.cuda(), lower=R is None).sum().backward()
    ref = reference(x, mean, W).cuda()
    ok = torch.isfinite(ref)
    assert out[~ok].isnan().all() and rel_err(out[ok], ref[ok]) < 2e-5
    xr = x[: min(N, 300)].double().requires_grad_()
    reference(xr, mean, W).sum().backward()
    keep = torch.isfinite(xr.grad).all(1).cuda()
    assert rel_err(xg.grad[keep], xr.grad.cuda()[keep]) < 1e-5
    with pytest.raises(ValueError, match="set_mahalanobis_schedule"):
        distkern._C.set_mahalanobis_schedule(3)


@pytest.mark.parametrize("D", [1, 7, 8, 13, 67])
@pytest.mark.parametrize("strided", [False, True])
def test_non_finite_guard_in_every_lane(D, strided, rng):
    """The CPU centring sums its NaN guard in eight chains (common/cpu_reduce.h): a non-finite value in
    any lane of a block of 8, in the tail, or in a strided row still makes the row NaN, and only it."""
    L = torch.linalg.cholesky(torch.eye(D, dtype=torch.float64) * 2).float()
    mu = torch.randn(D, generator=rng)
    x = torch.randn(D, 40, generator=rng).T if strided else torch.randn(40, D, generator=rng)
    bad = {1: (0, float("nan")), 5: (D - 1, float("inf")), 9: (D // 2, float("-inf"))}
    for r, (c, v) in bad.items():
        x[r, c] = v
    out = distkern.mahalanobis(x, mu, L)
    ref = (((x.double() - mu.double()) @ L.double()) ** 2).sum(1)
    rows = list(bad)
    assert torch.isnan(out[rows]).all()
    keep = torch.ones(40, dtype=torch.bool)
    keep[rows] = False
    assert torch.allclose(out[keep].double(), ref[keep], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_column_major_rows_gathered(dtype, rng):
    """x = (D, N)ᵀ, rows a column apart: the CPU tiles centre 64 rows at a time along the column. Same bits
    as the contiguous copy; a non-finite entry gives NaN in its own row only."""
    D, N = 37, 333
    mean, cov = random_gaussian(D, rng, "cpu")
    L = whitening_factor(cov)
    xt = torch.randn(D, N, generator=rng, dtype=torch.float64).to(dtype)
    x = xt.T
    out = distkern.mahalanobis(x, mean, L)
    assert torch.equal(out, distkern.mahalanobis(x.contiguous(), mean, L))
    assert rel_err(out, reference(x, mean, L)) < TOL[dtype]
    xt[5, 70] = float("nan")
    xt[0, N - 1] = float("inf")
    out = distkern.mahalanobis(xt.T, mean, L)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[70, N - 1]] = True
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()
