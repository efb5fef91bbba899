"""The prompt-alignment ops of CLIP-style zero-shot anomaly detection (``distkern.ops.align``).

* ``anomaly_map`` (``torch.ops.distkern.anomaly_map``) against the map written the way Bayes-PFL writes it
  (normalise patches and prompts, τ·cosine with both prompts of each pair, softmax over the pair, mean over
  pairs and layers), in float64 on fresh random inputs: shapes off the kernels' tiles (P not a multiple of
  32 / 64 / 256, D not a multiple of 64, K = 1 and K > 64, B = 1), text shared / per layer / per layer and
  image, every dtype, zero patch vectors, temperature as a float and as a learnable tensor;
* ``shared_kv_attention`` and ``prompt_align`` (Bayes-PFL's residual cross-modal attention) against the
  attention written out (project q, k, v, split heads, softmax(scale·q kᵀ) v, concat, residual, normalise),
  masks, tile sizes, low precision;
* autograd (opcheck, gradcheck), argument errors, ``topk_mean`` / ``image_scores`` and ``torch.compile``;
* the same op-vs-reference checks on CUDA.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import distkern  # noqa: F401  (loads the extension)
from distkern.ops.align import (anomaly_map, image_scores, pair_directions, prompt_align, shared_kv_attention,
                                topk_mean)

MAP = torch.ops.distkern.anomaly_map
ATTN = torch.ops.distkern.shared_kv_attention
F64 = torch.float64
TAU = 1.0 / 0.07
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# (L, B, P, D, K): a single token and feature; Bayes-PFL's 4 layers and 30 pairs on a small grid; K = 1;
# K > 64 with P > 256; P, D off every tile (32 / 64 / 256 rows, 64-wide D chunks).
MAP_SHAPES = [(1, 1, 1, 3, 1), (4, 1, 37, 50, 30), (2, 3, 65, 70, 1), (3, 2, 257, 33, 70), (1, 2, 300, 100, 65)]
MAP_IDS = ["single", "bayes-small", "K1", "K70-P257", "K65-P300"]
LAYOUTS = ["shared", "layer", "layer-image"]


# ---------------------------------------------------------------------------------------------------------------
# references, written plainly (float64)

def ref_map(patches, text, temperature=TAU):
    """Bayes-PFL: x̂ = x/‖x‖, t̂ = t/‖t‖, logits = τ x̂·t̂ for both prompts of each pair, softmax over the pair,
    the abnormal probability averaged over the pairs and the layers. ``F.normalize`` (eps 1e-12) so that a
    zero token gives x̂ = 0 as the op documents."""
    x = F.normalize(patches.to(F64), dim=-1)  # (L, B, P, D)
    L, B = x.shape[:2]
    t = F.normalize(text.to(F64), dim=-1)
    if t.dim() == 3:  # (K, 2, D)
        t = t[None, None].expand(L, B, *t.shape)
    elif t.dim() == 4:  # (L, K, 2, D)
        t = t[:, None].expand(L, B, *t.shape[1:])
    tau = temperature.to(F64) if isinstance(temperature, torch.Tensor) else temperature
    logits = tau * torch.einsum("lbpd,lbksd->lbpks", x, t)  # (L, B, P, K, 2)
    prob = logits.softmax(dim=-1)[..., 1]
    return prob.mean(dim=(0, 3))  # (B, P)


def ref_attention(q, x, mask=None):
    """softmax(q xᵀ) x and the row log-sum-exp, keys = values = x."""
    s = q.to(F64) @ x.to(F64).transpose(1, 2)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return s.softmax(-1) @ x.to(F64), torch.logsumexp(s, dim=-1)


def ref_rca(text, patches, w_q, w_k, w_v, heads, b_q=None, b_k=None, b_v=None, scale=None, mask=None):
    """Residual cross-modal attention as Bayes-PFL writes it: q = text·W_q + b_q, k = x·W_k + b_k,
    v = x·W_v + b_v, split heads, softmax(scale · q kᵀ) v, concat the heads, add to the text, L2-normalise."""
    d = lambda t: None if t is None else t.to(F64)  # noqa: E731
    text, patches, w_q, w_k, w_v, b_q, b_k, b_v = map(d, (text, patches, w_q, w_k, w_v, b_q, b_k, b_v))
    B, P, _ = patches.shape
    if text.dim() == 2:
        text = text.expand(B, *text.shape)
    T, Dt = text.shape[1:]
    q = text @ w_q
    k = patches @ w_k
    v = patches @ w_v
    if b_q is not None:
        q = q + b_q
    if b_k is not None:
        k = k + b_k
    if b_v is not None:
        v = v + b_v
    E = q.shape[-1]
    e, ev = E // heads, Dt // heads
    sc = e**-0.5 if scale is None else scale
    qh = q.reshape(B, T, heads, e).transpose(1, 2)
    kh = k.reshape(B, P, heads, e).transpose(1, 2)
    vh = v.reshape(B, P, heads, ev).transpose(1, 2)
    s = sc * qh @ kh.transpose(-1, -2)  # (B, H, T, P)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = (s.softmax(dim=-1) @ vh).transpose(1, 2).reshape(B, T, Dt)
    return F.normalize(text + attn, dim=-1)


@pytest.fixture
def one_thread():
    """Tiny ops (gradcheck, opcheck, compile): one intra-op thread, so that OpenMP hand-offs on a loaded
    2-core machine do not dominate. The value tests of the map run with the default thread count (the CPU
    kernel's parallel split over (image, 64-row tile) is exercised there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# inputs

def randn(shape, rng, dtype=F64, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=rng, dtype=F64) * scale).to(dtype=dtype, device=device)


def text_shape(layout, L, B, K, D):
    return {"shared": (K, 2, D), "layer": (L, K, 2, D), "layer-image": (L, B, K, 2, D)}[layout]


def map_inputs(shape, layout, rng, dtype=F64, device="cpu"):
    L, B, P, D, K = shape
    # CLIP-like: patch tokens with a common component (cosines to the prompts ~0.1–0.3) and norms ~ 10
    common = randn((D,), rng)
    patches = randn((L, B, P, D), rng, scale=3.0) + 2.0 * common
    text = randn(text_shape(layout, L, B, K, D), rng) + common
    return patches.to(dtype=dtype, device=device), text.to(dtype=dtype, device=device)


