"""The mmd-ddm loss plugin (plugins/mmd_ddm): MMD fine-tuning of a few-step DDIM sampler through distkern's
fused DDIM step. The chain's gradient is checked against an independent float64 DDIM written with plain torch."""
import importlib
import math
import sys
import time
from pathlib import Path

import pytest
import torch

import distkern

SRC = Path(__file__).resolve().parents[1] / "plugins" / "mmd_ddm" / "src"


def _plugin():
    """The plugin module: the installed one, else the source tree's."""
    try:
        return importlib.import_module("distkern_mmd_ddm")
    except ImportError:
        sys.path.insert(0, str(SRC))
        return importlib.import_module("distkern_mmd_ddm")


mmd_ddm = _plugin()
MMDDDMLoss = mmd_ddm.MMDDDMLoss


class TinyDenoiser(torch.nn.Module):
    """ε(x, t) for (B, D) inputs: x plus a small 2-layer tanh MLP on [x, t/1000, sin/cos features of t] (so the
    chain's samples stay O(1), as with a trained ε-model at high noise)."""

    def __init__(self, dim: int, hidden: int = 16, dtype=torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim + 3, hidden, dtype=dtype)
        self.l2 = torch.nn.Linear(hidden, dim, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)

    def forward(self, x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        tf = t.to(x.dtype)[:, None] / 1000
        h = torch.tanh(self.l1(torch.cat([x, tf, torch.sin(3 * tf), torch.cos(3 * tf)], 1)))
        return x + 0.1 * self.l2(h)


# ---- an independent float64 reference: DDPM schedule, DDIM chain and the unbiased polynomial MMD² ----

def _ref_alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _ref_chain(net, x, timesteps, eta=0.0, generator=None):
    ac = _ref_alphas_cumprod()
    for i, t in enumerate(timesteps):
        a = ac[t]
        ap = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        eps = net(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
        x = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def _ref_poly_mmd2(x, y, degree=3, coef0=1.0):
    gamma = 1.0 / x.shape[1]
    k = lambda a, b: (gamma * a @ b.T + coef0) ** degree  # noqa: E731
    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * k(x, y).mean())


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


# ---------------------------------------------------------------------------------------------------------------

def test_found_through_the_registry():
    try:
        cls = distkern.methods.get("mmd-ddm")
    except Exception as e:  # pragma: no cover - the plugin is installed by `make install`
        pytest.skip(f"mmd-ddm not installed: {e}")
    assert cls.kind == "loss" and cls.name == "mmd-ddm"
    assert cls.distkern_api == distkern.methods.API_VERSION
    assert issubclass(cls, torch.nn.Module)
    info = {m.name: m for m in distkern.methods.available()}["mmd-ddm"]
    assert info.status == "ok" and info.kind == "loss" and info.source == "entry-point"
    assert info.package == "distkern-mmd-ddm"


def test_loss_contract():
    from distkern.testing import check_method

    passed = check_method(MMDDDMLoss)  # through example_instance(): a tiny ε-model, 2 steps
    assert {"is-module", "scalar", "differentiable", "reproducible", "clear-input-errors"} <= set(passed)


def test_schedule_matches_the_paper():
    ac = mmd_ddm.ddpm_alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    torch.testing.assert_close(ac, _ref_alphas_cumprod(), rtol=1e-14, atol=0)
    assert mmd_ddm.ddim_timesteps(5) == [800, 600, 400, 200, 0]  # DDIM "uniform" skip, as MMD-DDM trains
    assert mmd_ddm.ddim_timesteps(10) == list(range(900, -1, -100))
    assert mmd_ddm.ddim_timesteps(3) == [666, 333, 0]  # exactly S steps even when S does not divide T
    assert mmd_ddm.ddim_timesteps(5, spacing="trailing") == [999, 799, 599, 399, 199]
    pairs = mmd_ddm.ddim_alpha_pairs(ac, [800, 0])
    assert pairs == [(800, float(ac[800]), float(ac[0])), (0, float(ac[0]), 1.0)]


@pytest.mark.parametrize("num_steps", [1, 4])
def test_loss_and_gradient_match_a_float64_reference(num_steps):
    D = 3
    net = TinyDenoiser(D)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(16, D, generator=g, dtype=torch.float64)
    real = torch.randn(12, D, generator=g, dtype=torch.float64) * 0.7 + 0.3  # B' ≠ B
    params = list(net.parameters())

    loss_fn = MMDDDMLoss(net, num_steps=num_steps)
    value = loss_fn(noise, real)
    assert value.dim() == 0 and value.dtype == torch.float64 and value.requires_grad
    grads = _grads(value, params)

    ts = [1000 // num_steps * i for i in range(num_steps)][::-1]
    assert loss_fn.timesteps() == ts
    ref = _ref_poly_mmd2(_ref_chain(net, noise, ts), real)
    ref_grads = _grads(ref, params)
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)

    # the generated batch itself, and its gradient w.r.t. the noise
    x = noise.clone().requires_grad_()
    gen = loss_fn.generate(x)
    xr = noise.clone().requires_grad_()
    gen_ref = _ref_chain(net, xr, ts)
    torch.testing.assert_close(gen, gen_ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(gen.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((gen * w).sum(), x)[0],
                               torch.autograd.grad((gen_ref * w).sum(), xr)[0], rtol=1e-8, atol=1e-10)


def test_checkpointing_features_and_gaussian_kernel_give_the_reference_gradient():
    D = 4
    net = TinyDenoiser(D, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(10, D, generator=g, dtype=torch.float64)
    real = torch.randn(10, D, generator=g, dtype=torch.float64)
    proj = torch.randn(D, 6, generator=g, dtype=torch.float64)
    feature_fn = lambda z: torch.tanh(z @ proj)  # noqa: E731  (a frozen "feature extractor")
    bws = [0.5, 1.0, 2.0]
    params = list(net.parameters())
    plain = MMDDDMLoss(net, num_steps=5, kernel="gaussian", bandwidth=bws, feature_fn=feature_fn)
    ckpt = MMDDDMLoss(net, num_steps=5, kernel="gaussian", bandwidth=bws, feature_fn=feature_fn, checkpoint=True)
    g_plain, g_ckpt = _grads(plain(noise, real), params), _grads(ckpt(noise, real), params)

    fx, fy = feature_fn(_ref_chain(net, noise, [800, 600, 400, 200, 0])), feature_fn(real)
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * s * s)) for s in bws)  # noqa: E731
    n = fx.shape[0]
    ref = ((k(fx, fx).sum() - n * len(bws)) / (n * (n - 1)) + (k(fy, fy).sum() - n * len(bws)) / (n * (n - 1))
           - 2 * k(fx, fy).mean())
    g_ref = _grads(ref, params)
    for a, b, c in zip(g_plain, g_ckpt, g_ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_eta_noise_follows_the_generator():
    D = 2
    net = TinyDenoiser(D, seed=4)
    noise = torch.randn(8, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss_fn = MMDDDMLoss(net, num_steps=3, eta=1.0)
    out = loss_fn.generate(noise, generator=torch.Generator().manual_seed(7))
    ref = _ref_chain(net, noise, loss_fn.timesteps(), eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out, MMDDDMLoss(net, num_steps=3).generate(noise))


def test_float32_training_step_and_sample():
    D = 2
    net = TinyDenoiser(D, dtype=torch.float32, seed=6)
    loss_fn = MMDDDMLoss(net, num_steps=5)
    g = torch.Generator().manual_seed(8)
    noise, real = torch.randn(32, D, generator=g), torch.randn(32, D, generator=g) + 1
    value = loss_fn(noise, real)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    s = loss_fn.sample(noise)
    assert s.shape == noise.shape and s.dtype == torch.float32 and not s.requires_grad
    assert torch.allclose(s, loss_fn.generate(noise).detach())
    assert loss_fn.sample(noise, 2).shape == noise.shape
    # image-shaped batches go through too (features flattened)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    img_loss = MMDDDMLoss(lambda x, t: conv(x), num_steps=2)
    v = img_loss(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5))
    v.backward()
    assert conv.weight.grad is not None


def test_bad_inputs_raise_clear_errors():
    net = TinyDenoiser(3)
    loss_fn = MMDDDMLoss(net, num_steps=2)
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same per-sample shape"):
        loss_fn(x, torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss_fn(x[:1], x)
    with pytest.raises(TypeError, match="must be a tensor"):
        loss_fn(x.numpy(), x)
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(x.long(), x)
    for bad in (0, -1, 2.5, 1001, True):
        with pytest.raises(ValueError, match="num_steps"):
            MMDDDMLoss(net, num_steps=bad)
    with pytest.raises(ValueError, match="num_steps"):
        loss_fn.sample(x, 0)
    with pytest.raises(ValueError, match="output shape"):
        MMDDDMLoss(lambda z, t: z[:, :2], num_steps=1)(x, x)
    with pytest.raises(ValueError, match="feature_fn must return"):
        MMDDDMLoss(net, num_steps=1, feature_fn=lambda z: z[:1])(x, x)
    with pytest.raises(TypeError, match="callable"):
        MMDDDMLoss("not a model")
    with pytest.raises(ValueError, match="kernel must be one of"):
        MMDDDMLoss(net, kernel="cosine")
    with pytest.raises(ValueError, match="bandwidth"):
        MMDDDMLoss(net, kernel="gaussian", bandwidth=[1.0, -2.0])
    with pytest.raises(ValueError, match="eta"):
        MMDDDMLoss(net, eta=-0.5)
    with pytest.raises(ValueError, match="spacing"):
        MMDDDMLoss(net, spacing="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        MMDDDMLoss(net, prediction_type="score")


def test_quick_recipe_improves_the_five_step_mmd():
    from distkern_mmd_ddm.recipe import run

    threads = torch.get_num_threads()
    t0, c0 = time.perf_counter(), time.process_time()
    res = run(quick=True, verbose=False, eval_steps=(5, 10))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU time (one torch thread): not inflated when other jobs share the cores, unlike the wall time
    assert cpu < 60, f"quick recipe took {cpu:.0f} s of CPU ({wall:.0f} s wall)"
    b, a = res.before[5]["gaussian"], res.after[5]["gaussian"]
    assert math.isfinite(a) and a < 0.3 * b, res.table()
    assert res.after[5]["polynomial"] < res.before[5]["polynomial"], res.table()
    assert set(res.after) == {5, 10} and "data/data" in res.table()
    assert torch.get_num_threads() == threads  # the recipe runs on 1 thread and restores the setting


def test_distance_kernel_and_zero_iterations_are_refused():
    recipe = importlib.import_module(f"{mmd_ddm.__name__}.recipe").main

    with pytest.raises(ValueError, match="energy distance"):
        MMDDDMLoss(lambda x, t: x, kernel="distance")
    for flag in ("--pretrain-iters", "--finetune-iters"):
        with pytest.raises(SystemExit) as e:
            recipe([flag, "0"])
        assert e.value.code == 2
