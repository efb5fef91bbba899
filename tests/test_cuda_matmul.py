"""The CUDA matmul modes of the tile-product kernels (distkern.precision): the setting itself
(CPU), and on a GPU every op built on the skeleton in each mode against float64 — FMA and 3xTF32
at float32 accuracy, TF32 within its rounding, and TF32 measurably coarser than 3xTF32 on float32
data (so the tensor-core path is the one that ran)."""
import os
import subprocess
import sys

import pytest
import torch

import distkern
from distkern.precision import MODES

from cuda_refs import check_k, cuda_schedule, factors as _factors, rel as _rel

HAS_CUDA = torch.cuda.is_available() and hasattr(distkern._C, "set_cuda_tile_config")


def test_modes_roundtrip_and_restore():
    assert distkern.get_cuda_matmul() == "auto"
    for m in MODES:
        with distkern.cuda_matmul(m):
            assert distkern.get_cuda_matmul() == m
        assert distkern.get_cuda_matmul() == "auto"
    with pytest.raises(ValueError, match="3xtf32"):
        distkern.set_cuda_matmul("bf16")
    with pytest.raises(RuntimeError):
        with distkern.cuda_matmul("fma"):
            raise RuntimeError("inside")
    assert distkern.get_cuda_matmul() == "auto"
    assert distkern.build_info()["cuda_matmul"] == "auto"


def test_env_var_sets_mode_and_rejects_unknown():
    env = dict(os.environ, DISTKERN_CUDA_MATMUL="3xtf32", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", "import distkern; print(distkern.get_cuda_matmul())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3xtf32", out.stderr
    env["DISTKERN_CUDA_MATMUL"] = "fast"
    out = subprocess.run([sys.executable, "-c", "import distkern"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DISTKERN_CUDA_MATMUL must be one of" in out.stderr


def test_cpu_results_do_not_depend_on_the_mode():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 33, generator=g), torch.randn(50, 33, generator=g)
    base = distkern.kernel_matmul(x, y, bandwidth=3.0)
    for m in MODES:
        with distkern.cuda_matmul(m):
            assert torch.equal(distkern.kernel_matmul(x, y, bandwidth=3.0), base)


# ---- on a GPU -----------------------------------------------------------------------------------

cuda = pytest.mark.cuda
TOL = {"fma": 2e-5, "3xtf32": 2e-5, "tf32": 5e-3}


@pytest.fixture(params=["fma", "tf32", "3xtf32"])
def mode(request):
    if not HAS_CUDA:
        pytest.skip("needs a GPU and a CUDA build of distkern")
    with distkern.cuda_matmul(request.param):
        yield request.param


@cuda
@pytest.mark.parametrize("N,D", [(1, 3), (127, 129), (1000, 70), (4099, 256)])
def test_single_and_backward(mode, N, D):
    g = torch.Generator().manual_seed(N + D)
    L = _factors(1, D, g)[0].float()
    mu = torch.randn(D, generator=g)
    x = torch.randn(N, D, generator=g) + mu
    ref = (((x.double() - mu.double()) @ L.double()) ** 2).sum(1)
    xc = x.cuda().detach().requires_grad_()
    out = distkern.mahalanobis(xc, mu.cuda(), L.cuda())
    assert _rel(out, ref) < TOL[mode]
    out.sum().backward()
    xr = x.detach().double().requires_grad_()
    (((xr - mu.double()) @ L.double()) ** 2).sum().backward()
    assert _rel(xc.grad, xr.grad) < 2 * TOL[mode]
    for dt in (torch.float16, torch.bfloat16):
        xd = x.to(dt)
        refd = (((xd.double() - mu.double()) @ L.double()) ** 2).sum(1)
        assert _rel(distkern.mahalanobis(xd.cuda(), mu.cuda(), L.cuda()), refd) < TOL[mode]


@cuda
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N,D,K", [(130, 33, 3), (600, 64, 150)])
def test_k(mode, shared, N, D, K):
    # the tied form combines ‖z‖² − 2 z·v + ‖v‖²: TF32's error on the cross term is relative to ‖z‖‖v‖
    check_k(N, D, K, shared, TOL[mode] * (20 if shared else 1))


@cuda
@pytest.mark.parametrize("B,P,D", [(33, 5, 130), (130, 3, 64)])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.bfloat16])
def test_positions(mode, B, P, D, fdtype):
    g = torch.Generator().manual_seed(B + P + D)
    L = _factors(P, D, g).to(fdtype)
    mu = torch.randn(P, D, generator=g)
    x = torch.randn(B, P, D, generator=g) + mu
    z = torch.einsum("bpd,pdr->bpr", x.double() - mu.double(), L.double())
    out = distkern.mahalanobis_pos(x.cuda(), mu.cuda(), L.cuda())
    assert _rel(out, (z * z).sum(-1)) < TOL[mode]