def rca_inputs(rng, B=2, T=6, P=37, D=24, E=32, Dt=16, biases=True, shared_text=False, dtype=F64, device="cpu"):
    """Unit-scale tokens, weights ~ N(0, 1/in) (so scores ~ N(0, 1): a non-trivial softmax)."""
    r = lambda shape, s=1.0: randn(shape, rng, dtype, s, device)  # noqa: E731
    args = dict(text=r((T, Dt) if shared_text else (B, T, Dt)), patches=r((B, P, D)), w_q=r((Dt, E), Dt**-0.5),
                w_k=r((D, E), D**-0.5), w_v=r((D, Dt), D**-0.5))
    if biases:
        args.update(b_q=r((E,), 0.3), b_k=r((E,), 0.3), b_v=r((Dt,), 0.3))
    return args


def rca_call(fn, a, heads, **kw):
    return fn(a["text"], a["patches"], a["w_q"], a["w_k"], a["w_v"], heads, b_q=a.get("b_q"), b_k=a.get("b_k"),
              b_v=a.get("b_v"), **kw)


def random_mask(rng, B, P, keep=0.6, device="cpu"):
    m = torch.rand(B, P, generator=rng) < keep
    m[:, 0] = True  # no fully masked row
    return m.to(device)


def max_err(a, b):
    return float((a.detach().to(F64) - b.detach().to(F64)).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# anomaly_map: values

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=MAP_IDS)
def test_map_float64_matches_reference(shape, layout, rng):
    patches, text = map_inputs(shape, layout, rng)
    out = anomaly_map(patches, text)
    ref = ref_map(patches, text)
    assert out.dtype == F64 and out.shape == (shape[1], shape[2])
    assert max_err(out, ref) < 1e-10
    assert 0.0 < float(out.min()) and float(out.max()) < 1.0
    # the op itself, with the directions τ(t̂₁ − t̂₀)
    assert max_err(MAP(patches, pair_directions(text, TAU)), ref) < 1e-10


def test_map_bayes_pfl_shape_float32(rng):
    """L = 4 layers, 37×37 = 1369 tokens, D = 768, 30 pairs, prompts per layer and image (after RCA)."""
    shape, layout = (4, 2, 1369, 768, 30), "layer-image"
    patches, text = map_inputs(shape, layout, rng, torch.float32)
    out = anomaly_map(patches, text)
    assert out.dtype == torch.float32 and out.shape == (2, 1369)
    assert max_err(out, ref_map(patches, text)) < 1e-5


def test_map_every_cpu_path_agrees(with_and_without_avx512):
    """The sigmoid on AVX-512 lanes (where the CPU has them), on AVX2 lanes (DISTKERN_CPU_GEMM=avx2) and
    scalar (=0) give one map, to float32 rounding; K = 21 leaves a tail of lanes in both widths."""
    code = (
        "import torch, sys, distkern\n"
        "g = torch.Generator().manual_seed(4)\n"
        "p = torch.randn(2, 3, 77, 40, generator=g); d = torch.randn(2, 3, 21, 40, generator=g) * 3\n"
        "torch.save((distkern._C.cpu_math_isa(), torch.ops.distkern.anomaly_map(p, d),\n"
        "            torch.ops.distkern.anomaly_map(p.double(), d.double())), sys.argv[1])\n"
    )
    runs = with_and_without_avx512(code)
    assert runs[2][0] == "none"
    for isa, out, ref in runs:
        assert max_err(out, ref) < 1e-6, isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", MAP_SHAPES[1:4], ids=MAP_IDS[1:4])
def test_map_dtypes(shape, dtype, rng):
    """Low-precision tokens are read exactly and accumulated in float32: the error against the float64
    reference of the same (rounded) inputs is float32 rounding, whatever the storage dtype."""
    patches, text = map_inputs(shape, "layer-image", rng, dtype)
    out = anomaly_map(patches, text)
    assert out.dtype == torch.float32
    assert max_err(out, ref_map(patches, text)) < 1e-5
    # and the op on shared text too
    t = text[0, 0]
    assert max_err(anomaly_map(patches, t), ref_map(patches, t)) < 1e-5


def test_map_zero_patches(rng):
    """A zero token normalises to 0 (eps as F.normalize): σ(0) = ½ for every pair, no NaN, finite gradients
    (those of F.normalize at 0)."""
    L, B, P, D, K = 3, 2, 70, 40, 5
    patches, text = map_inputs((L, B, P, D, K), "layer", rng)
    patches[:, 0, 3] = 0  # zero in every layer
    patches[1, 1, 10] = 0  # zero in one layer
    patches[:, 1, 69] = 0  # last row of a partial tile
    for dtype in (F64, torch.float32, torch.bfloat16):
        x = patches.to(dtype).requires_grad_()
        t = text.to(dtype).requires_grad_()
        out = anomaly_map(x, t)
        assert not out.isnan().any()
        assert float(out[0, 3].detach()) == 0.5 and float(out[1, 69].detach()) == 0.5
        tol = 1e-12 if dtype == F64 else 1e-5
        assert max_err(out, ref_map(x.detach(), t.detach())) < tol
        if dtype != torch.bfloat16:
            g = torch.randn(B, P, generator=rng, dtype=F64).to(out.dtype)
            gx, gt = torch.autograd.grad(out, (x, t), g)
            xr, tr = patches.clone().requires_grad_(), text.clone().requires_grad_()
            rx, rt = torch.autograd.grad(ref_map(xr, tr), (xr, tr), g.to(F64))
            assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
            # the gradient at a zero token is g/eps-sized (1e12): compare relative to its size
            assert max_err(gx, rx) <= tol * float(rx.abs().max())
            assert max_err(gt, rt) <= tol * max(1.0, float(rt.abs().max()))


def test_map_wrapper_forms(rng):
    """A list of L (B, P, D) tensors, a single (B, P, D) layer and a non-contiguous (L, B, P, D) view."""
    patches, text = map_inputs((3, 2, 45, 20, 4), "layer", rng)
    ref = ref_map(patches, text)
    assert max_err(anomaly_map(list(patches.unbind(0)), text), ref) < 1e-12
    assert max_err(anomaly_map(patches[1], text[1]), ref_map(patches[1:2], text[1])) < 1e-12
    nc = patches.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (B, L, P, D) memory
    assert not nc.is_contiguous()
    assert max_err(anomaly_map(nc, text), ref) < 1e-12
    wide = torch.stack([patches, -patches], dim=-1)[..., 0]  # strided last dim
    assert wide.stride(-1) == 2
    assert max_err(anomaly_map(wide, text), ref) < 1e-12


