"""distkern.mahalanobis_k (K Gaussians, shared or per-component factors, fused min / logsumexp)."""
import math

import pytest
import torch

import distkern
from distkern.gaussian import whitening_factor
from cuda_refs import cuda_schedule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def random_mixture(K, D, gen, device="cpu", shared=False, spread=3.0):
    A = torch.randn(1 if shared else K, D, D, generator=gen, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    means = spread * torch.randn(K, D, generator=gen, dtype=torch.float64)
    L = whitening_factor(cov, dtype=torch.float64)
    return means.to(device), (L[0] if shared else L).to(device)


def reference(x, means, factors):
    """float64 (N, K) squared distances, K separate products."""
    W = factors.double()
    if W.dim() == 2:
        W = W.expand(means.shape[0], -1, -1)
    z = torch.einsum("nkd,kdr->nkr", x.double()[:, None, :] - means.double()[None], W)
    return (z * z).sum(-1)


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,K", [(1, 1, 1), (37, 5, 3), (300, 70, 11), (130, 65, 70)])
def test_all_reductions_match_reference(device, shared, dtype, N, D, K, rng):
    means, L = random_mixture(K, D, rng, device, shared)
    x = (means[torch.randint(K, (N,), generator=rng).to(device)] + torch.randn(N, D, generator=rng, dtype=torch.float64).to(device)).to(dtype)
    f = L if dtype == torch.float64 else L.float()
    if dtype != torch.float64:
        means = means.float()  # the op rounds the means to float32: compare on the rounded ones
    ref = reference(x, means, f)
    # the shared-factor expansion loses ~1e-7·(‖z‖² + ‖v‖²) in float32
    tol = 1e-10 if dtype == torch.float64 else (1e-4 if shared else 2e-5)
    d2 = distkern.mahalanobis_k(x, means, f)
    assert d2.shape == (N, K) and d2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(d2, ref) < tol and bool((d2 >= 0).all())
    mn = distkern.mahalanobis_k(x, means, f, reduce="min")
    assert rel(mn.values, ref.min(1).values) < tol
    # the argmin agrees wherever the two nearest components are not within rounding of each other
    if K > 1:
        top2 = ref.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * top2[:, 1]
    else:
        clear = torch.ones(N, dtype=torch.bool, device=ref.device)
    assert torch.equal(mn.indices[clear], ref.argmin(1)[clear])
    assert mn.indices.dtype == torch.int64
    bias = torch.randn(K, generator=rng, dtype=torch.float64).to(device)
    lse = distkern.mahalanobis_k(x, means, f, reduce="logsumexp", bias=bias)
    # error relative to the size of the terms (|bias| + d²/2), not of the result: bias − d²/2 can cancel
    # to near 0 (one row, one component), where float32 terms leave a tiny absolute but a large relative error
    ref_lse = torch.logsumexp(bias - 0.5 * ref, dim=1)
    scale = (bias.abs()[None] + 0.5 * ref).amax(1)
    assert float((lse.double() - ref_lse).norm() / scale.norm().clamp_min(1e-300)) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_strided_x_and_general_factors(device, shared, rng):
    K, D, R = 6, 40, 13
    means = torch.randn(K, D, generator=rng).to(device)
    W = torch.randn(*(() if shared else (K,)), D, R, generator=rng).to(device)
    base = torch.randn(2 * D, 300, generator=rng).to(device)
    x = base.T[::2, ::2]
    assert not x.is_contiguous()
    ref = reference(x, means, W)
    assert rel(distkern.mahalanobis_k(x, means, W, lower=False), ref) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_log_likelihood_matches_sklearn(device, rng):
    mixture = pytest.importorskip("sklearn.mixture")
    import numpy as np

    D = 6
    data = torch.cat([torch.randn(200, D, generator=rng, dtype=torch.float64) + 4 * i for i in range(3)])
    for cov_type in ("full", "tied"):
        gm = mixture.GaussianMixture(3, covariance_type=cov_type, random_state=0).fit(data.numpy())
        L = whitening_factor(torch.tensor(gm.covariances_), dtype=None).to(device)
        x = torch.randn(50, D, generator=rng, dtype=torch.float64) * 5
        ll = distkern.gmm_log_likelihood(x.to(device), torch.tensor(gm.means_).to(device), L,
                                         torch.tensor(np.log(gm.weights_)).to(device))
        assert torch.allclose(ll.cpu(), torch.tensor(gm.score_samples(x.numpy())), rtol=1e-10, atol=1e-10)
        ll32 = distkern.gmm_log_likelihood(x.float().to(device), torch.tensor(gm.means_).to(device), L.float())
        assert ll32.dtype == torch.float32 and torch.isfinite(ll32).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck(device, shared, rng):
    N, D, K = 11, 4, 3
    means, L = random_mixture(K, D, rng, device, shared, spread=1.0)
    x = torch.randn(N, D, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    m = means.clone().requires_grad_()
    b = torch.randn(K, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: distkern.mahalanobis_k(a, c, L), (x, m))
    assert torch.autograd.gradcheck(lambda a, c: distkern.mahalanobis_k(a, c, L, reduce="min").values, (x, m))
    assert torch.autograd.gradcheck(lambda a, c, d: distkern.mahalanobis_k(a, c, L, reduce="logsumexp", bias=d), (x, m, b))
    # second derivatives (the per-component factors go through the backward op's own autograd)
    assert torch.autograd.gradgradcheck(lambda a, c: distkern.mahalanobis_k(a, c, L), (x, m))
    assert torch.autograd.gradgradcheck(lambda a, c: distkern.mahalanobis_k(a, c, L, reduce="min").values, (x, m))
    assert torch.autograd.gradgradcheck(
        lambda a, c, d: distkern.mahalanobis_k(a, c, L, reduce="logsumexp", bias=d), (x, m, b))


def test_opcheck(rng):
    means, L = random_mixture(4, 9, rng)
    x = torch.randn(20, 9, generator=rng)
    ops = torch.ops.distkern
    for f in (L[0].float(), L.float()):
        torch.library.opcheck(ops.mahalanobis_k.default, (x, means.float(), f, True))
        torch.library.opcheck(ops.mahalanobis_k_min.default, (x, means.float(), f, True))
        torch.library.opcheck(ops.mahalanobis_k_logsumexp.default, (x, means.float(), f, torch.zeros(4), True))


def test_compile(rng):
    means, L = random_mixture(5, 8, rng, shared=True)
    means, L = means.float(), L.float()
    score = torch.compile(lambda x: distkern.mahalanobis_k(x, means, L, reduce="min").values.sqrt(), fullgraph=True, backend="aot_eager")
    x = torch.randn(30, 8, generator=rng)
    assert torch.allclose(score(x), reference(x, means, L).min(1).values.sqrt().float(), rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_nonfinite_rows_and_empty(device, shared, rng):
    means, L = random_mixture(4, 6, rng, device, shared)
    L = L.float()
    x = torch.randn(5, 6, generator=rng).to(device)
    x[2, 1] = float("inf")
    x[4, 0] = float("nan")
    bad = torch.tensor([False, False, True, False, True], device=device)
    d2 = distkern.mahalanobis_k(x, means, L)
    assert d2[bad].isnan().all() and torch.isfinite(d2[~bad]).all()
    assert distkern.mahalanobis_k(x, means, L, reduce="min").values[bad].isnan().all()
    assert distkern.mahalanobis_k(x, means, L, reduce="logsumexp", bias=torch.zeros(4, device=device))[bad].isnan().all()
    e = torch.empty(0, 6, device=device)
    assert distkern.mahalanobis_k(e, means, L).shape == (0, 4)
    assert distkern.mahalanobis_k(e, means, L, reduce="min").indices.shape == (0,)


def test_bad_inputs():
    x, means, L = torch.randn(5, 4), torch.randn(3, 4), torch.eye(4)
    f = distkern.mahalanobis_k
    with pytest.raises(ValueError, match="means must be a 2-D tensor of shape \\(K, D\\)"):
        f(x, torch.randn(4), L)
    with pytest.raises(ValueError, match="means must be \\(K, D\\) with D = 4"):
        f(x, torch.randn(3, 5), L)
    with pytest.raises(ValueError, match="factors must have K = 3 components"):
        f(x, means, torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match="one shared \\(D, R\\) factor or one per component"):
        f(x, means, torch.eye(4)[None, None])
    with pytest.raises(ValueError, match=r"factors\[1\] must be lower-triangular"):
        f(x, means, torch.stack([torch.eye(4), torch.ones(4, 4), torch.eye(4)]))
    with pytest.raises(ValueError, match="bias must have K = 3"):
        f(x, means, L, reduce="logsumexp", bias=torch.zeros(2))
    with pytest.raises(ValueError, match="needs bias"):
        f(x, means, L, reduce="logsumexp")
    with pytest.raises(ValueError, match="reduce must be"):
        f(x, means, L, reduce="max")
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.long(), means, L)
    with pytest.raises(RuntimeError, match="gradients with respect to factors are not implemented"):
        f(x, means, L.clone().requires_grad_()).sum().backward()


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", [1, 2])  # ‖z‖² by the tile kernel / by Gram panels (cuBLAS)
def test_cuda_shared_factor_schedules(schedule, rng):
    """The tied form's ‖Wᵀ(x − μ̄)‖² term goes through the single-Gaussian forward's schedule: both against float64,
    at a D where the automatic one takes the Gram panels, with a non-finite row."""
    N, D, K = 5000, 520, 7
    means, L = random_mixture(K, D, rng, shared=True)
    x = means[torch.randint(K, (N,), generator=rng)] + torch.randn(N, D, generator=rng, dtype=torch.float64)
    x[11, 3] = float("inf")
    x, means, L = x.float(), means.float(), L.float()
    ref = reference(x, means, L)
    with cuda_schedule("mahalanobis", schedule):
        d2 = distkern.mahalanobis_k(x.cuda(), means.cuda(), L.cuda())
        mn = distkern.mahalanobis_k(x.cuda(), means.cuda(), L.cuda(), reduce="min")
    ok = torch.isfinite(x).all(1)
    assert d2[11].isnan().all() and mn.values[11].isnan()
    assert rel(d2[ok].cpu(), ref[ok]) < 1e-4 and rel(mn.values[ok].cpu(), ref[ok].min(1).values) < 1e-4


@pytest.mark.cuda
def test_cuda_sanitizer_case_k():
    """Small K-Gaussian cases for compute-sanitizer (benchmarks/gpu_check.sh, -k sanitizer)."""
    g = torch.Generator().manual_seed(1)
    for shared in (True, False):
        for N, D, K in [(1, 1, 1), (67, 33, 5), (130, 65, 70)]:
            means, L = random_mixture(K, D, g, "cuda", shared)
            x = torch.randn(N, D, generator=g).to("cuda", torch.bfloat16).requires_grad_()
            d2 = distkern.mahalanobis_k(x, means.float(), L.float())
            mn = distkern.mahalanobis_k(x, means.float(), L.float(), reduce="min")
            ls = distkern.mahalanobis_k(x, means.float(), L.float(), reduce="logsumexp", bias=torch.zeros(K, device="cuda"))
            (d2.sum() + mn.values.sum() + ls.sum()).backward()
            torch.cuda.synchronize()
            assert torch.isfinite(d2).all() and torch.isfinite(x.grad).all()


def test_logsumexp_with_infinite_log_weights_matches_torch(rng):
    """Two +inf log-weights: inf, as torch.logsumexp (exp(inf − inf) used to make it NaN); all −inf: −inf."""
    x = torch.randn(5, 3, generator=rng)
    means, L = torch.randn(3, 3, generator=rng), torch.eye(3)
    d2 = distkern.mahalanobis_k(x, means, L)
    for b in ([math.inf, math.inf, 0.0], [-math.inf] * 3, [math.inf, -math.inf, 1.0]):
        b = torch.tensor(b)
        assert torch.equal(distkern.mahalanobis_k(x, means, L, reduce="logsumexp", bias=b),
                           torch.logsumexp(b - 0.5 * d2, 1))


def test_gmm_log_likelihood_names_mismatched_shapes():
    x, m = torch.randn(5, 3), torch.randn(4, 3)
    F = torch.eye(3).expand(4, 3, 3).contiguous()
    with pytest.raises(ValueError, match="log_weights must be \\(K,\\) = \\(4,\\)"):
        distkern.gmm_log_likelihood(x, m, F, torch.zeros(3))
    with pytest.raises(ValueError, match="factors must be .* \\(2, 3, 3\\)"):
        distkern.gmm_log_likelihood(x, m[:2], F)
