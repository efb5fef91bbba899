"""The fused CUDA kernel of shared_kv_attention (opt-in: DISTKERN_FUSED_ATTENTION=1 or
distkern._C.set_fused_attention(True)) against float64 references and against the composite path.
GPU only; these are the tests that must pass before the fused kernel becomes the default."""
import pytest
import torch

import distkern
from distkern.ops.align import prompt_align, shared_kv_attention

F64 = torch.float64


@pytest.fixture
def fused():
    before = distkern._C.fused_attention()
    distkern._C.set_fused_attention(True)
    yield
    distkern._C.set_fused_attention(before)


def _ref(q, x, mask):
    s = q.double() @ x.double().transpose(1, 2)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(s, -1) @ x.double(), torch.logsumexp(s, -1)


@pytest.mark.cuda
@pytest.mark.parametrize("B,M,P,D", [(1, 1, 1, 1), (2, 13, 37, 70), (3, 240, 1369, 768), (1, 9, 100, 1024),
                                     (2, 5, 33, 1030)], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_matches_reference(fused, B, M, P, D, dtype, tol, masked):
    g = torch.Generator().manual_seed(B * 1000 + M + P + D)
    q = (torch.randn(B, M, D, generator=g) / D**0.5).to(dtype).cuda()
    x = torch.randn(B, P, D, generator=g).to(dtype).cuda()
    mask = (torch.rand(B, P, generator=g) > 0.3).cuda() if masked else None
    if mask is not None:
        mask[:, 0] = True  # every row has a token to attend to
    out, lse = shared_kv_attention(q, x, mask)
    ref, ref_lse = _ref(q.cpu(), x.cpu(), mask.cpu() if mask is not None else None)
    assert out.dtype == dtype and lse.dtype == torch.float32
    scale = float(ref.abs().max()) + 1e-30
    assert float((out.cpu().double() - ref).abs().max()) < tol * scale
    assert float((lse.cpu().double() - ref_lse).abs().max()) < 1e-4 * (1 + float(ref_lse.abs().max()))


@pytest.mark.cuda
def test_fused_equals_composite_and_gradients(fused):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 96, generator=g, dtype=torch.float32).cuda().requires_grad_()
    x = torch.randn(2, 300, 96, generator=g, dtype=torch.float32).cuda().requires_grad_()
    mask = (torch.rand(2, 300, generator=g) > 0.2).cuda()
    out, lse = shared_kv_attention(q, x, mask)
    (out.square().sum() + lse.sum()).backward()
    gq, gx = q.grad.clone(), x.grad.clone()
    q.grad = x.grad = None
    distkern._C.set_fused_attention(False)
    out2, lse2 = shared_kv_attention(q, x, mask)
    (out2.square().sum() + lse2.sum()).backward()
    assert torch.allclose(out, out2, atol=1e-5) and torch.allclose(lse, lse2, atol=1e-5)
    assert torch.allclose(gq, q.grad, atol=1e-4) and torch.allclose(gx, x.grad, atol=1e-4)


@pytest.mark.cuda
def test_fused_fully_masked_row_and_fallbacks(fused):
    q = torch.randn(2, 3, 16, device="cuda")
    x = torch.randn(2, 20, 16, device="cuda")
    mask = torch.ones(2, 20, dtype=torch.bool, device="cuda")
    mask[1] = False
    out, lse = shared_kv_attention(q, x, mask)
    assert torch.isnan(out[1]).all() and torch.isinf(lse[1]).all() and torch.isfinite(out[0]).all()
    # float64 and D > 1024 take the composite path: still correct
    for qq, xx in ((q.double(), x.double()), (torch.randn(1, 2, 1100, device="cuda"), torch.randn(1, 7, 1100, device="cuda"))):
        o, _ = shared_kv_attention(qq, xx)
        r, _ = _ref(qq.cpu(), xx.cpu(), None)
        assert float((o.cpu().double() - r).abs().max()) < 1e-4


@pytest.mark.cuda
def test_fused_prompt_align_bayes_pfl_shape(fused):
    g = torch.Generator().manual_seed(5)
    B, T, P, D, H = 2, 60, 1369, 768, 4
    text = torch.randn(T, D, generator=g).cuda()
    patches = torch.nn.functional.normalize(torch.randn(B, P, D, generator=g), dim=-1).cuda()
    w = [torch.randn(D, D, generator=g).cuda() / D**0.5 for _ in range(3)]
    fused_out = prompt_align(text, patches, *w, H, scale=D**-0.5)
    distkern._C.set_fused_attention(False)
    composite = prompt_align(text, patches, *w, H, scale=D**-0.5)
    assert torch.allclose(fused_out, composite, atol=2e-5)


@pytest.mark.cuda
def test_cuda_sanitizer_case_fused_attention(fused):
    g = torch.Generator().manual_seed(7)
    for B, M, P, D in [(1, 1, 1, 1), (2, 9, 33, 65), (1, 17, 64, 1024)]:
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(B, M, D, generator=g).to(dt).cuda()
            x = torch.randn(B, P, D, generator=g).to(dt).cuda()
            mask = (torch.rand(B, P, generator=g) > 0.5).cuda()
            out, lse = shared_kv_attention(q, x, mask)
            torch.cuda.synchronize()
            assert out.shape == q.shape
