"""distkern.mahalanobis_pos (one Gaussian per position, PaDiM) against float64 and anomalib's formula."""
import pytest
import torch

import distkern
from distkern.gaussian import whitening_factor
from cuda_refs import cuda_schedule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_positions(P, D, gen, device="cpu"):
    A = torch.randn(P, D, D + 3, generator=gen, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / D + 0.01 * torch.eye(D, dtype=torch.float64)  # anomalib adds 0.01·I
    means = torch.randn(P, D, generator=gen, dtype=torch.float64)
    return means.to(device), cov.to(device), whitening_factor(cov, dtype=None).to(device)


def reference(x, means, factors):
    z = torch.einsum("bpd,pdr->bpr", x.double() - means.double(), factors.double())
    return (z * z).sum(-1)


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,P,D", [(1, 1, 1), (3, 5, 7), (32, 9, 70), (70, 4, 33)])
def test_matches_reference(device, xdtype, fdtype, B, P, D, rng):
    means, cov, L = random_positions(P, D, rng, device)
    x = (means + torch.randn(B, P, D, generator=rng, dtype=torch.float64).to(device)).to(xdtype)
    f = L.to(fdtype).contiguous()
    out = distkern.mahalanobis_pos(x, means.float(), f)
    assert out.shape == (B, P) and out.dtype == torch.float32
    # reference on the same (rounded) inputs and factors
    assert rel(out, reference(x, means.float(), f)) < 2e-5
    assert bool((out >= 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_anomalib_layout_and_formula(device, rng):
    """anomalib: embedding (B, C, H, W), inverse covariance (HW, C, C), ((δ @ inv) * δ).sum."""
    B, C, H, W = 4, 12, 3, 5
    means, cov, L = random_positions(H * W, C, rng, device)
    emb = torch.randn(B, C, H, W, generator=rng, dtype=torch.float64).to(device)
    inv = torch.linalg.inv(cov)
    delta = (emb.reshape(B, C, H * W) - means.T).permute(2, 0, 1)
    anomalib = (torch.matmul(delta, inv) * delta).sum(2).permute(1, 0)
    x = emb.float().flatten(2).transpose(1, 2)  # (B, HW, C) view, not contiguous
    assert not x.is_contiguous()
    out = distkern.mahalanobis_pos(x, means.float(), L.float())
    assert rel(out, anomalib) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_general_factors_and_float64(device, rng):
    B, P, D, R = 5, 6, 20, 7
    W = torch.randn(P, D, R, generator=rng, dtype=torch.float64).to(device)
    means = torch.randn(P, D, generator=rng, dtype=torch.float64).to(device)
    x = torch.randn(B, P, D, generator=rng, dtype=torch.float64).to(device)
    assert rel(distkern.mahalanobis_pos(x, means, W, lower=False), reference(x, means, W)) < 1e-12
    assert rel(distkern.mahalanobis_pos(x.float(), means, W.float(), lower=False), reference(x.float(), means, W.float())) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_opcheck(device, rng):
    means, cov, L = random_positions(3, 4, rng, device)
    x = torch.randn(5, 3, 4, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    m = means.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: distkern.mahalanobis_pos(a, b, L), (x, m))
    torch.library.opcheck(torch.ops.distkern.mahalanobis_pos.default, (x.detach().float(), means.float(), L.float(), True))


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_and_empty(device, rng):
    means, cov, L = random_positions(4, 6, rng, device)
    x = torch.randn(3, 4, 6, generator=rng).to(device)
    x[1, 2, 3] = float("nan")
    out = distkern.mahalanobis_pos(x, means.float(), L.float())
    assert out[1, 2].isnan() and torch.isfinite(out.flatten()[torch.arange(12, device=device) != 6]).all()
    assert distkern.mahalanobis_pos(x[:0], means.float(), L.float()).shape == (0, 4)


def test_bad_inputs(rng):
    means, cov, L = random_positions(4, 6, rng)
    x, m, f = torch.randn(2, 4, 6), means.float(), L.float()
    op = distkern.mahalanobis_pos
    with pytest.raises(ValueError, match="x must be a 3-D tensor of shape \\(B, P, D\\)"):
        op(x[0], m, f)
    with pytest.raises(ValueError, match="means must be \\(P, D\\) = \\(4, 6\\)"):
        op(x, m[:3], f)
    with pytest.raises(ValueError, match="factors must be contiguous"):
        op(x, m, f.transpose(1, 2))
    with pytest.raises(ValueError, match=r"factors\[2\] must be lower-triangular"):
        bad = f.clone()
        bad[2, 0, 5] = 1.0
        op(x, m, bad)
    with pytest.raises(TypeError, match="float64 exactly when x is float64"):
        op(x, m, f.double())


@pytest.mark.cuda
def test_cuda_sanitizer_case_pos():
    g = torch.Generator().manual_seed(2)
    for B, P, D in [(1, 1, 1), (33, 7, 65), (70, 3, 20)]:
        means, cov, L = random_positions(P, D, g, "cuda")
        x = torch.randn(B, P, D, generator=g).to("cuda", torch.bfloat16)
        out = distkern.mahalanobis_pos(x, means.float(), L.to(torch.bfloat16).contiguous())
        # the Gram panels (float32 factors), both centring kernels: contiguous x and an embedding's view
        with cuda_schedule("mahalanobis", 2):
            for xs in (x, x.permute(0, 2, 1).contiguous().permute(0, 2, 1)):
                out2 = distkern.mahalanobis_pos(xs, means.float(), L.float().contiguous())
                assert torch.isfinite(out2).all()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", [0, 1, 2])  # automatic, the tile kernel, Gram panels (batched cuBLAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,P,D,lower", [(1, 1, 1, True), (32, 600, 520, True), (17, 40, 300, False),
                                         (3, 70, 64, True)])
def test_cuda_schedules_match_float64_per_position(schedule, dtype, B, P, D, lower, rng):
    """mahalanobis_pos under each CUDA schedule against float64: anomalib's (B, P, D) view of a (B, D, P)
    embedding (the panels' transposing centring) and a contiguous x, several panels (600 × 32 × 520 floats
    exceed one 32 MiB buffer), triangular factors in column blocks, general (D, R) ones, a non-finite entry;
    16-bit factors, which the panels leave to the tile kernel, under every schedule."""
    means = torch.randn(P, D, generator=rng).cuda()
    if lower:  # triangular factors with a dominant diagonal (P of them: no factorisation needed to make them)
        W = (torch.randn(P, D, D, generator=rng) / D**0.5).tril() + torch.eye(D)
    else:
        W = torch.randn(P, D, D // 2 + 1, generator=rng) / D**0.5
    x = (means + torch.randn(B, P, D, generator=rng).cuda()).to(dtype)
    if B * P > 5:
        x[B - 1, P // 3, D // 2] = float("nan")
    for fdtype in (torch.float32, torch.bfloat16):
        Wd = W.to(fdtype).contiguous().cuda()  # the reference uses the same (rounded) factors, in float64
        z = torch.bmm((x.double() - means.double()).transpose(0, 1), Wd.double())  # (P, B, R)
        ref = z.square().sum(-1).T
        ok = torch.isfinite(ref)
        for xs in (x, x.permute(0, 2, 1).contiguous().permute(0, 2, 1)):
            with cuda_schedule("mahalanobis", schedule):
                out = distkern.mahalanobis_pos(xs, means, Wd, lower=lower)
            assert out[~ok].isnan().all() and rel(out[ok], ref[ok]) < 2e-5, (xs.stride(), fdtype)


@pytest.mark.parametrize("fdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upper_triangle_check_every_factor_dtype(rng, fdtype):
    # the vectorised check reads bit patterns: -0.0 counts as zero, any other value (also tiny or NaN) is refused
    means, cov, L = random_positions(3, 5, rng)
    x, m = torch.randn(2, 3, 5), means.float()
    f = L.to(fdtype).clone()
    f[1].triu_(1).mul_(-0.0)  # the strict upper triangle of factor 1 set to -0.0 (lower part kept below)
    f[1] += L[1].to(fdtype).tril()
    ok = distkern.mahalanobis_pos(x, m, f)
    assert torch.isfinite(ok).all()
    for bad_value in (1e-30 if fdtype == torch.float32 else 1e-3, float("nan")):
        bad = f.clone()
        bad[1, 0, 4] = bad_value
        with pytest.raises(ValueError, match=r"factors\[1\] must be lower-triangular"):
            distkern.mahalanobis_pos(x, m, bad)


def test_every_cpu_product_path_agrees(with_and_without_avx512):
    """The streamed triangular products (the next position's factor prefetched) on the automatic kernel, the
    AVX2 one (which takes them on CPUs without AVX-512, and everywhere with DISTKERN_CPU_GEMM=avx2) and torch's
    BLAS: each within float32 rounding of float64, at sizes with partial register tiles and panels."""
    code = (
        "import torch, sys, distkern\n"
        "from distkern.gaussian import whitening_factor\n"
        "g = torch.Generator().manual_seed(11)\n"
        "outs = []\n"
        "for B, P, D in ((32, 6, 100), (7, 3, 53), (13, 4, 17)):\n"
        "    A = torch.randn(P, D, D + 3, generator=g, dtype=torch.float64)\n"
        "    L = whitening_factor(A @ A.transpose(1, 2) / D + 0.01 * torch.eye(D, dtype=torch.float64), dtype=None)\n"
        "    mu = torch.randn(P, D, generator=g, dtype=torch.float64)\n"
        "    x = mu + torch.randn(B, P, D, generator=g, dtype=torch.float64)\n"
        "    z = torch.einsum('bpd,pdr->bpr', x - mu, L)\n"
        "    outs.append((distkern.mahalanobis_pos(x.float(), mu.float(), L.float()), (z * z).sum(-1)))\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    for run in with_and_without_avx512(code):
        for out, ref in run:
            assert rel(out, ref) < 2e-5


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,P,D", [(5, 37, 70), (300, 11, 100), (2, 70, 1)])
def test_embedding_layout_gathered(xdtype, B, P, D, rng):
    """x as a (B, P, D) view of a (B, D, P) embedding (anomalib's layout): the CPU op centres blocks of
    positions at once (up to 16, fewer when B·D is large), reading along the positions. Same bits as the
    contiguous copy, and the float64 reference; a non-finite entry poisons its own (image, position) only,
    in every block."""
    means, cov, L = random_positions(P, D, rng)
    emb = (means.T + torch.randn(B, D, P, generator=rng, dtype=torch.float64)).to(xdtype).contiguous()
    x = emb.transpose(1, 2)
    assert x.stride(1) == 1
    out = distkern.mahalanobis_pos(x, means.float(), L.float())
    assert torch.equal(out, distkern.mahalanobis_pos(x.contiguous(), means.float(), L.float()))
    assert rel(out, reference(x, means.float(), L.float())) < 2e-5
    bad = [(0, 0, 0), (B - 1, P - 1, D - 1), (B // 2, min(17, P - 1), D // 2)]
    for (b, p, d), v in zip(bad, (float("nan"), float("inf"), float("-inf"))):
        emb[b, d, p] = v
    out = distkern.mahalanobis_pos(emb.transpose(1, 2), means.float(), L.float())
    hit = torch.zeros(B, P, dtype=torch.bool)
    for b, p, _ in bad:
        hit[b, p] = True
    assert out[hit].isnan().all() and torch.isfinite(out[~hit]).all()
