"""distkern.nearest_reference / reference_residual (ResAD matching) against the dense formula."""
import pytest
import torch
import torch.nn.functional as F

import distkern
from cuda_refs import cuda_schedule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def dense(x, refs):
    sim = F.normalize(x.double(), dim=1, eps=1e-12) @ F.normalize(refs.double(), dim=1, eps=1e-12).T
    return sim.max(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("N,M,D", [(1, 1, 1), (5, 3, 7), (300, 700, 33), (130, 1030, 64)])
def test_matches_dense(device, dtype, N, M, D, rng):
    x = torch.randn(N, D, generator=rng).to(device, dtype)
    refs = torch.randn(M, D, generator=rng).to(device)
    sim, idx = distkern.nearest_reference(x, refs)
    ref = dense(x, refs)
    assert sim.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and idx.dtype == torch.int64
    assert torch.allclose(sim.double(), ref.values, atol=1e-5 if dtype != torch.float64 else 1e-12)
    # the index agrees wherever the best two similarities are not within rounding of each other
    top2 = (F.normalize(x.double(), dim=1) @ F.normalize(refs.double(), dim=1).T).topk(min(2, M), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 1e-4) if M > 1 else torch.ones(N, dtype=torch.bool, device=device)
    assert torch.equal(idx[clear], ref.indices[clear])


@pytest.mark.parametrize("device", DEVICES)
def test_residual_strides_grad(device, rng):
    base = torch.randn(80, 200, generator=rng, dtype=torch.float64).to(device)
    x = base.T[::2]  # (100, 80), non-contiguous
    refs = torch.randn(50, 80, generator=rng, dtype=torch.float64).to(device)
    res, idx = distkern.reference_residual(x, refs)
    assert torch.equal(idx, dense(x, refs).indices)
    assert torch.allclose(res, x - refs[idx])
    sq, _ = distkern.reference_residual(x, refs, squared=True)
    assert torch.allclose(sq, (x - refs[idx]) ** 2)
    xs = x.detach().clone().requires_grad_()
    rs = refs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: distkern.nearest_reference(a, b).similarity, (xs[:7], rs))


def test_opcheck_and_compile(rng):
    x, refs = torch.randn(20, 9, generator=rng), torch.randn(30, 9, generator=rng)
    torch.library.opcheck(torch.ops.distkern.nearest_cosine.default, (x, refs))
    f = torch.compile(lambda a: distkern.nearest_reference(a, refs).similarity * 2, fullgraph=True, backend="aot_eager")
    assert torch.allclose(f(x), 2 * dense(x, refs).values.float(), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_empty_errors(device, rng):
    x = torch.randn(4, 5, generator=rng).to(device)
    x[2, 1] = float("nan")
    refs = torch.randn(6, 5, generator=rng).to(device)
    sim, idx = distkern.nearest_reference(x, refs)
    assert sim[2].isnan() and torch.isfinite(sim[[0, 1, 3]]).all()
    assert distkern.nearest_reference(x[:0], refs).indices.shape == (0,)
    with pytest.raises(ValueError, match="refs must be \\(M, D\\) with D = 5"):
        distkern.nearest_reference(x, refs[:, :4])
    if device == "cpu":  # the op's own refusal; on CUDA it crashed the process once (see benchmarks/README.md)
        with pytest.raises(ValueError, match="refs must be \\(M, D\\) with D = 5"):
            torch.ops.distkern.nearest_cosine(x, refs[:, :4])
    with pytest.raises(ValueError, match="at least one reference"):
        distkern.nearest_reference(x, refs[:0])
    with pytest.raises(TypeError, match="x must be float32"):
        distkern.nearest_reference(x.long(), refs)


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", [1, 2])  # the fused tile kernel, Gram panels (cuBLAS + argmax kernel)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,M,D", [(1, 1, 3), (2100, 9000, 130), (70, 12544, 9)])
def test_cuda_schedules_match_dense(schedule, dtype, N, M, D, rng):
    """Both CUDA schedules of nearest_cosine against float64, whatever D the automatic one would pick for:
    several row and column panels (2100 > 2048 rows; 9000 and 12544 > 8192 columns), ties across panels
    (the lowest index wins), a non-finite row."""
    refs = torch.randn(M, D, generator=rng)
    x = torch.randn(N, D, generator=rng)
    if M > 8200:  # the same reference in the first and the second column panel, an exact tie in any summation order
        refs[3] = 0
        refs[3, 0] = 1
        refs[8200] = refs[3]
        x[0] = 0
        x[0, 0] = 3
    if N > 5:
        x[5, 1] = float("inf")
    x, refs = x.to(dtype).cuda(), refs.cuda()
    with cuda_schedule("nearest", schedule):
        sim, idx = distkern.nearest_reference(x, refs)
    full = F.normalize(x.double(), dim=1, eps=1e-12) @ F.normalize(refs.double(), dim=1, eps=1e-12).T
    ok = torch.isfinite(x).all(1)
    assert not sim[~ok].isfinite().any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((sim[ok].double() - full[ok].max(1).values).abs().max()) < tol
    assert float((full[ok].max(1).values - full[ok].gather(1, idx[ok, None])[:, 0]).max()) < tol
    if M > 8200:
        assert int(idx[0]) == 3
    with pytest.raises(ValueError, match="set_nearest_schedule"):
        distkern._C.set_nearest_schedule(3)


@pytest.mark.cuda
def test_cuda_sanitizer_case_nearest():
    g = torch.Generator().manual_seed(3)
    for N, M, D in [(1, 1, 1), (67, 130, 33), (130, 70, 65)]:
        x = torch.randn(N, D, generator=g).to("cuda", torch.bfloat16)
        sim, idx = distkern.nearest_reference(x, torch.randn(M, D, generator=g).cuda())
        torch.cuda.synchronize()
        assert torch.isfinite(sim).all() and bool((idx >= 0).all() and (idx < M).all())


_ERROR_PATH_PROBE = """
import torch, distkern
x = torch.randn(4, 5, device="cuda")
cases = {
    "nearest_cosine": lambda: torch.ops.distkern.nearest_cosine(x, torch.randn(6, 5, device="cuda")[:, :4]),
    "mahalanobis_k_min": lambda: torch.ops.distkern.mahalanobis_k_min(x, torch.randn(3, 4, device="cuda"),
                                                                       torch.eye(5, device="cuda"), True),
    "mahalanobis": lambda: torch.ops.distkern.mahalanobis(x, torch.zeros(4, device="cuda"), torch.eye(5, device="cuda"), True),
}
for name, call in cases.items():
    try:
        call()
        print(name, "no error")
    except ValueError as e:
        print(name, "ValueError", str(e).splitlines()[0][:80])
"""


@pytest.mark.cuda
def test_cuda_shape_errors_raise_cleanly_in_a_subprocess():
    """The CUDA ops' shape-error paths, each in a child process so that a crash (as
    nearest_cosine's was once, see benchmarks/README.md) fails this test instead of the whole run."""
    import subprocess
    import sys

    # -X faulthandler: a crash prints the child's Python stack; 45 s, inside the GPU check's per-test limit
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ERROR_PATH_PROBE], capture_output=True,
                       text=True, timeout=45)
    assert r.returncode == 0, f"the probe died (exit {r.returncode}): {r.stdout}\n{r.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert all(v.startswith("ValueError") for v in lines.values()), lines