def _mode_errors(N, D, seed):
    """The mahalanobis forward's error against float64 in each matmul mode, on float32 data."""
    g = torch.Generator().manual_seed(seed)
    L = _factors(1, D, g)[0].float()
    x = torch.randn(N, D, generator=g)
    ref = ((x.double() @ L.double()) ** 2).sum(1)
    err = {}
    for m in ("fma", "tf32", "3xtf32"):
        with distkern.cuda_matmul(m):
            err[m] = _rel(distkern.mahalanobis(x.cuda(), torch.zeros(D).cuda(), L.cuda()), ref)
    return err


@cuda
@pytest.mark.parametrize("N,M,D", [(1, 1, 7), (300, 129, 64), (2000, 777, 200)])
def test_nearest(mode, N, M, D):
    g = torch.Generator().manual_seed(N + M + D)
    x, refs = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    sim = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(refs.double(), dim=1).T
    with cuda_schedule("nearest", 1):
        res = distkern.nearest_reference(x.cuda(), refs.cuda())
    best = sim.max(1).values
    assert _rel(res.similarity, best) < TOL[mode]
    # the chosen reference is (one of) the best up to the mode's rounding
    picked = sim.gather(1, res.indices.cpu()[:, None])[:, 0]
    assert float((best - picked).max()) < (1e-5 if mode != "tf32" else 5e-3)


@cuda
@pytest.mark.parametrize("kernel,kw", [("gaussian", dict(bandwidth=[4.0, 8.0])), ("laplacian", dict(bandwidth=6.0)),
                                       ("polynomial", {}), ("distance", {})])
@pytest.mark.parametrize("N,M,D,C", [(1, 1, 3, 1), (200, 130, 64, 1), (1000, 513, 300, 3),
                                     (2100, 9000, 40, 100)])  # C > 64: K panels (two row and two column panels) + GEMMs
def test_kernel_matmul(mode, kernel, kw, N, M, D, C):
    g = torch.Generator().manual_seed(N + M + D)
    x, y = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g) + 0.3
    v = torch.randn(M, C, generator=g)
    ref = distkern.kernel_matmul(x.double(), y.double(), v.double(), kernel=kernel, **kw)
    with cuda_schedule("kernel_sum", 1):
        out = distkern.kernel_matmul(x.cuda(), y.cuda(), v.cuda(), kernel=kernel, **kw)
    assert _rel(out, ref) < (5e-5 if mode != "tf32" else 2e-2)