def test_map_empty_batch_and_tokens(rng):
    text = randn((3, 2, 8), rng)
    assert anomaly_map(torch.zeros(2, 0, 5, 8, dtype=F64), text).shape == (0, 5)
    assert anomaly_map(torch.zeros(2, 3, 0, 8, dtype=F64), text).shape == (3, 0)
    # D = 0: x̂ = 0, σ(0) = ½ for every pair (as the reference gives)
    x0, t0 = torch.zeros(2, 3, 5, 0), torch.zeros(4, 2, 0)
    assert torch.equal(anomaly_map(x0, t0), ref_map(x0, t0).float())


def test_map_temperature(rng):
    """τ as a float, as a 0-d tensor (same values) and as a learnable tensor (its gradient); the default 1/0.07."""
    patches, text = map_inputs((2, 2, 33, 24, 6), "layer-image", rng)
    for tau in (1.0, 7.5, TAU):
        ref = ref_map(patches, text, tau)
        assert max_err(anomaly_map(patches, text, tau), ref) < 1e-12
        assert max_err(anomaly_map(patches, text, torch.tensor(tau, dtype=F64)), ref) < 1e-12
    assert max_err(anomaly_map(patches, text), ref_map(patches, text, TAU)) < 1e-12
    for dtype in (F64, torch.float32):
        tau = torch.tensor(9.0, dtype=dtype, requires_grad=True)
        out = anomaly_map(patches.to(dtype), text.to(dtype), tau)
        (g,) = torch.autograd.grad(out.sum(), tau)
        tr = torch.tensor(9.0, dtype=F64, requires_grad=True)
        (rg,) = torch.autograd.grad(ref_map(patches, text, tr).sum(), tr)
        assert abs(float(g) - float(rg)) <= (1e-10 if dtype == F64 else 1e-4) * max(1.0, abs(float(rg)))
    # a learnable logit scale exp(s) as CLIP keeps it
    s = torch.tensor(math.log(TAU), dtype=F64, requires_grad=True)
    out = anomaly_map(patches, text, s.exp())
    out.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad)


# ---------------------------------------------------------------------------------------------------------------
# anomaly_map: autograd

@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_map_gradcheck(layout, rng):
    patches, text = map_inputs((2, 2, 7, 5, 3), layout, rng)
    patches.requires_grad_()
    text.requires_grad_()
    tau = torch.tensor(2.5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, s: anomaly_map(x, t, s), (patches, text, tau))
    # the op itself w.r.t. patches and directions
    dirs = pair_directions(text.detach(), 2.5).requires_grad_()
    assert torch.autograd.gradcheck(MAP, (patches, dirs))


def test_map_grad_float32_matches_reference(rng):
    patches, text = map_inputs((4, 2, 100, 72, 30), "layer-image", rng, torch.float32)
    x, t = patches.clone().requires_grad_(), text.clone().requires_grad_()
    g = torch.rand(2, 100, generator=rng, dtype=F64)
    gx, gt = torch.autograd.grad(anomaly_map(x, t), (x, t), g.float())
    xr, tr = patches.double().requires_grad_(), text.double().requires_grad_()
    rx, rt = torch.autograd.grad(ref_map(xr, tr), (xr, tr), g)
    assert gx.dtype == torch.float32 and gt.dtype == torch.float32
    assert max_err(gx, rx) <= 1e-5 * float(rx.abs().max())
    assert max_err(gt, rt) <= 1e-5 * float(rt.abs().max())


# opcheck's test_aot_dispatch_dynamic costs seconds per call: run in full on one layout per dtype
FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dirs_dim,dtype,full", [(2, torch.float32, False), (3, torch.bfloat16, False),
                                                 (4, torch.float32, True), (4, F64, False)],
                         ids=["KD-f32", "LKD-bf16", "LBKD-f32", "LBKD-f64"])
def test_map_opcheck(dirs_dim, dtype, full, rng):
    L, B, P, D, K = 2, 3, 70, 20, 5
    patches = randn((L, B, P, D), rng, dtype).requires_grad_(dtype != torch.bfloat16)
    shape = {2: (K, D), 3: (L, K, D), 4: (L, B, K, D)}[dirs_dim]
    dirs = randn(shape, rng, F64 if dtype == F64 else torch.float32, 3.0).requires_grad_()
    torch.library.opcheck(MAP, (patches, dirs), **({} if full else {"test_utils": FAST_OPCHECK}))


# ---------------------------------------------------------------------------------------------------------------
# topk_mean, image_scores

def test_topk_mean(rng):
    amap = torch.rand(4, 37 * 37, generator=rng, dtype=F64)
    for k in (1, 5, 1000, 1369):
        ref = amap.sort(dim=1, descending=True).values[:, :k].mean(1)
        assert max_err(topk_mean(amap, k), ref) < 1e-14
    assert max_err(topk_mean(amap, 5000), amap.mean(1)) < 1e-14  # k > P: all of them
    assert max_err(topk_mean(amap, 0), amap.max(1).values) == 0  # k < 1: the max
    grid = amap.reshape(4, 37, 37)
    assert max_err(topk_mean(grid, 20), topk_mean(amap, 20)) == 0


def test_image_scores(rng):
    amap = torch.rand(6, 300, generator=rng, dtype=F64)
    text_score = torch.rand(6, 1, generator=rng, dtype=F64)

    def minmax(v):
        return (v - v.min()) / (v.max() - v.min())

    top = amap.sort(dim=1, descending=True).values[:, :20].mean(1)
    assert max_err(image_scores(amap, k=20), minmax(top)) < 1e-14
    for w in (0.5, 0.2):
        ref = w * minmax(text_score.reshape(-1)) + (1 - w) * minmax(top)
        assert max_err(image_scores(amap, text_score, k=20, weight=w), ref) < 1e-14
    default = amap.sort(dim=1, descending=True).values[:, :300].mean(1)  # k = 2000 > P
    assert max_err(image_scores(amap), minmax(default)) < 1e-14
    # all images alike: no division by zero
    assert torch.isfinite(image_scores(torch.ones(3, 10))).all()


