"""distkern's CUDA kernels run on the CPU through a CUDA stand-in (tests/emu): the real ``.cu`` files
and their launchers, rewritten only at the launch syntax (tests/emu/cu2cpp.py), compiled with g++
into one shared library and called through ctypes with CPU tensors, against the CPU ops (the same
math headers) or float64. Each block runs as blockDim.x fibers with barriers for
``__syncthreads`` and the warp shuffles (the fibers' order reversed at every barrier, so a missing
barrier shows), so index arithmetic, tails, grid-stride loops, shared-memory
layouts, reductions and the in-kernel Philox draws are checked without a GPU. It says nothing about
the hardware (timing, memory model, real tensor cores): the cuda-marked tests do that."""
import ctypes
import subprocess

import pytest
import torch

import distkern
from distkern.ops import align
from emu_support import EMU, SANITIZE, compile_flags, missing

WRAPPERS = ["step", "anomaly_map", "attention", "mahalanobis", "nearest", "kernel_sum", "example_kernel"]
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FMA, TF32, TF32X3 = 0, 1, 2
# Under ASan / UBSan (test_emulation_sanitized.py) 3xTF32 is left out: it makes the same memory accesses
# as TF32 (only the register arithmetic differs, checked in the plain run), and each emulated mma.sync is
# a warp barrier, which the sanitizers make slow.
MODES = [FMA, TF32] if SANITIZE else [FMA, TF32, TF32X3]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if missing():
        pytest.skip(missing())
    tmp = tmp_path_factory.mktemp("emu")
    flags = [*compile_flags(tmp), "-fPIC"]
    procs = {w: subprocess.Popen(["g++", *flags, "-c", str(EMU / f"wrap_{w}.cpp"), "-o", str(tmp / f"{w}.o")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in WRAPPERS}
    for w, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"wrap_{w}.cpp:\n{out[-4000:]}"
    so = tmp / "libdkemu.so"
    san = [f for f in flags if f.startswith("-fsanitize")]
    link = subprocess.run(["g++", "-shared", "-pthread", *san, *[str(tmp / f"{w}.o") for w in WRAPPERS], "-o", str(so)],
                          capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stderr[-4000:]
    return ctypes.CDLL(str(so))


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


I64, DBL, INT = ctypes.c_int64, ctypes.c_double, ctypes.c_int


def _call(fn, *args):
    rc = fn(*args)
    assert rc == 0, f"launcher returned cudaError {rc}"


def _ulps(a, b, dtype):
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


# ---- sampler step ---------------------------------------------------------------------------------

def _step_variants(noise, table, quiet, prev, whole: bool):
    """(clip, (noise, seed), per-sample table, prev_x0) for test_sampler_step: all 54 combinations when
    ``whole``, else the 9 rows of an orthogonal array, which still meet every pair of two factors' values.
    The whole product runs for float32 in the plain run; the other dtypes change only the loads, stores and
    accumulator type of the same branches, and under the sanitizers each variant matters for the set of
    pointers it reads — both covered by the pairs."""
    clips = (0, 1, 2)
    noises = ((None, 7), (noise, -1), (None, -1))
    tables = (None, table, quiet)
    prevs = (prev, None)
    if not whole:  # L9(3^4), its 4th column folded onto prev's two values
        return [(clips[a], noises[b], tables[(a + b) % 3], prevs[(a + 2 * b) % 3 % 2])
                for a in range(3) for b in range(3)]
    return [(c, n, t, p) for c in clips for n in noises for t in tables for p in prevs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7, 9), (4, 1031), "misaligned"])
def test_sampler_step(lib, dtype, shape):
    misaligned = shape == "misaligned"
    if misaligned:  # inputs one element past a vector boundary: the element-wise path throughout
        shape = (3, 37)
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    x, m, px = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    if misaligned:
        x = torch.cat([torch.zeros(1, dtype=dtype), x.reshape(-1)])[1:].view(shape)
        assert x.data_ptr() % 16 != 0
    noise = torch.randn(shape, generator=g).to(dtype)
    B = shape[0]
    n = x.numel() // B
    coefs = [0.9, -0.3, 0.1, 0.8, 0.5, 0.05, 0.2, 0.3]
    table = torch.randn(B, 8, generator=g, dtype=torch.float64)
    quiet = table.clone()  # even samples without noise (g = s = 0): the kernel skips their draws
    quiet[::2, 2] = 0.0
    quiet[::2, 7] = 0.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    whole = dtype == torch.float32 and not SANITIZE
    for clip, (nz, seed), per_sample, prev in _step_variants(noise, table, quiet, px, whole):
        ref_out, ref_x0 = torch.ops.distkern.sampler_step(
            x, m, prev, nz, [] if per_sample is not None else coefs, per_sample, clip, 0.7, 0.9, 1.5,
            seed, 3)
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        scale = torch.empty(max(B, 1), dtype=acc)
        c = (ctypes.c_double * 8)(*coefs)
        _call(lib.emu_sampler_step, INT(DT[dtype]), _p(x), _p(m), _p(prev), _p(nz), _p(out), _p(x0),
              _p(per_sample), c, I64(B), I64(n), I64(x.numel()), INT(clip), DBL(0.7), DBL(0.9),
              DBL(1.5), I64(seed), I64(3), _p(scale))
        what = f"clip={clip} seed={seed} noise={nz is not None} table={per_sample is not None}"
        assert _ulps(out, ref_out, dtype) and _ulps(x0, ref_x0, dtype), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pos", [0, 500, 999])
def test_sampler_step_threshold_with_nan(lib, dtype, pos):
    """A NaN in a sample makes its dynamic-thresholding quantile NaN (as torch.quantile), wherever it sits."""
    g = torch.Generator().manual_seed(pos)
    x = (torch.randn(3, 1000, generator=g) * 3).to(dtype)
    x[1, pos] = float("nan")
    m = torch.zeros_like(x)
    coefs = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    ref_out, ref_x0 = torch.ops.distkern.sampler_step(x, m, None, None, coefs, None, 2, 1.0, 0.9, 5.0, -1, 0)
    assert ref_x0[1].isnan().all() and not ref_x0[[0, 2]].isnan().any()
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    scale = torch.empty(3, dtype=dtype)
    _call(lib.emu_sampler_step, INT(DT[dtype]), _p(x), _p(m), None, None, _p(out), _p(x0), None,
          (ctypes.c_double * 8)(*coefs), I64(3), I64(1000), I64(x.numel()), INT(2), DBL(1.0), DBL(0.9), DBL(5.0),
          I64(-1), I64(0), _p(scale))
    assert scale[1].isnan() and not scale[[0, 2]].isnan().any()
    assert torch.equal(x0.isnan(), ref_x0.isnan()) and _ulps(x0[[0, 2]], ref_x0[[0, 2]], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [2048, 5003])
def test_sampler_step_threshold_ties(lib, dtype, n):
    """Dynamic thresholding over several rounds of the select (2048 elements a round) with many equal |x0|
    (values on a grid of 1/8): the warp-aggregated histogram counts each key once, the quantile and the
    clamped step equal the CPU op's, with the noise given and drawn in the kernel."""
    g = torch.Generator().manual_seed(n)
    B = 3
    x = (torch.randn(B, n, generator=g) * 8).round().div(8).to(dtype)
    m = (torch.randn(B, n, generator=g) * 4).round().div(4).to(dtype)
    coefs = [1.0, -0.5, 0.25, 0.9, 0.3, 0.0, 0.0, 0.0]
    for nz, seed in ((torch.randn(B, n, generator=g).to(dtype), -1), (None, 11)):
        for ratio in (0.5, 0.995):
            ref_out, ref_x0 = torch.ops.distkern.sampler_step(x, m, None, nz, coefs, None, 2, 1.0, ratio, 1.5, seed, 4)
            out, x0 = torch.empty_like(x), torch.empty_like(x)
            scale = torch.empty(B, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            _call(lib.emu_sampler_step, INT(DT[dtype]), _p(x), _p(m), None, _p(nz), _p(out), _p(x0), None,
                  (ctypes.c_double * 8)(*coefs), I64(B), I64(n), I64(x.numel()), INT(2), DBL(1.0), DBL(ratio),
                  DBL(1.5), I64(seed), I64(4), _p(scale))
            assert _ulps(out, ref_out, dtype) and _ulps(x0, ref_x0, dtype), (ratio, seed)


@pytest.mark.parametrize("dtype,G,n", [(torch.float32, 2, 5003), (torch.bfloat16, 2, 5003), (torch.float64, 2, 5003),
                                       (torch.float32, 7, 5003), (torch.float32, 7, 10)])
def test_sampler_step_threshold_over_blocks(lib, dtype, G, n):
    """The select of large samples over G blocks a sample meeting in a global histogram (forced here: at
    n = 5003 slices not multiples of a round; at n = 10 the last two of 7 slices start past the end), with
    ties, in-kernel noise and a NaN in one sample: the scale and the step equal the CPU op's, and the
    workspace is left zeroed for the next call."""
    g = torch.Generator().manual_seed(G + n)
    B = 3
    x = (torch.randn(B, n, generator=g) * 8).round().div(8).to(dtype)
    m = (torch.randn(B, n, generator=g) * 4).round().div(4).to(dtype)
    x[2, n * 6 // 7] = float("nan")
    coefs = [1.0, -0.5, 0.25, 0.9, 0.3, 0.0, 0.0, 0.0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ws = torch.zeros(B * 264, dtype=torch.int64)
    for nz, seed, ratio in ((None, 11, 0.995), (torch.randn(B, n, generator=g).to(dtype), -1, 0.3)):
        ref_out, ref_x0 = torch.ops.distkern.sampler_step(x, m, None, nz, coefs, None, 2, 1.0, ratio, 1.5, seed, 4)
        out, x0, scale = torch.empty_like(x), torch.empty_like(x), torch.empty(B, dtype=acc)
        _call(lib.emu_sampler_step_select, INT(DT[dtype]), _p(x), _p(m), _p(nz), _p(out), _p(x0),
              (ctypes.c_double * 8)(*coefs), I64(B), I64(n), DBL(ratio), DBL(1.5), I64(seed), _p(scale), I64(G), _p(ws))
        assert scale[2].isnan() and not scale[:2].isnan().any()
        assert torch.equal(out.isnan(), ref_out.isnan())
        assert _ulps(out[:2], ref_out[:2], dtype) and _ulps(x0[:2], ref_x0[:2], dtype), (ratio, seed)
        assert not ws.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_step_backward(lib, dtype):
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 5, 7)
    x, m, gp, g0 = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    coefs = [0.9, -0.3, 0.1, 0.8, 0.5, 0.05, 0.2, 0.3]
    for clip in (0, 1):
        for grad_x0 in (g0, None):
            ref = torch.ops.distkern.sampler_step_backward(gp, grad_x0, x, m, None, coefs, None, clip, 0.7, 5, 0)
            outs = [torch.empty_like(x) for _ in range(3)]
            c = (ctypes.c_double * 8)(*coefs)
            _call(lib.emu_sampler_step_backward, INT(DT[dtype]), _p(gp), _p(grad_x0), _p(x), _p(m), None,
                  *[_p(o) for o in outs], None, c, I64(3), I64(x.numel() // 3), I64(x.numel()), INT(clip), DBL(0.7),
                  I64(5), I64(0))
            for a, b in zip(outs, ref):
                assert _ulps(a, b, dtype)


# ---- prompt alignment ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("L,B,P,D,K,per_image", [(1, 1, 1, 1, 1, False), (2, 3, 37, 70, 5, True),
                                                 (4, 2, 33, 65, 3, False), (2, 1, 40, 33, 32, False),
                                                 (1, 2, 20, 40, 70, True), (2, 2, 300, 50, 30, False),
                                                 (1, 1, 130, 17, 33, True), (3, 2, 45, 33, 40, False)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [False, True], ids=["layers-in-block", "block-per-layer"])
def test_anomaly_map(lib, dtype, L, B, P, D, K, per_image, mode, split):
    if dtype == torch.float64 and mode != FMA:
        pytest.skip("float64 runs on FMAs in every mode")
    if split and (mode != FMA or L == 1):
        pytest.skip("the workspace splits the FMA kernel's layers only")
    g = torch.Generator().manual_seed(L + B + P + D)
    patches = torch.randn(L, B, P, D, generator=g).to(dtype)
    text = torch.randn(*((L, B) if per_image else (L,)), K, 2, D, generator=g)
    dirs = align.pair_directions(text, 14.3)
    dirs = (dirs.double() if dtype == torch.float64 else dirs.float())
    d4 = dirs if per_image else dirs[:, None]
    ref = torch.ops.distkern.anomaly_map(patches, dirs)
    out = torch.empty(B, P, dtype=ref.dtype)
    # the size the CUDA op allocates: L·B·P where the FMA kernel runs over several layers (float64: any mode)
    lib.emu_anomaly_map_workspace.restype = ctypes.c_int64
    want = lib.emu_anomaly_map_workspace(INT(DT[dtype]), INT(mode), I64(L), I64(B), I64(P))
    assert want == (L * B * P if L > 1 and (mode == FMA or dtype == torch.float64) else 0)
    ws = torch.full((L, B, P), float("nan"), dtype=ref.dtype) if split else None
    _call(lib.emu_anomaly_map, INT(DT[dtype]), INT(mode), _p(patches.contiguous()), _p(d4.contiguous()), _p(out),
          I64(L), I64(B), I64(P), I64(D), I64(K), I64(d4.shape[0]), I64(d4.shape[1]),
          _p(ws) if split else ctypes.c_void_p(None))
    tol = 1e-12 if dtype == torch.float64 else 2e-6 if mode != TF32 else 5e-3
    assert torch.allclose(out, ref, rtol=tol, atol=tol), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,M,P,D,masked", [(1, 1, 1, 3, False), (2, 9, 70, 65, True), (1, 17, 33, 300, False)])
def test_fused_attention(lib, dtype, B, M, P, D, masked):
    g = torch.Generator().manual_seed(B + M + P + D)
    q = (0.2 * torch.randn(B, M, D, generator=g)).to(dtype)
    x = torch.randn(B, P, D, generator=g).to(dtype)
    mask = (torch.rand(B, P, generator=g) > 0.3) if masked else None
    if mask is not None:
        mask[:, 0] = True
        mask[-1] = False  # an image with every token masked: output 0, lse −inf (as the composite and SDPA)
    ref_out, ref_lse = torch.ops.distkern.shared_kv_attention(q.double(), x.double(), mask, 16)
    out, lse = torch.empty_like(q), torch.empty(B, M)
    _call(lib.emu_attention, INT(DT[dtype]), _p(q), _p(x), _p(mask), _p(out), _p(lse), I64(B), I64(M), I64(P), I64(D))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double(), ref_out, rtol=tol, atol=tol), (out.double() - ref_out).abs().max()
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    if mask is not None:
        assert torch.equal(out[-1], torch.zeros_like(out[-1])) and bool((lse[-1] == float("-inf")).all())


# ---- tile kernels (FMA, TF32, 3xTF32) ------------------------------------------------------------

def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


TOL = {FMA: 2e-6, TF32X3: 2e-6, TF32: 3e-3}


def _factor(D, R, g, lower):
    if lower:
        A = torch.randn(D, D, generator=g, dtype=torch.float64)
        return torch.linalg.cholesky(A @ A.T / D + 0.5 * torch.eye(D, dtype=torch.float64)).float().contiguous()
    return (torch.randn(D, R, generator=g, dtype=torch.float64).float() / D**0.5).contiguous()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N,D,R,lower", [(1, 1, 1, True), (130, 70, 70, True), (200, 129, 5, False)])
def test_mahalanobis_forward_backward(lib, mode, N, D, R, lower):
    g = torch.Generator().manual_seed(N + D + R)
    L = _factor(D, R, g, lower)
    R = L.shape[1]
    mu = torch.randn(D, generator=g)
    x = torch.randn(N, D, generator=g) + mu
    for xd in (x, x.bfloat16(), x.T.contiguous().T):  # contiguous fp32, bf16, column-major strides
        out = torch.empty(N)
        _call(lib.emu_maha_forward, INT(DT[xd.dtype]), INT(mode), _p(xd), I64(xd.stride(0)), I64(xd.stride(1)), _p(mu),
              _p(L), _p(out), I64(N), I64(D), I64(R), INT(lower))
        refd = distkern.mahalanobis(xd.double(), mu.double(), L.double(), lower=lower)
        assert _rel(out, refd) < TOL[mode], (xd.dtype, xd.stride())
    # backward: grad of sum(w · d²) w.r.t. x, and the mean's partial sums
    w = torch.randn(N, generator=g)
    xr = x.double().requires_grad_()
    (w.double() * distkern.mahalanobis(xr, mu.double(), L.double(), lower=lower)).sum().backward()
    blocks = (N + 63) // 64
    z, gx, part = torch.empty(N, R), torch.empty(N, D), torch.empty(blocks, D)
    _call(lib.emu_maha_backward, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(w), _p(mu), _p(L), _p(z), _p(gx),
          _p(part), I64(N), I64(D), I64(R), INT(lower))
    assert _rel(gx, xr.grad) < 2 * TOL[mode]
    assert _rel(part.sum(0), -xr.grad.sum(0)) < 2 * TOL[mode]


@pytest.mark.parametrize("N,D,R,lower,rows,block", [(150, 70, 70, True, 64, 32), (150, 70, 70, True, 150, 64),
                                                      (90, 129, 40, False, 31, 40), (1, 1, 1, True, 64, 64)])
def test_mahalanobis_forward_panels(lib, N, D, R, lower, rows, block):
    """The forward's Gram panels: the centring and sum-of-squares kernels under test around a CPU GEMM per
    panel — several row panels with a short last one, a triangular factor in column blocks (a short last
    block), a general factor in one product, fp32 / bf16 / column-major x, a non-finite row."""
    g = torch.Generator().manual_seed(N + D + R + rows)
    L = _factor(D, R, g, lower)
    mu = torch.randn(D, generator=g)
    x = torch.randn(N, D, generator=g) + mu
    if N > 3:
        x[3, D // 2] = float("inf")
    for xd in (x, x.bfloat16(), x.T.contiguous().T):
        out, calls, flops = torch.empty(N), I64(), I64()
        _call(lib.emu_maha_forward_panels, INT(DT[xd.dtype]), _p(xd), I64(xd.stride(0)), I64(xd.stride(1)), _p(mu),
              _p(L), _p(out), I64(N), I64(D), I64(R), INT(lower), I64(rows), I64(block), ctypes.byref(calls),
              ctypes.byref(flops))
        ref = distkern.mahalanobis(xd.double(), mu.double(), L.double(), lower=lower)
        ok = torch.isfinite(ref)
        assert out[~ok].isnan().all() and (N <= 3 or not ok[3])
        assert _rel(out[ok], ref[ok]) < 2e-6, xd.dtype
        panels, blocks = -(-N // rows), (-(-D // block) if lower else 1)
        assert calls.value == panels * blocks
        # a triangular factor multiplies only the rows of W at or below each column block
        full = 2 * N * D * R
        assert flops.value == (sum(2 * N * min(block, D - c) * (D - c) for c in range(0, D, block)) if lower else full)
    plan = (I64 * 2)()
    lib.emu_maha_panel_plan(I64(1_000_000), I64(512), I64(512), INT(1), plan)
    assert (plan[0], plan[1]) == (16384, 128)  # 32 MiB panels; 62.5 % of the full product's flops
    lib.emu_maha_panel_plan(I64(100), I64(550), I64(550), INT(1), plan)
    assert (plan[0], plan[1]) == (100, 160)


@pytest.mark.parametrize("B,P,D,R,lower,positions,block", [(5, 7, 70, 70, True, 3, 32), (3, 40, 33, 33, True, 40, 64),
                                                              (4, 5, 40, 17, False, 2, 17), (1, 1, 1, 1, True, 1, 64)])
def test_mahalanobis_positions_panels(lib, B, P, D, R, lower, positions, block):
    """The per-position forward's Gram panels: the centring kernels (lanes along the features for a contiguous
    (B, P, D); the shared-memory transpose for anomalib's (B, P, D) view of a (B, D, P) embedding, 32 positions
    a block, with short tails) and the scattered sum of squares around a CPU batched GEMM — several panels
    with a short last one, triangular factors in column blocks, general ones in one product, fp32 / bf16 / fp16
    x, a non-finite entry; plus the plan and the automatic schedule's choice."""
    g = torch.Generator().manual_seed(B + P + D + R + positions)
    L = torch.stack([_factor(D, R, g, lower) for _ in range(P)])
    mu = torch.randn(P, D, generator=g)
    x = torch.randn(B, P, D, generator=g) + mu
    if B * P > 2:
        x[B - 1, P // 2, D // 3] = float("nan")
    emb = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # (B, P, D) view of a (B, D, P) embedding
    for xd in (x, emb, x.bfloat16(), emb.half()):
        out, calls, flops = torch.full((B, P), -1.0), I64(), I64()
        _call(lib.emu_maha_pos_panels, INT(DT[xd.dtype]), _p(xd), I64(xd.stride(0)), I64(xd.stride(1)),
              I64(xd.stride(2)), _p(mu), _p(L), _p(out), I64(B), I64(P), I64(D), I64(R), INT(lower), I64(positions),
              I64(block), ctypes.byref(calls), ctypes.byref(flops))
        ref = distkern.mahalanobis_pos(xd.double(), mu.double(), L.double(), lower=lower)
        ok = torch.isfinite(ref)
        assert out[~ok].isnan().all() and ok.sum() >= B * P - 1
        assert _rel(out[ok], ref[ok]) < 2e-6, (xd.dtype, xd.stride())
        panels, blocks = -(-P // positions), (-(-D // block) if lower else 1)
        assert calls.value == panels * blocks
        per_pos = sum(2 * B * min(block, D - c) * (D - c) for c in range(0, D, block)) if lower else 2 * B * D * R
        assert flops.value == P * per_pos
    plan = (I64 * 2)()
    lib.emu_maha_pos_panel_plan(I64(32), I64(3136), I64(550), I64(550), INT(1), plan)
    assert (plan[0], plan[1]) == ((1 << 23) // (32 * 550), 160)  # 32 MiB buffers: 476 positions a panel
    lib.emu_maha_pos_panel_plan(I64(1 << 20), I64(10), I64(64), I64(64), INT(1), plan)
    assert plan[0] == 1  # one position more than a buffer's worth: one position a panel
    F32, BF16, F64 = DT[torch.float32], DT[torch.bfloat16], DT[torch.float64]
    auto = lambda xt, ft, B, D, R: lib.emu_maha_use_pos_panels(INT(xt), INT(ft), I64(B), I64(D), I64(R), INT(0))
    assert auto(F32, F32, 32, 550, 550) and auto(BF16, F32, 16, 512, 512)
    assert not auto(F32, BF16, 32, 550, 550)  # 16-bit factors: the tile kernel reads them as they are
    assert not auto(F32, F32, 32, 100, 100) and not auto(F32, F32, 8, 550, 550) and not auto(F64, F64, 32, 550, 550)
    assert lib.emu_maha_use_pos_panels(INT(F32), INT(F32), I64(1), I64(8), I64(8), INT(2))  # forced
    assert not lib.emu_maha_use_pos_panels(INT(F32), INT(F32), I64(32), I64(550), I64(550), INT(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", [0, 1, 2])
def test_mahalanobis_k_components(lib, mode, reduce):
    g = torch.Generator().manual_seed(40 + reduce)
    N, D, K = 150, 33, 4
    L = torch.stack([_factor(D, D, g, True) for _ in range(K)])
    mu = 2 * torch.randn(K, D, generator=g)
    x = mu[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g)
    bias = torch.randn(K, generator=g)
    z = torch.einsum("nkd,kdr->nkr", x.double()[:, None] - mu.double()[None], L.double())
    d2 = (z * z).sum(-1)
    out = torch.empty(N, K) if reduce == 0 else torch.empty(N)
    idx = torch.empty(N if reduce == 1 else 0, dtype=torch.int64)
    _call(lib.emu_maha_k, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(mu), _p(L), _p(bias), _p(out),
          _p(idx) if reduce == 1 else None, I64(N), I64(D), I64(D), I64(K), INT(1), INT(reduce))
    ref = [d2, d2.min(1).values, torch.logsumexp(bias.double() - 0.5 * d2, 1)][reduce]
    assert _rel(out, ref) < TOL[mode]
    if reduce == 1:
        assert float((d2.gather(1, idx[:, None])[:, 0] - d2.min(1).values).abs().max()) < 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", [0, 1, 2])
def test_mahalanobis_k_shared(lib, mode, reduce):
    # the tied-covariance form: ‖W(x − c)‖² by the single-Gaussian kernel, then the cross term
    # (x − c)·B_k with B = W Vᵀ, V_k = (μ_k − c) W, combined as ‖z‖² − 2 z·v_k + ‖v_k‖² (mahalanobis.cpp)
    g = torch.Generator().manual_seed(50 + reduce)
    N, D, K = 170, 40, 70
    L = _factor(D, D, g, True)
    mu = 2 * torch.randn(K, D, generator=g)
    x = mu[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g)
    bias = torch.randn(K, generator=g)
    c = mu.mean(0)
    V = ((mu - c) @ L).contiguous()
    vv, bmat = (V * V).sum(1).contiguous(), (L @ V.T).contiguous()
    zz = torch.empty(N)
    _call(lib.emu_maha_forward, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(c), _p(L), _p(zz), I64(N), I64(D),
          I64(D), INT(1))
    out = torch.empty(N, K) if reduce == 0 else torch.empty(N)
    idx = torch.empty(N, dtype=torch.int64)
    _call(lib.emu_maha_k_shared, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(c), _p(bmat), _p(zz), _p(vv), _p(bias),
          _p(out), _p(idx) if reduce == 1 else None, I64(N), I64(D), I64(K), INT(reduce))
    z = (x.double()[:, None] - mu.double()[None]) @ L.double()
    d2 = (z * z).sum(-1)
    ref = [d2, d2.min(1).values, torch.logsumexp(bias.double() - 0.5 * d2, 1)][reduce]
    assert _rel(out, ref) < TOL[mode] * (20 if mode == TF32 else 50)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [70, 20])  # 20: the 32-row tiles of small batches (FMA)
def test_mahalanobis_positions(lib, mode, fdtype, B):
    g = torch.Generator().manual_seed(7 + B)
    P, D = 3, 65
    L = torch.stack([_factor(D, D, g, True) for _ in range(P)]).to(fdtype)
    mu = torch.randn(P, D, generator=g)
    x = torch.randn(B, P, D, generator=g) + mu
    ref = distkern.mahalanobis_pos(x.double(), mu.double(), L.double())
    out = torch.empty(B, P)
    _call(lib.emu_maha_pos, INT(0), INT(DT[fdtype]), INT(mode), _p(x), I64(P * D), I64(D), I64(1), _p(mu), _p(L),
          _p(out), I64(B), I64(P), I64(D), I64(D), INT(1))
    assert _rel(out, ref) < TOL[mode]


@pytest.mark.parametrize("mode", MODES)
def test_nearest(lib, mode):
    g = torch.Generator().manual_seed(8)
    N, M, D = 140, 77, 45
    x, refs = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    rhat = torch.nn.functional.normalize(refs, dim=1, eps=1e-12).contiguous()
    inv = (1 / x.norm(dim=1).clamp_min(1e-12)).contiguous()
    out, idx = torch.empty(N), torch.empty(N, dtype=torch.int64)
    _call(lib.emu_nearest, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(rhat), _p(inv), _p(out), _p(idx), I64(N),
          I64(D), I64(M))
    sim = torch.nn.functional.normalize(x.double(), dim=1) @ rhat.double().T
    assert _rel(out, sim.max(1).values) < TOL[mode]
    assert float((sim.max(1).values - sim.gather(1, idx[:, None])[:, 0]).max()) < (1e-5 if mode != TF32 else 5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, M, D, max_rows, max_cols", [(37, 29, 20, 8, 6), (300, 700, 33, 2048, 8192)])
def test_nearest_gram_panels(lib, dtype, N, M, D, max_rows, max_cols):
    """The Gram schedule: a CPU GEMM per bounded panel, the argmax kernel under test folding the panels into
    a running (max, index) per row. Duplicated references (inside a panel and across column panels) must
    give the lowest index, and a non-finite row NaN."""
    g = torch.Generator().manual_seed(N + M)
    refs = torch.randn(M, D, generator=g, dtype=torch.float64)
    refs[20] = refs[5]   # ties across column panels (max_cols = 6: panels 0 and 3)
    refs[22] = refs[21]  # ties inside one panel
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x[0], x[1], x[2] = 2 * refs[5], 0.5 * refs[21], -refs[7]
    x[3, 2] = float("nan")
    x, refs = x.to(dtype).contiguous(), refs.to(dtype)
    rhat = torch.nn.functional.normalize(refs, dim=1, eps=1e-12).contiguous()
    inv = (1 / x.norm(dim=1).clamp_min(1e-12)).contiguous()
    out, idx = torch.empty(N, dtype=dtype), torch.empty(N, dtype=torch.int64)
    calls, guards, plan = I64(), I64(), (I64 * 3)()
    _call(lib.emu_nearest_gram, INT(DT[dtype]), _p(x), _p(rhat), _p(inv), _p(out), _p(idx), I64(N), I64(D), I64(M),
          I64(max_rows), I64(max_cols), ctypes.byref(calls), ctypes.byref(guards), plan)
    rows, cols, ld = plan[0], plan[1], plan[2]
    rp, cp = -(-N // rows), -(-M // cols)
    assert (calls.value, guards.value) == (rp * cp, rp) and ld % 4 == 0 and cols <= max_cols and rows <= max_rows
    assert cols * cp - M < cp and rows * rp - N < rp  # even panels: no panel more than one column / row shorter
    sim = torch.nn.functional.normalize(x.double(), dim=1) @ rhat.double().T
    ok = torch.ones(N, dtype=torch.bool)
    ok[3] = False
    assert out[3].isnan() and torch.isfinite(out[ok]).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert float((out[ok].double() - sim[ok].max(1).values).abs().max()) < tol
    assert float((sim[ok].max(1).values - sim[ok].gather(1, idx[ok, None])[:, 0]).max()) < tol
    assert idx[:3].tolist() == [5, 21, int(sim[2].argmax())]


def _ksum_prepare(kernel, kw, y):
    """The op's preparation (kernel_sum.cpp): y centred on its mean (distance kernels; the polynomial
    kernel's dot products are not translation-invariant), its squared norms, φ's constants. Returns
    (kind, center, yc, yy, number of bandwidths, the 16 parameters as a ctypes array)."""
    from distkern.ops.kernel_sum import kernel_params

    kind, params = kernel_params(kernel, y.shape[1], **kw)
    center = y.mean(0) if kernel != "polynomial" else torch.zeros(y.shape[1])
    yc = (y - center).contiguous()
    yy = (yc * yc).sum(1).contiguous()
    bw = kernel in ("gaussian", "laplacian", "imq")
    coef = {"gaussian": lambda s: 1 / (2 * s * s), "laplacian": lambda s: 1 / s, "imq": lambda s: 1 / (s * s)}
    p = [coef[kernel](s) for s in params] if bw else list(params)
    return kind, center, yc, yy, len(p) if bw else 0, (ctypes.c_double * 16)(*(p + [0.0] * (16 - len(p))))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel,kw,C", [("gaussian", {"bandwidth": [1.0, 3.0]}, 1), ("laplacian", {"bandwidth": 2.0}, 3),
                                         ("polynomial", {}, 2), ("distance", {}, 1), ("gaussian", {"bandwidth": 2.0}, 4),
                                         ("gaussian", {"bandwidth": 2.0}, 7)])
@pytest.mark.parametrize("coincident", [False, True])
def test_kernel_matmul(lib, mode, kernel, kw, C, coincident):
    g = torch.Generator().manual_seed(9 + C)
    N, M, D = 90, 133, 40
    x, y = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g) + 0.2
    if coincident:  # y holds every x (the diagonal of K(x, x)): r² from the coordinates there, exactly 0
        x = x * 3 + 5
        y = torch.cat([x, y[N:]])
    v = torch.randn(M, C, generator=g)
    kind, center, yc, yy, ns, pa = _ksum_prepare(kernel, kw, y)
    out = torch.zeros(N, C)
    _call(lib.emu_kernel_matmul, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(center), _p(yc), _p(yy), _p(v),
          _p(out), I64(N), I64(M), I64(D), I64(C), INT(kind), INT(ns), pa)
    ref = distkern.kernel_matmul(x.double(), y.double(), v.double(), kernel=kernel, **kw)
    assert _rel(out, ref) < (1e-5 if mode != TF32 else 2e-2)
    if coincident and kernel in ("laplacian", "distance"):
        # K itself (v = I): at x = y, r² comes from the coordinates, so k(x, x) is exact in every mode (the
        # norm form left ~1e-3 there in float32, far more with TF32 products)
        eye = torch.eye(M)
        K = torch.zeros(N, M)
        _call(lib.emu_kernel_matmul, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(center), _p(yc), _p(yy), _p(eye),
              _p(K), I64(N), I64(M), I64(D), I64(M), INT(kind), INT(ns), pa)
        diag = K.diagonal()
        assert torch.equal(diag, torch.ones(N) if kernel == "laplacian" else torch.zeros(N))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel,kw", [("laplacian", {"bandwidth": 2.0}), ("distance", {})])
def test_kernel_matmul_near_pairs(lib, mode, kernel, kw):
    """Pairs just beyond float32's refinement radius (r² ≈ 2⁻⁸·(‖x‖² + ‖y‖²), not refined there): TF32
    products put ~2⁻¹¹ of the norms into x·y, which the square root turns into percents of r; the TF32 mode
    refines out to 2⁻⁴ of the norms, so every entry of K(x, y) stays close to float64 in every mode."""
    g = torch.Generator().manual_seed(4)
    N, D = 64, 256
    x = torch.randn(N, D, generator=g) * 2 + 3
    y = x + torch.randn(N, D, generator=g) * 0.18  # r² ≈ 8.3 against ‖x − ȳ‖² + ‖y − ȳ‖² ≈ 2050
    kind, center, yc, yy, ns, pa = _ksum_prepare(kernel, kw, y)
    K, eye = torch.zeros(N, N), torch.eye(N)  # v = I: K itself
    _call(lib.emu_kernel_matmul, INT(0), INT(mode), _p(x), I64(D), I64(1), _p(center), _p(yc), _p(yy), _p(eye),
          _p(K), I64(N), I64(N), I64(D), I64(N), INT(kind), INT(ns), pa)
    r = torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref = torch.exp(-r / kw["bandwidth"]) if kernel == "laplacian" else r
    near = torch.eye(N, dtype=torch.bool)
    assert float(((K.double() - ref).abs() / ref.abs().clamp_min(1e-12))[near].max()) < 2e-3


# Under the sanitizers TF32 stands in for 3xTF32: the same loads, stores and epilogue, one MMA a step where
# 3xTF32 emulates three (those cases took 10-12 s each at -O0 with ASan), at TF32's accuracy.
@pytest.mark.parametrize("mode", [FMA, TF32] if SANITIZE else [FMA, TF32X3])
@pytest.mark.parametrize("kernel,kw", [("gaussian", {"bandwidth": [1.0, 3.0]}), ("laplacian", {"bandwidth": 2.0}),
                                       ("polynomial", {}), ("distance", {})])
@pytest.mark.parametrize("plan,dtype", [((70, 300, 300), torch.float32), ((64, 100, 101), torch.bfloat16),
                                        (None, torch.float32)])
def test_kernel_matmul_panels(lib, mode, kernel, kw, plan, dtype):
    """The panel schedule of many columns of v (C > 64): K written panel by panel by the tile kernel,
    each panel followed by the caller's GEMM (here a CPU loop). Panels smaller than the data cover the
    row and column loops, the slab tail (300 = 256 + 44 columns) and rows of a leading dimension that
    is not a multiple of 4 (scalar stores); None is the op's own plan (one panel at these sizes)."""
    g = torch.Generator().manual_seed(len(kernel) + (plan[0] if plan else 0))
    N, M, D, C = 150, 333, 40, 70
    x = (torch.randn(D, N, generator=g) * 3 + 5).to(dtype).T  # strided rows
    y = torch.cat([x[:N // 2].float(), torch.randn(M - N // 2, D, generator=g) + 5])  # half of x lies in y
    v = torch.randn(M, C, generator=g)
    kind, center, yc, yy, ns, pa = _ksum_prepare(kernel, kw, y)
    xt = DT[dtype]

    def run(vv, cc):
        rows, cols, ld = plan or (min(N, 2048), min(M, 8192), (min(M, 8192) + 3) // 4 * 4)
        ws = torch.full((rows * ld,), float("nan"))  # a stale or unwritten entry would poison the sums
        out, calls = torch.full((N, cc), float("nan")), I64(0)
        _call(lib.emu_kernel_matmul_panels, INT(xt), INT(mode), _p(x), I64(x.stride(0)), I64(x.stride(1)),
              _p(center), _p(yc), _p(yy), _p(vv), _p(out), I64(N), I64(M), I64(D), I64(cc), INT(kind), INT(ns), pa,
              I64(rows), I64(cols), I64(ld), _p(ws), ctypes.byref(calls))
        assert calls.value == -(-N // rows) * -(-M // cols)
        return out

    out = run(v, C)
    ref = distkern.kernel_matmul(x.double(), y.double(), v.double(), kernel=kernel, **kw)
    assert _rel(out, ref) < (3e-3 if mode == TF32 else 1e-5)
    if kernel in ("laplacian", "distance"):  # K itself (v = I): exact at the coincident pairs, as fused
        K = run(torch.eye(M), M)
        diag = K[:N // 2, :N // 2].diagonal()
        assert torch.equal(diag, torch.ones(N // 2) if kernel == "laplacian" else torch.zeros(N // 2))


@pytest.mark.parametrize("kernel,kw", [("gaussian", {"bandwidth": [1.0, 3.0]}), ("laplacian", {"bandwidth": 2.0}),
                                       ("imq", {"bandwidth": 1.5}), ("polynomial", {}), ("distance", {})])
@pytest.mark.parametrize("plan,dtype,C", [((70, 300, 300), torch.float32, 1), ((64, 1100, 1101), torch.bfloat16, 3),
                                          ((150, 1100, 1100), torch.float16, 70)])
def test_kernel_matmul_gram_panels(lib, kernel, kw, plan, dtype, C):
    """The Gram panel schedule (large D on CUDA): the caller's GEMM writes x·y over each panel (here a CPU
    loop), phi_panel_kernel turns it into K in place and the GEMM by v follows; the row norms are filled
    once a row panel. Covers several row and column panels, a panel wider than one block's 1024 columns
    with a tail group of 4 (1100 = 1024 + 76), rows whose leading dimension is not a multiple of 4 (1101:
    no 16-byte accesses), strided 16-bit x, and the near-coincident pairs taken from the coordinates."""
    g = torch.Generator().manual_seed(len(kernel) + plan[0] + C)
    N, M, D = 150, 1100, 40
    x = (torch.randn(D, N, generator=g) * 3 + 5).to(dtype).T  # strided rows
    y = torch.cat([x[:N // 2].float(), torch.randn(M - N // 2, D, generator=g) + 5])  # half of x lies in y
    kind, center, yc, yy, ns, pa = _ksum_prepare(kernel, kw, y)
    xf = x.float().contiguous()
    rows, cols, ld = plan

    def run(vv, cc):
        ws, xx = torch.full((rows * ld,), float("nan")), torch.full((rows,), float("nan"))
        out = torch.full((N, cc), float("nan"))
        calls, gram_calls, norm_calls = I64(0), I64(0), I64(0)
        _call(lib.emu_kernel_matmul_gram, INT(DT[dtype]), INT(FMA), _p(x), I64(x.stride(0)), I64(x.stride(1)),
              _p(xf), _p(center), _p(yc), _p(yy), _p(vv), _p(out), I64(N), I64(M), I64(D), I64(cc), INT(kind),
              INT(ns), pa, I64(rows), I64(cols), I64(ld), _p(ws), _p(xx), ctypes.byref(calls),
              ctypes.byref(gram_calls), ctypes.byref(norm_calls))
        panels = -(-N // rows) * -(-M // cols)
        assert (calls.value, gram_calls.value, norm_calls.value) == (panels, panels, -(-N // rows))
        return out

    v = torch.randn(M, C, generator=g)
    ref = distkern.kernel_matmul(x.double(), y.double(), v.double(), kernel=kernel, **kw)
    assert _rel(run(v, C), ref) < 1e-5
    if kernel in ("laplacian", "distance"):  # K itself (v = I): exact at the coincident pairs
        K = run(torch.eye(M), M)
        diag = K[:N // 2, :N // 2].diagonal()
        assert torch.equal(diag, torch.ones(N // 2) if kernel == "laplacian" else torch.zeros(N // 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,D", [(1, 1), (13, 70), (100, 33)])
def test_example_plugin_kernel(lib, dtype, N, D):
    """The example plugin's warp-per-row kernel (plugins/example_kernel), strided input included."""
    g = torch.Generator().manual_seed(N + D)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(D, N, generator=g).to(dtype).T  # column-major rows
    mean, inv_std = torch.randn(D, generator=g).to(acc), (torch.rand(D, generator=g) + 0.5).to(acc)
    out = torch.empty(N, dtype=acc)
    _call(lib.emu_standardized_sqdist, INT(DT[dtype]), _p(x), I64(x.stride(0)), I64(x.stride(1)), _p(mean),
          _p(inv_std), _p(out), I64(N), I64(D))
    ref = (((x.double() - mean.double()) * inv_std.double()) ** 2).sum(1)
    assert torch.allclose(out.double(), ref, rtol=1e-5 if acc == torch.float32 else 1e-12)