@cuda
@pytest.mark.parametrize("mode", ["fma", "3xtf32"])
def test_kernel_matmul_panel_gemm_stays_fp32_when_torch_allows_tf32(mode):
    """C > 64 runs K panels + a cuBLAS GEMM: in the float32-accurate modes that GEMM must not take TF32
    from torch's global allow_tf32 (it would leave ~1e-3 errors in every column of v)."""
    if not HAS_CUDA:
        pytest.skip("needs a GPU and a CUDA build of distkern")
    g = torch.Generator().manual_seed(17)
    x, y, v = torch.randn(600, 32, generator=g), torch.randn(900, 32, generator=g), torch.randn(900, 100, generator=g)
    ref = distkern.kernel_matmul(x.double(), y.double(), v.double(), kernel="gaussian", bandwidth=4.0)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with distkern.cuda_matmul(mode):
            out = distkern.kernel_matmul(x.cuda(), y.cuda(), v.cuda(), kernel="gaussian", bandwidth=4.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert _rel(out, ref) < 5e-5


@cuda
def test_gram_panels_take_tf32_only_in_tf32_mode():
    """The Gram panels' cuBLAS products (the mahalanobis forward here, forced at D = 520) must not take TF32 from
    torch's global allow_tf32 in the float32-accurate modes, and do take it in "tf32" (with torch allowing it)."""
    if not HAS_CUDA or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ GPU and a CUDA build of distkern")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with cuda_schedule("mahalanobis", 2):
            err = _mode_errors(5000, 520, 18)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert err["fma"] < 2e-6 and err["3xtf32"] < 2e-6, err
    assert err["tf32"] > 20 * err["fma"], err  # TF32's rounding shows: the products did run in TF32


@cuda
@pytest.mark.parametrize("L,B,P,D,K", [(1, 1, 1, 3, 1), (2, 3, 70, 65, 30), (4, 2, 37, 130, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_anomaly_map(mode, L, B, P, D, K, dtype):
    from distkern.ops import align

    g = torch.Generator().manual_seed(L + B + P + D + K)
    patches = torch.randn(L, B, P, D, generator=g).to(dtype)
    text = torch.randn(L, K, 2, D, generator=g)
    ref = align.anomaly_map(patches.double(), text.double(), 14.3)
    out = align.anomaly_map(patches.cuda(), text.cuda(), 14.3)
    assert float((out.double().cpu() - ref).abs().max()) < (1e-5 if mode != "tf32" else 5e-3)


@cuda
def test_tf32_is_the_tensor_core_path():
    """On float32 data TF32 rounds the products (error ~1e-4 here) and 3xTF32 does not: if the
    tensor-core kernels silently fell back to FMAs, the first bound would fail."""
    if not HAS_CUDA:
        pytest.skip("needs a GPU and a CUDA build of distkern")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 tensor cores need sm_80+")
    with cuda_schedule("mahalanobis", 1):
        err = _mode_errors(4096, 256, 3)
    assert err["tf32"] > 20 * err["3xtf32"], err
    assert err["3xtf32"] < 2e-6 and err["fma"] < 2e-6, err


@cuda
def test_auto_follows_torch_allow_tf32():
    if not HAS_CUDA or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ GPU and a CUDA build of distkern")
    g = torch.Generator().manual_seed(4)
    D = 256
    L = _factors(1, D, g)[0].float().cuda()
    x = torch.randn(4096, D, generator=g).cuda()
    mu = torch.zeros(D).cuda()

    def run(m):
        with distkern.cuda_matmul(m):
            return distkern.mahalanobis(x, mu, L)

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        # auto takes the tensor cores only once they are verified on a GPU (precision.AUTO_TENSOR_CORES)
        assert torch.equal(run("auto"), run("tf32" if distkern.precision.AUTO_TENSOR_CORES else "fma"))
        torch.backends.cuda.matmul.allow_tf32 = False
        assert torch.equal(run("auto"), run("fma"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@cuda
def test_cuda_sanitizer_case_tensor_core_tiles():
    """Odd shapes through every tensor-core instantiation family (single, backward, tied and
    per-component K, positions with bf16 factors, nearest, kernel sums, anomaly map) for compute-sanitizer."""
    if not HAS_CUDA or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ GPU and a CUDA build of distkern")
    g = torch.Generator().manual_seed(9)
    for m in ("tf32", "3xtf32"):
        with distkern.cuda_matmul(m):
            for N, D, K in [(1, 1, 1), (65, 33, 3), (130, 70, 5)]:
                L = _factors(K, D, g).float().cuda()
                mu = torch.randn(K, D, generator=g).cuda()
                x = torch.randn(N, D, generator=g).cuda().requires_grad_()
                distkern.mahalanobis(x, mu[0], L[0]).sum().backward()
                outs = [x.grad, distkern.mahalanobis_k(x.detach(), mu, L, reduce="min").values,
                        distkern.mahalanobis_k(x.detach(), mu, L[0]),
                        distkern.mahalanobis_pos(x.detach()[:, None].expand(N, K, D).contiguous(), mu, L.bfloat16()),
                        distkern.nearest_reference(x.detach(), mu).similarity,
                        distkern.kernel_matmul(x.detach(), mu, kernel="gaussian", bandwidth=2.0),
                        torch.ops.distkern.anomaly_map(x.detach()[None, None], mu)]
                torch.cuda.synchronize()
                assert all(torch.isfinite(o).all() for o in outs)
