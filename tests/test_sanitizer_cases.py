"""Small CUDA cases of the diffusion-step and prompt-alignment kernels for compute-sanitizer
(benchmarks/gpu_check.sh runs every ``test_cuda_sanitizer*`` test under memcheck): odd sizes that
exercise the tails, vector/scalar paths and the thresholding select. The tensor-core tile kernels
have theirs in test_cuda_matmul.py."""
import pytest
import torch

import distkern  # noqa: F401
from distkern.ops import align, diffusion


@pytest.mark.cuda
def test_cuda_sanitizer_case_sampler_step():
    g = torch.Generator().manual_seed(5)
    op = torch.ops.distkern.sampler_step
    coefs = [0.9, -0.3, 0.1, 0.8, 0.5, 0.05, 0.2, 0.3]
    for shape in [(1,), (3, 5), (2, 3, 7, 9), (4, 1031)]:
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            x, m, p = (torch.randn(shape, generator=g).to(dt).cuda() for _ in range(3))
            table = torch.randn(shape[0], 8, generator=g, dtype=torch.float64).cuda()
            for mode in (0, 1, 2):
                # (None, -1): no noise — with mode 0 and batch-wide coefficients, the lean deterministic kernel
                for noise, seed in ((None, 3), (torch.randn(shape, generator=g).to(dt).cuda(), -1), (None, -1)):
                    out, x0 = op(x, m, p, noise, coefs, None, mode, 0.7, 0.9, 1.5, seed, 2)
                    out2, _ = op(x, m, None, noise, [], table, mode, 0.7, 0.5, 1.0, seed, 0)
                    torch.cuda.synchronize()
                    assert torch.isfinite(out).all() and torch.isfinite(x0).all() and torch.isfinite(out2).all()
            xm = torch.cat([torch.zeros(1, dtype=dt, device="cuda"), x.reshape(-1)])[1:].view(shape)  # misaligned
            out, x0 = op(xm, m, p, None, coefs, None, 0, 1.0, 0.995, 1.0, -1, 0)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(x0).all()
            gx, gm, gp = torch.ops.distkern.sampler_step_backward(x, m, x, m, None, coefs, None, 1, 0.7, 3, 0)
            torch.cuda.synchronize()
            assert torch.isfinite(gx).all()


@pytest.mark.cuda
def test_cuda_sanitizer_case_align():
    g = torch.Generator().manual_seed(6)
    for L, B, P, D, K in [(1, 1, 1, 1, 1), (2, 3, 37, 70, 5), (4, 2, 33, 65, 67)]:
        patches = torch.randn(L, B, P, D, generator=g).cuda()
        text = torch.randn(L, B, K, 2, D, generator=g).cuda()
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            out = align.anomaly_map(patches.to(dt), text, 14.3)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()
        q = torch.randn(B, 7, D, generator=g).cuda()
        out, lse = align.shared_kv_attention(q, patches[0], tile=16)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_sanitizer_case_ddim_step():
    x = torch.randn(2, 4, 9, 9, device="cuda")
    prev, x0 = diffusion.ddim_step(x, x, 0.5, 0.7, eta=0.5, seed=1)
    torch.cuda.synchronize()
    assert torch.isfinite(prev).all()