# ---------------------------------------------------------------------------------------------------------------
# shared_kv_attention

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_attention_matches_reference(dtype, masked, rng):
    B, M, P, D = 3, 11, 300, 40
    q = randn((B, M, D), rng, dtype, D**-0.5)
    x = randn((B, P, D), rng, dtype)
    mask = random_mask(rng, B, P) if masked else None
    out, lse = shared_kv_attention(q, x, mask)
    ro, rl = ref_attention(q, x, mask)
    assert out.dtype == dtype and lse.dtype == dtype
    tol = 1e-12 if dtype == F64 else 2e-6
    assert max_err(out, ro) < tol and max_err(lse, rl) < tol * 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_attention_low_precision(dtype, rng):
    """Scores and the online softmax in float32; the output rounded once to the input dtype."""
    B, M, P, D = 2, 9, 300, 48
    q = randn((B, M, D), rng, dtype, D**-0.5)
    x = randn((B, P, D), rng, dtype)
    out, lse = shared_kv_attention(q, x)
    ro, rl = ref_attention(q, x)  # from the same rounded inputs
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert max_err(out, ro) <= EPS[dtype] * float(ro.abs().max()) + 1e-5
    assert max_err(lse, rl) < 1e-4


@pytest.mark.usefixtures("one_thread")
def test_attention_tiles(rng):
    B, M, P, D = 2, 5, 37, 12
    q = randn((B, M, D), rng, F64, 0.5).requires_grad_()
    x = randn((B, P, D), rng).requires_grad_()
    mask = random_mask(rng, B, P)
    go = randn((B, M, D), rng)
    gl = randn((B, M), rng)
    results = []
    for tile in (1, 7, 256, P, P + 5):
        out, lse = shared_kv_attention(q, x, mask, tile=tile)
        grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, x))
        results.append((out, lse, *grads))
    ro, rl = ref_attention(q.detach(), x.detach(), mask)
    for r in results:
        assert max_err(r[0], ro) < 1e-12 and max_err(r[1], rl) < 1e-12
        for a, b in zip(r, results[0]):
            assert max_err(a, b) < 1e-12


