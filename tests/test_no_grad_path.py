"""The no-gradient call path: ops whose autograd is registered in Python (distkern.ops._call.call) and the sampler
step, whose autograd is registered in C++, skip their autograd layer when no gradient can flow. These tests check
that the shortcut gives the same numbers as the registered path, that it is taken only when it should be (an input
that requires grad under grad mode still gets a graph and the right gradient), and that it stays out of the way of
torch.no_grad, inference_mode, torch.compile and functorch transforms."""
from __future__ import annotations

import pytest
import torch

from distkern.ops import _call
from distkern.ops.align import anomaly_map, shared_kv_attention
from distkern.ops.diffusion import ddim_step
from distkern.ops.kernel_sum import kernel_matmul
from distkern.ops.mahalanobis import mahalanobis, mahalanobis_k, mahalanobis_pos, nearest_reference


def _factor(D: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(D, 2 * D, generator=g, dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(a @ a.T / (2 * D) + 0.1 * torch.eye(D, dtype=torch.float64))).float()


def _cases():
    g = torch.Generator().manual_seed(7)
    N, D, K = 37, 11, 3
    x = torch.randn(N, D, generator=g)
    mu = torch.randn(D, generator=g)
    L = _factor(D, g)
    means = torch.randn(K, D, generator=g)
    Ls = torch.stack([_factor(D, g) for _ in range(K)])
    bias = torch.randn(K, generator=g, dtype=torch.float32)
    xp = torch.randn(2, 5, D, generator=g)
    mp = torch.randn(5, D, generator=g)
    Lp = torch.stack([_factor(D, g) for _ in range(5)])
    y = torch.randn(23, D, generator=g)
    text = torch.randn(2, 2, D, generator=g)
    patches = torch.randn(2, 9, D, generator=g)
    q = torch.randn(2, 4, D, generator=g)
    def c(t, x):  # the constants in x's dtype (float64 for gradcheck)
        return t.to(x.dtype)

    return {
        "mahalanobis": (lambda x: mahalanobis(x, c(mu, x), c(L, x)), x),
        "mahalanobis_k": (lambda x: mahalanobis_k(x, c(means, x), c(Ls, x)), x),
        "mahalanobis_k_min": (lambda x: mahalanobis_k(x, c(means, x), c(L, x), reduce="min").values, x),
        "mahalanobis_k_lse": (lambda x: mahalanobis_k(x, c(means, x), c(Ls, x), reduce="logsumexp", bias=c(bias, x)), x),
        "mahalanobis_pos": (lambda x: mahalanobis_pos(x, c(mp, x), c(Lp, x)), xp),
        "nearest_reference": (lambda x: nearest_reference(x, c(y, x)).similarity, x),
        "kernel_matmul": (lambda x: kernel_matmul(x, c(y, x), kernel="gaussian", bandwidth=2.0), x),
        "anomaly_map": (lambda x: anomaly_map(x, c(text, x)), patches),
        "shared_kv_attention": (lambda x: shared_kv_attention(c(q, x), x)[0], patches),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_numbers_and_graph_only_when_needed(name):
    fn, x = CASES[name]
    plain = fn(x)
    assert plain.grad_fn is None and not plain.requires_grad
    with torch.no_grad():
        assert torch.equal(fn(x.clone().requires_grad_()), plain)
    with torch.inference_mode():
        assert torch.equal(fn(x), plain)
    # an input that requires grad: the registered autograd path, the same numbers, the right gradient
    xr = x.clone().double().requires_grad_()
    out = fn(xr)
    assert out.grad_fn is not None
    assert torch.allclose(out.float(), plain, rtol=1e-4, atol=1e-5)
    assert torch.autograd.gradcheck(fn, (xr,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_shortcut_not_taken_when_it_must_not_be(monkeypatch):
    """call() must go through the op's registered path under grad with an input that requires grad, while
    compiling and under functorch transforms; below autograd otherwise."""
    seen = []
    real = _call._below_autograd

    def spy():
        seen.append("below")
        return real()

    monkeypatch.setattr(_call, "_below_autograd", spy)
    fn, x = CASES["mahalanobis"]
    fn(x)
    assert seen == ["below"]
    seen.clear()
    fn(x.clone().requires_grad_())
    assert seen == []
    with torch.no_grad():
        fn(x.clone().requires_grad_())
    assert seen == ["below"]
    seen.clear()
    monkeypatch.setattr(_call, "_compiling", lambda: True)
    fn(x)
    assert seen == []
    monkeypatch.setattr(_call, "_compiling", lambda: False)
    monkeypatch.setattr(_call, "_transforms_active", lambda: True)
    fn(x)
    assert seen == []


def test_sampler_step_no_grad_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    m = torch.randn(2, 3, 4, 4, generator=g)
    prev, x0 = ddim_step(m, x, 0.3, 0.5)
    assert prev.grad_fn is None and x0.grad_fn is None
    with torch.no_grad():
        p2, _ = ddim_step(m.clone().requires_grad_(), x.clone().requires_grad_(), 0.3, 0.5)
    assert p2.grad_fn is None and torch.equal(p2, prev)
    xr, mr = x.clone().requires_grad_(), m.clone().requires_grad_()
    p3, x03 = ddim_step(mr, xr, 0.3, 0.5)
    assert p3.grad_fn is not None and torch.equal(p3.detach(), prev) and torch.equal(x03.detach(), x0)
    p3.sum().backward()
    # prev = √ā′·(x − √(1−ā)·m)/√ā + √(1−ā′)·m
    at, ap = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert torch.allclose(xr.grad, torch.full_like(x, float(ap.sqrt() / at.sqrt())))
    assert torch.allclose(mr.grad, torch.full_like(m, float((1 - ap).sqrt() - ap.sqrt() * (1 - at).sqrt() / at.sqrt())))
    # only the model output requires grad: still a graph
    p4, _ = ddim_step(m.clone().requires_grad_(), x, 0.3, 0.5)
    assert p4.grad_fn is not None


def test_call_op_is_public_for_plugins():
    import distkern.ops

    assert distkern.ops.call_op is _call.call
    x = torch.randn(5, 3)
    mu, L = torch.zeros(3), torch.eye(3)
    assert torch.allclose(distkern.ops.call_op(torch.ops.distkern.mahalanobis, x, mu, L, True), x.square().sum(1))