@pytest.mark.usefixtures("one_thread")
def test_attention_mask_no_influence(rng):
    B, M, P, D = 2, 4, 50, 16
    q = randn((B, M, D), rng, F64, 0.5).requires_grad_()
    x = randn((B, P, D), rng).requires_grad_()
    mask = random_mask(rng, B, P, keep=0.5)
    out, lse = shared_kv_attention(q, x, mask, tile=7)
    x2 = x.detach().clone()
    x2[~mask] = 1e3 * torch.randn(int((~mask).sum()), D, generator=rng, dtype=F64)
    out2, lse2 = shared_kv_attention(q, x2, mask, tile=7)
    assert torch.equal(out.detach(), out2) and torch.equal(lse.detach(), lse2)
    gx = torch.autograd.grad(out.sum() + lse.sum(), x)[0]
    assert torch.all(gx[~mask] == 0)
    # the same as attending over the kept tokens only
    for b in range(B):
        ro, rl = ref_attention(q[b:b + 1].detach(), x[b:b + 1, mask[b]].detach())
        assert max_err(out[b], ro[0]) < 1e-12 and max_err(lse[b], rl[0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_attention_empty_batch(dtype, rng):
    """B = 0 images (and P = 0 tokens) give empty results and gradients, on every product path."""
    q = torch.zeros(0, 4, 8, dtype=dtype, requires_grad=True)
    x = torch.zeros(0, 5, 8, dtype=dtype, requires_grad=True)
    out, lse = shared_kv_attention(q, x)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape and x.grad.shape == x.shape
    text, w_q = randn((4, 8), rng).to(dtype), randn((8, 8), rng).to(dtype)
    assert prompt_align(text, torch.zeros(0, 5, 8, dtype=dtype), w_q, None, None, 2).shape == (0, 4, 8)


def test_attention_fully_masked_row(rng):
    """A row whose tokens are all masked out (a fully padded image) attends to nothing: output 0 as torch's
    scaled_dot_product_attention, lse −inf, zero gradients — it used to be NaN, and through prompt_align's
    shared projections one padded image made every parameter's gradient NaN. Other rows are unaffected."""
    B, M, P, D = 3, 4, 20, 8
    q, x = randn((B, M, D), rng), randn((B, P, D), rng)
    mask = random_mask(rng, B, P)
    mask[1] = False
    for tile in (1, 7, 256):
        out, lse = shared_kv_attention(q, x, mask, tile=tile)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.all(lse[1] == float("-inf"))
        ro, rl = ref_attention(q, x, mask)
        keep = [0, 2]
        assert max_err(out[keep], ro[keep]) < 1e-12 and max_err(lse[keep], rl[keep]) < 1e-12
    sdpa = F.scaled_dot_product_attention(q, x, x, attn_mask=mask[:, None, :], scale=1.0)
    assert max_err(shared_kv_attention(q, x, mask)[0], sdpa) < 1e-12
    qg, xg = q.clone().requires_grad_(), x.clone().requires_grad_()
    out, lse = shared_kv_attention(qg, xg, mask)
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    assert torch.isfinite(qg.grad).all() and torch.equal(qg.grad[1], torch.zeros_like(qg.grad[1]))
    assert torch.isfinite(xg.grad).all() and torch.equal(xg.grad[1], torch.zeros_like(xg.grad[1]))
    text, w_q = randn((M, D), rng).requires_grad_(), randn((D, D), rng).requires_grad_()
    prompt_align(text, x, w_q, None, None, 2, mask=mask).sum().backward()
    assert torch.isfinite(w_q.grad).all() and torch.isfinite(text.grad).all()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_attention_gradcheck(masked, rng):
    B, M, P, D = 2, 3, 9, 4
    q = randn((B, M, D), rng, F64, 0.5).requires_grad_()
    x = randn((B, P, D), rng).requires_grad_()
    mask = random_mask(rng, B, P) if masked else None
    assert torch.autograd.gradcheck(lambda a, b: shared_kv_attention(a, b, mask, tile=4), (q, x))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("masked,dtype,full", [(False, torch.float32, False), (True, torch.float32, True),
                                               (True, F64, False)], ids=["nomask-f32", "mask-f32", "mask-f64"])
def test_attention_opcheck(masked, dtype, full, rng):
    B, M, P, D = 2, 5, 19, 8
    q = randn((B, M, D), rng, dtype, 0.5).requires_grad_()
    x = randn((B, P, D), rng, dtype).requires_grad_()
    mask = random_mask(rng, B, P) if masked else None
    torch.library.opcheck(ATTN, (q, x, mask, 7), **({} if full else {"test_utils": FAST_OPCHECK}))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("args", ["q,x", "q,x,None,256", "q,x,mask,256", "q,x,mask"])
def test_attention_opcheck_default_args(args, rng):
    """The schema's defaults (mask=None, tile=256), given or left out: what prompt_align passes by default."""
    B, M, P, D = 2, 5, 19, 8
    q = randn((B, M, D), rng, torch.float32, 0.5).requires_grad_()
    x = randn((B, P, D), rng, torch.float32).requires_grad_()
    env = {"q": q, "x": x, "mask": random_mask(rng, B, P), "None": None, "256": 256}
    torch.library.opcheck(ATTN, tuple(env[a] for a in args.split(",")), test_utils=FAST_OPCHECK)


@pytest.mark.usefixtures("one_thread")
def test_attention_opcheck_noncontiguous_q(rng):
    """A transposed (B, M, D) view of q: the fake output must have the real output's (contiguous) strides."""
    q = randn((2, 8, 5), rng, torch.float32, 0.5).transpose(1, 2).requires_grad_()
    x = randn((2, 19, 8), rng, torch.float32).requires_grad_()
    out, _ = shared_kv_attention(q, x, None, tile=7)
    assert out.is_contiguous()
    torch.library.opcheck(ATTN, (q, x, None, 7), test_utils=FAST_OPCHECK)


# ---------------------------------------------------------------------------------------------------------------
# prompt_align (residual cross-modal attention)

RCA_SHAPES = [  # (B, T, P, D, E, Dt, H)
    dict(B=1, T=60, P=37, D=24, E=32, Dt=16, H=4),  # B = 1, Bayes-PFL's 60 prompts
    dict(B=3, T=5, P=257, D=70, E=12, Dt=12, H=3),  # P, D off the tiles, D ≠ E
    dict(B=2, T=1, P=65, D=8, E=8, Dt=8, H=1),  # one prompt, one head
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("scale", [None, "E"], ids=["scale-head", "scale-E"])
@pytest.mark.parametrize("shared_text", [False, True], ids=["text-batch", "text-shared"])
@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", RCA_SHAPES, ids=["B1-T60", "P257-D70", "T1-H1"])
def test_prompt_align_matches_reference(shape, biases, shared_text, scale, rng):
    H = shape["H"]
    dims = {k: v for k, v in shape.items() if k != "H"}
    sc = None if scale is None else shape["E"] ** -0.5  # Bayes-PFL: E^-0.5
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        a = rca_inputs(rng, **dims, biases=biases, shared_text=shared_text, dtype=dtype)
        out = rca_call(prompt_align, a, H, scale=sc, tile=64)
        ref = rca_call(ref_rca, a, H, scale=sc)
        assert out.dtype == dtype and out.shape == (shape["B"], shape["T"], shape["Dt"])
        assert max_err(out, ref) < tol
        assert max_err(out.norm(dim=-1), torch.ones(())) < tol


def test_prompt_align_bayes_pfl_shape(rng):
    """T = 60, P = 1369, D = E = Dt = 768, H = 4, scale 768^-0.5, float32."""
    a = rca_inputs(rng, B=1, T=60, P=1369, D=768, E=768, Dt=768, biases=True, shared_text=True,
                   dtype=torch.float32)
    out = rca_call(prompt_align, a, 4, scale=768**-0.5)
    assert max_err(out, rca_call(ref_rca, a, 4, scale=768**-0.5)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_prompt_align_low_precision(dtype, rng):
    """Against the float64 reference of the same rounded inputs: a handful of roundings (q, the token-space
    queries, the attention output, its projection, the residual sum) to the storage dtype, each ≲ ½ ulp of
    the output's scale; bounded by 8 ulps of the largest component."""
    a = rca_inputs(rng, B=2, T=20, P=300, D=96, E=96, Dt=96, biases=True, dtype=dtype)
    out = rca_call(prompt_align, a, 4, scale=96**-0.5)
    ref = rca_call(ref_rca, a, 4, scale=96**-0.5)
    assert out.dtype == dtype and not out.isnan().any()
    assert max_err(out, ref) <= 8 * EPS[dtype] * float(ref.abs().max())


@pytest.mark.usefixtures("one_thread")
def test_prompt_align_tiles(rng):
    a = rca_inputs(rng, B=2, T=4, P=45, D=12, E=8, Dt=8)
    for k in a:
        a[k].requires_grad_()
    mask = random_mask(rng, 2, 45)
    ref = rca_call(ref_rca, {k: v.detach() for k, v in a.items()}, 2, mask=mask)
    names = list(a)
    first = None
    for tile in (1, 7, 256, 45, 1000):
        out = rca_call(prompt_align, a, 2, mask=mask, tile=tile)
        assert max_err(out, ref) < 1e-12
        grads = torch.autograd.grad(out.pow(3).sum(), [a[k] for k in names], allow_unused=True)
        grads = [torch.zeros_like(a[k]) if g is None else g for k, g in zip(names, grads)]
        if first is None:
            first = (out, grads)
        else:
            assert max_err(out, first[0]) < 1e-12
            for g, g0 in zip(grads, first[1]):
                assert max_err(g, g0) < 1e-12


@pytest.mark.usefixtures("one_thread")
def test_prompt_align_mask_no_influence(rng):
    B, P, D = 3, 40, 16
    a = rca_inputs(rng, B=B, T=5, P=P, D=D, E=16, Dt=8)
    mask = random_mask(rng, B, P, keep=0.5)
    mask[2] = True  # an unmasked image in the batch
    out = rca_call(prompt_align, a, 2, mask=mask, tile=7)
    assert max_err(out, rca_call(ref_rca, a, 2, mask=mask)) < 1e-12
    b = dict(a)
    b["patches"] = a["patches"].clone()
    b["patches"][~mask] = 1e3 * torch.randn(int((~mask).sum()), D, generator=rng, dtype=F64)
    assert torch.equal(rca_call(prompt_align, b, 2, mask=mask, tile=7), out)
    # gradients w.r.t. masked tokens are zero
    x = a["patches"].clone().requires_grad_()
    (gx,) = torch.autograd.grad(rca_call(prompt_align, dict(a, patches=x), 2, mask=mask).sum(), x)
    assert torch.all(gx[~mask] == 0) and gx[mask].abs().max() > 0
    # an all-True mask is no mask
    full = torch.ones(B, P, dtype=torch.bool)
    assert max_err(rca_call(prompt_align, a, 2, mask=full), rca_call(prompt_align, a, 2)) < 1e-14
    # padding: the same as the image cut to its kept tokens
    for i in range(B):
        ai = dict(a, text=a["text"][i:i + 1], patches=a["patches"][i:i + 1, mask[i]])
        assert max_err(out[i], rca_call(ref_rca, ai, 2)[0]) < 1e-12


def test_prompt_align_fully_masked_image(rng):
    """An image with every token masked out has nothing to attend to: its attention term is 0 (value bias
    included, as scaled_dot_product_attention on the projected values gives), so its output is the normalised
    text; the other images are unaffected."""
    a = rca_inputs(rng, B=3, T=4, P=20, D=8, E=8, Dt=8)
    mask = random_mask(rng, 3, 20)
    mask[0] = False
    out = rca_call(prompt_align, a, 2, mask=mask)
    text0 = a["text"][0] if a["text"].dim() == 3 else a["text"]
    assert max_err(out[0], F.normalize(text0, dim=-1)) < 1e-12
    assert not out[1:].isnan().any()
    assert max_err(out[1:], rca_call(ref_rca, a, 2, mask=mask)[1:]) < 1e-12


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shared_text", [False, True], ids=["text-batch", "text-shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_prompt_align_gradcheck(masked, shared_text, rng):
    """W.r.t. every tensor argument: text, patches, w_q, w_k, w_v, b_q, b_k (zero: it cancels), b_v."""
    a = rca_inputs(rng, B=2, T=3, P=7, D=4, E=4, Dt=4, shared_text=shared_text)
    names = list(a)
    mask = random_mask(rng, 2, 7) if masked else None

    def f(*ts):
        kw = dict(zip(names, ts))
        return rca_call(prompt_align, kw, 2, mask=mask, tile=3, scale=0.7)

    inputs = tuple(a[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.usefixtures("one_thread")
def test_prompt_align_grads_match_reference(rng):
    a = rca_inputs(rng, B=2, T=6, P=50, D=20, E=24, Dt=12)
    mask = random_mask(rng, 2, 50)
    names = list(a)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 2e-5)):
        ours = {k: v.to(dtype).requires_grad_() for k, v in a.items()}
        refs = {k: v.clone().requires_grad_() for k, v in a.items()}
        g = randn((2, 6, 12), rng)
        go = torch.autograd.grad(rca_call(prompt_align, ours, 3, mask=mask), [ours[k] for k in names], g.to(dtype),
                                 allow_unused=True)
        gr = torch.autograd.grad(rca_call(ref_rca, refs, 3, mask=mask), [refs[k] for k in names], g)
        for k, x, r in zip(names, go, gr):
            x = torch.zeros_like(r) if x is None else x
            assert max_err(x, r) <= tol * max(1.0, float(r.abs().max())), k
        assert float(gr[names.index("b_k")].abs().max()) < 1e-12  # key biases cancel in the softmax


# ---------------------------------------------------------------------------------------------------------------
# argument errors

def test_map_errors(rng):
    x = randn((2, 3, 10, 8), rng, torch.float32)
    d = randn((4, 8), rng, torch.float32)
    with pytest.raises(ValueError, match=r"patches is an empty list"):
        anomaly_map([], torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match=r"anomaly_map: patches must be a 4-D tensor"):
        MAP(x[0], d)  # 3-D patches to the op
    with pytest.raises(ValueError, match=r"dirs must have the patches' D = 8"):
        MAP(x, randn((4, 7), rng, torch.float32))
    with pytest.raises(ValueError, match=r"dirs \(L, K, D\) must have the patches' L = 2"):
        MAP(x, randn((3, 4, 8), rng, torch.float32))
    with pytest.raises(ValueError, match=r"dirs \(L, B, K, D\) must match the patches' L = 2 and B = 3"):
        MAP(x, randn((2, 2, 4, 8), rng, torch.float32))
    with pytest.raises(ValueError, match=r"dirs \(L, B, K, D\) must match the patches' L = 2 and B = 3"):
        MAP(x, randn((1, 3, 4, 8), rng, torch.float32))
    with pytest.raises(ValueError, match=r"dirs must be \(K, D\), \(L, K, D\) or \(L, B, K, D\)"):
        MAP(x, randn((8,), rng, torch.float32))
    with pytest.raises(ValueError, match=r"at least one prompt pair"):
        MAP(x, randn((0, 8), rng, torch.float32))
    with pytest.raises(ValueError, match=r"at least one layer"):
        MAP(x[:0], d)  # L = 0
    with pytest.raises(ValueError, match=r"at least one layer"):
        anomaly_map(x[:0], randn((4, 2, 8), rng))
    with pytest.raises(TypeError, match=r"patches must be float32, float16, bfloat16 or float64"):
        MAP(x.int(), d)
    with pytest.raises(TypeError, match=r"dirs must be float32"):
        MAP(x, d.long())
    # the wrapper speaks of its own arguments (patches, text), not of the op's pair directions
    with pytest.raises(ValueError, match=r"text must be prompt pairs \(K, 2, D\), \(L, K, 2, D\) per layer"):
        anomaly_map(x, randn((4, 8), rng))  # no pair dimension
    with pytest.raises(ValueError, match=r"text must be prompt pairs \(K, 2, D\)"):
        anomaly_map(x, randn((2, 4, 3, 8), rng))  # a triple, not a pair
    with pytest.raises(ValueError, match=r"text has D = 9 features per prompt but patches have D = 8"):
        anomaly_map(x, randn((4, 2, 9), rng))
    with pytest.raises(ValueError, match=r"per-layer text \(3, 4, 2, 8\) must have the patches' L = 2 layers"):
        anomaly_map(x, randn((3, 4, 2, 8), rng))
    with pytest.raises(ValueError, match=r"per-image text \(2, 1, 4, 2, 8\) must have the patches' B = 3 images"):
        anomaly_map(x, randn((2, 1, 4, 2, 8), rng))
    with pytest.raises(ValueError, match=r"patches must be \(B, P, D\) tokens of one layer or \(L, B, P, D\)"):
        anomaly_map(x[0, 0], randn((4, 2, 8), rng))  # 2-D
    assert anomaly_map(x[0], randn((4, 2, 8), rng)).shape == (3, 10)  # (B, P, D): one layer
    with pytest.raises(TypeError, match=r"text must be a tensor of prompt pairs"):
        anomaly_map(x, [[0.0] * 8] * 2)
    with pytest.raises(TypeError, match=r"patches must be a tensor"):
        anomaly_map(3.0, randn((4, 2, 8), rng))


def test_attention_errors(rng):
    q, x = randn((3, 5, 8), rng), randn((3, 10, 8), rng)
    with pytest.raises(ValueError, match=r"shared_kv_attention: q must be a 3-D tensor"):
        shared_kv_attention(q[0], x)
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor"):
        shared_kv_attention(q, x[0])
    with pytest.raises(ValueError, match=r"must share B and D"):
        shared_kv_attention(q[:, :, :7], x)
    with pytest.raises(ValueError, match=r"must share B and D"):
        shared_kv_attention(q[:2], x)
    with pytest.raises(ValueError, match=r"mask must be \(B, P\) = \(3, 10\)"):
        shared_kv_attention(q, x, torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(B, P\) = \(3, 10\)"):
        shared_kv_attention(q, x, torch.ones(3, 10, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be bool"):
        shared_kv_attention(q, x, torch.ones(3, 10))
    with pytest.raises(ValueError, match=r"tile must be >= 1"):
        shared_kv_attention(q, x, tile=0)
    with pytest.raises(TypeError, match=r"q must be float32"):
        shared_kv_attention(q.long(), x)


def test_prompt_align_errors(rng):
    a = rca_inputs(rng, B=3, T=6, P=10, D=8, E=12, Dt=8, biases=False)
    t, x, wq, wk, wv = a["text"], a["patches"], a["w_q"], a["w_k"], a["w_v"]
    with pytest.raises(ValueError, match=r"prompt_align: text must be \(T, Dt\) or \(B, T, Dt\) and patches"):
        prompt_align(t, x[0], wq, wk, wv, 4)
    with pytest.raises(ValueError, match=r"text must be"):
        prompt_align(t[None], x, wq, wk, wv, 4)
    with pytest.raises(ValueError, match=r"text \(B, T, Dt\) must have the patches' B = 3"):
        prompt_align(t[:2], x, wq, wk, wv, 4)
    with pytest.raises(ValueError, match=r"w_q must be \(Dt, E\) with Dt = 8"):
        prompt_align(t, x, wq[:7], wk, wv, 4)
    with pytest.raises(ValueError, match=r"w_q must be \(Dt, E\)"):
        prompt_align(t, x, wq[0], wk, wv, 4)
    with pytest.raises(ValueError, match=r"w_k must be \(D, E\) = \(8, 12\)"):
        prompt_align(t, x, wq, wk[:, :8], wv, 4)
    with pytest.raises(ValueError, match=r"w_k must be \(D, E\)"):
        prompt_align(t, x, wq, wk.T, wv, 4)
    with pytest.raises(ValueError, match=r"w_v must be \(D, Dt\) = \(8, 8\)"):
        prompt_align(t, x, wq, wk, wv[:, :4], 4)
    for h in (3, 5, 0, -2, 4.0):  # 3 divides E = 12 but not Dt = 8
        with pytest.raises(ValueError, match=r"heads must divide E = 12 and Dt = 8"):
            prompt_align(t, x, wq, wk, wv, h)
    with pytest.raises(ValueError, match=r"mask must be \(B, P\) = \(3, 10\)"):
        prompt_align(t, x, wq, wk, wv, 4, mask=torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(B, P\)"):
        prompt_align(t, x, wq, wk, wv, 4, mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be bool"):
        prompt_align(t, x, wq, wk, wv, 4, mask=torch.ones(3, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"tile must be >= 1"):
        prompt_align(t, x, wq, wk, wv, 4, tile=0)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("masked,tile", [(True, 8), (False, 256), (True, 256)],
                         ids=["mask-tile8", "nomask-default-tile", "mask-default-tile"])
def test_compile_fullgraph(masked, tile, rng):
    """RCA on each layer's tokens feeds the per-layer, per-image prompts of the map, as in Bayes-PFL; with
    prompt_align's defaults (no mask, tile 256) too, which it passes on to shared_kv_attention."""
    L, B, K, P, D, H = 2, 2, 3, 30, 16, 2
    patches = randn((L, B, P, D), rng, torch.float32)
    text = randn((K, 2, D), rng, torch.float32)
    w = [rca_inputs(rng, B=B, T=2 * K, P=P, D=D, E=D, Dt=D, dtype=torch.float32) for _ in range(L)]
    mask = random_mask(rng, B, P) if masked else None
    tau = torch.tensor(TAU, requires_grad=True)

    def fn(patches, text, tau):
        aligned = []
        for layer in range(L):
            p = w[layer]
            t = prompt_align(text.reshape(2 * K, D), patches[layer], p["w_q"], p["w_k"], p["w_v"], H,
                             b_q=p["b_q"], b_k=p["b_k"], b_v=p["b_v"], scale=D**-0.5, mask=mask, tile=tile)
            aligned.append(t.reshape(B, K, 2, D))
        return anomaly_map(patches, torch.stack(aligned), tau)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = fn(patches, text, tau)
    got = compiled(patches, text, tau)
    assert got.shape == (B, P)
    assert max_err(got, eager) < 1e-6
    # and backward through the compiled graph
    xs = [patches.clone().requires_grad_() for _ in range(2)]
    ts = [text.clone().requires_grad_() for _ in range(2)]
    g_e = torch.autograd.grad(fn(xs[0], ts[0], tau).sum(), (xs[0], ts[0], tau))
    g_c = torch.autograd.grad(compiled(xs[1], ts[1], tau).sum(), (xs[1], ts[1], tau))
    for a, b in zip(g_c, g_e):
        assert max_err(a, b) <= 1e-5 * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.cuda
class TestCuda:
    dev = "cuda"

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("shape", MAP_SHAPES + [(4, 3, 1369, 768, 30)], ids=MAP_IDS + ["bayes-pfl"])
    def test_map_matches_reference(self, shape, layout, rng):
        for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)):
            patches, text = map_inputs(shape, layout, rng, dtype, self.dev)
            out = anomaly_map(patches, text)
            assert out.device.type == "cuda" and out.dtype == (F64 if dtype == F64 else torch.float32)
            ref = ref_map(patches.cpu(), text.cpu())
            assert max_err(out.cpu(), ref) < tol
            # same as the CPU kernel
            assert max_err(out.cpu(), anomaly_map(patches.cpu(), text.cpu())) < tol

    def test_map_zero_patches_and_grads(self, rng):
        patches, text = map_inputs((3, 2, 70, 40, 5), "layer-image", rng, F64)
        patches[:, 0, 3] = 0
        x = patches.to(self.dev).requires_grad_()
        t = text.to(self.dev).requires_grad_()
        tau = torch.tensor(5.0, dtype=F64, device=self.dev, requires_grad=True)
        out = anomaly_map(x, t, tau)
        assert float(out[0, 3].detach()) == 0.5 and not out.isnan().any()
        g = randn(out.shape, rng, F64)
        got = torch.autograd.grad(out, (x, t, tau), g.to(self.dev))
        xr, tr = patches.clone().requires_grad_(), text.clone().requires_grad_()
        taur = torch.tensor(5.0, dtype=F64, requires_grad=True)
        want = torch.autograd.grad(ref_map(xr, tr, taur), (xr, tr, taur), g)
        for a, b in zip(got, want):
            assert max_err(a.cpu(), b) <= 1e-10 * max(1.0, float(b.abs().max()))

    def test_map_gradcheck_and_opcheck(self, rng):
        patches, text = map_inputs((2, 2, 7, 5, 3), "layer-image", rng, F64, self.dev)
        patches.requires_grad_()
        text.requires_grad_()
        tau = torch.tensor(2.5, dtype=F64, device=self.dev, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, t, s: anomaly_map(x, t, s), (patches, text, tau))
        for dtype in (torch.float32, torch.bfloat16):
            x = randn((2, 3, 70, 20), rng, dtype, device=self.dev)
            d = randn((2, 3, 5, 20), rng, torch.float32, 3.0, self.dev).requires_grad_()
            torch.library.opcheck(MAP, (x, d))

    @pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
    def test_attention_matches_reference(self, dtype, rng):
        B, M, P, D = 3, 11, 300, 40
        q = randn((B, M, D), rng, dtype, D**-0.5, self.dev)
        x = randn((B, P, D), rng, dtype, device=self.dev)
        mask = random_mask(rng, B, P, device=self.dev)
        for m in (None, mask):
            out, lse = shared_kv_attention(q, x, m, tile=64)
            ro, rl = ref_attention(q.cpu(), x.cpu(), None if m is None else m.cpu())
            tol = {F64: 1e-12, torch.float32: 1e-5}.get(dtype)
            if tol is None:
                assert max_err(out.cpu(), ro) <= EPS[dtype] * float(ro.abs().max()) + 1e-5
            else:
                # TF32 may be enabled for CUDA matmuls by the user; tests run with the default (off)
                assert max_err(out.cpu(), ro) < tol
            assert max_err(lse.cpu(), rl) < 1e-4
        torch.library.opcheck(ATTN, (q.float().requires_grad_(), x.float().requires_grad_(), mask, 7))

    def test_prompt_align_matches_reference(self, rng):
        for shape in RCA_SHAPES:
            H = shape["H"]
            dims = {k: v for k, v in shape.items() if k != "H"}
            for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
                a = rca_inputs(rng, **dims, dtype=dtype, device=self.dev)
                mask = random_mask(rng, shape["B"], shape["P"], device=self.dev)
                for m in (None, mask):
                    out = rca_call(prompt_align, a, H, mask=m)
                    ref = rca_call(ref_rca, {k: v.cpu() for k, v in a.items()}, H,
                                   mask=None if m is None else m.cpu())
                    assert out.device.type == "cuda"
                    assert max_err(out.cpu(), ref) < tol
        for dtype in (torch.float16, torch.bfloat16):
            a = rca_inputs(rng, B=2, T=20, P=300, D=96, E=96, Dt=96, dtype=dtype, device=self.dev)
            out = rca_call(prompt_align, a, 4, scale=96**-0.5)
            ref = rca_call(ref_rca, {k: v.cpu() for k, v in a.items()}, 4, scale=96**-0.5)
            assert max_err(out.cpu(), ref) <= 8 * EPS[dtype] * float(ref.abs().max())

    def test_prompt_align_gradcheck(self, rng):
        a = rca_inputs(rng, B=2, T=3, P=7, D=4, E=4, Dt=4, device=self.dev)
        names = list(a)
        mask = random_mask(rng, 2, 7, device=self.dev)

        def f(*ts):
            return rca_call(prompt_align, dict(zip(names, ts)), 2, mask=mask, tile=3)

        assert torch.autograd.gradcheck(f, tuple(a[k].requires_grad_() for k in names))


# ---------------------------------------------------------------------------------------------------------------
# prompt_align without key / value projections (Bayes-PFL's RCA: keys = values = the projected tokens)

@pytest.mark.parametrize("masked", [False, True])
def test_prompt_align_identity_projections(masked):
    g = torch.Generator().manual_seed(11)
    B, P, D, T, H = 2, 37, 24, 5, 4
    text = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    patches = torch.randn(B, P, D, generator=g, dtype=torch.float64, requires_grad=True)
    wq = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    bq = torch.randn(D, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, P, generator=g) > 0.3) if masked else None
    eye = torch.eye(D, dtype=torch.float64)
    got = prompt_align(text, patches, wq, None, None, H, b_q=bq, scale=0.2, mask=mask, tile=8)
    want = prompt_align(text, patches, wq, eye, eye, H, b_q=bq, scale=0.2, mask=mask, tile=8)
    assert (got - want).abs().max() < 1e-12
    assert torch.autograd.gradcheck(
        lambda t, p, w: prompt_align(t, p, w, None, None, H, b_q=bq, scale=0.2, mask=mask, tile=8),
        (text, patches, wq))


def test_prompt_align_identity_errors():
    x = torch.randn(2, 10, 8)
    t = torch.randn(3, 8)
    with pytest.raises(ValueError, match="both w_k and w_v"):
        prompt_align(t, x, torch.randn(8, 8), torch.randn(8, 8), None, 2)
    with pytest.raises(ValueError, match="E = D = Dt"):
        prompt_align(t, x, torch.randn(8, 4), None, None, 2)
    with pytest.raises(ValueError, match="heads must divide"):
        prompt_align(t, x, torch.randn(8, 8), None, None, 3)


def test_attention_tile_per_device():
    """256 tokens a step on the CPU; on a GPU (any non-CPU device: meta here) as many as keep a step's
    (B, M, tile) scores under 2^24 elements, between 256 and P; a given tile wins."""
    from distkern.ops.align import attention_tile

    def qx(B, M, P, device):
        return torch.empty(B, M, 768, device=device), torch.empty(B, P, 768, device=device)

    assert attention_tile(*qx(32, 240, 1369, "cpu")) == 256
    assert attention_tile(*qx(32, 240, 1369, "meta")) == 1369  # Bayes-PFL's B = 32: one step
    assert attention_tile(*qx(64, 240, 4096, "meta")) == (1 << 24) // (64 * 240)
    assert attention_tile(*qx(4096, 240, 4096, "meta")) == 256
    assert attention_tile(*qx(1, 1, 100, "meta")) == 100
    assert attention_tile(*qx(32, 240, 1369, "meta"), tile=7) == 7
