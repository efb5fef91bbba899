"""The w2sd sampler (plugins/w2sd): registry, sampler contract, the official reflection indexing reproduced by an
independent float64 implementation (and by diffusers' schedulers called as the official code calls them)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distkern
from distkern.diffusion import DDIMInverseScheduler, DDIMScheduler, EulerDiscreteScheduler

# Stable Diffusion XL's scheduler config, as the official script loads it (DDIMScheduler.from_config of it)
SDXL = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
            num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
            steps_offset=1, timestep_spacing="leading")


def _get():
    try:
        return distkern.methods.get("w2sd")
    except distkern.methods.UnknownMethodError:  # not installed: register the source tree in-process
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "w2sd" / "src"))
        from distkern_w2sd import W2SD

        distkern.methods.register(W2SD)
        return distkern.methods.get("w2sd")


W2SD = _get()


class Recorder:
    """A deterministic toy ε-model that records the timesteps it is called at."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append(int(t))
        return self.fn(x, float(t))


def strong_fn(x, t):
    return 0.5 * torch.tanh(x) + 1e-4 * t * x


def weak_fn(x, t):
    return 0.3 * torch.sin(x) - 1e-4 * t


def model_fn(x, t):
    return 0.4 * torch.tanh(1.5 * x) + 2e-5 * t


# ------------------------------------------------------------------------------------------------ reference
def _alphas_cumprod(cfg):
    n = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(math.sqrt(cfg["beta_start"]), math.sqrt(cfg["beta_end"]), n) ** 2
    else:
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n)
    return np.cumprod(1.0 - betas)


def _ddim(x, eps, a_from, a_to):
    """One deterministic DDIM move (also the inversion when a_to < a_from): x0 = (x − √(1−a)ε)/√a,
    x' = √a'·x0 + √(1−a')·ε."""
    x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def reference_w2sd(x, cfg, n, strong, weak, model, indexing="official"):
    """The official W2SD loop written with the three DDIM formulas on plain float64 numbers (no scheduler)."""
    ac = _alphas_cumprod(cfg)
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    ratio = cfg["num_train_timesteps"] // n
    ts = [int(k * ratio + cfg["steps_offset"]) for k in range(n)][::-1]  # "leading" spacing

    def abar(s):
        return ac[s] if s >= 0 else final

    for i, t in enumerate(ts):
        if i < n - 1:
            x1 = _ddim(x, strong(x, t), abar(t), abar(t - ratio))  # DDIMScheduler.step(ε_strong, t, x)
            if indexing == "official":  # DDIMInverseScheduler.step(ε_weak(x1, t), ts[i+1], x1)
                x = _ddim(x1, weak(x1, t), abar(ts[i + 1] - ratio), abar(ts[i + 1]))
            else:
                x = _ddim(x1, weak(x1, max(t - ratio, 0)), abar(t - ratio), abar(t))
        x = _ddim(x, model(x, t), abar(t), abar(t - ratio))
    return x, ts


# ------------------------------------------------------------------------------------------------ tests
def test_registry_and_contract(rng):
    assert W2SD.kind == "sampler" and W2SD.distkern_api == distkern.methods.API_VERSION
    rows = [m for m in distkern.methods.available() if m.name == "w2sd"]
    assert rows and rows[0].status == "ok" and rows[0].kind == "sampler"
    w = W2SD()  # default: diffusers' default DDIM config, denoisers given later
    w.set_timesteps(10)
    ts = w.timesteps
    assert ts.shape == (10,) and ts.dtype == torch.int64 and bool((ts[1:] < ts[:-1]).all())
    x = torch.randn(3, 2, 4, 4, generator=rng)
    eps = torch.randn(3, 2, 4, 4, generator=rng)
    out = w.step(eps, ts[0], x)
    assert out.prev_sample.shape == x.shape
    plain = DDIMScheduler()
    plain.set_timesteps(10)
    assert torch.equal(out.prev_sample, plain.step(eps, ts[0], x).prev_sample)
    assert torch.equal(w.step(eps, ts[0], x, return_dict=False)[0], out.prev_sample)
    assert w.scale_model_input(x, ts[0]) is x and w.init_noise_sigma == 1.0
    twin = W2SD.from_config(SDXL, strength=0.5, steps_offset=0)
    assert twin.strength == 0.5 and twin.config.steps_offset == 0 and twin.config.beta_schedule == "scaled_linear"
    import distkern.testing as dt
    if "sampler" in getattr(dt, "RULES", {}):  # distkern's own contract check for samplers
        assert "config-round-trip" in dt.check_method(W2SD)


@pytest.mark.parametrize("indexing", ["official", "consistent"])
def test_indexing_matches_float64_reference(indexing):
    n = 8
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    strong, weak, model = Recorder(strong_fn), Recorder(weak_fn), Recorder(model_fn)
    w = W2SD(SDXL, strong, weak, model, indexing=indexing)
    out = w(x.clone(), n)
    ref, ts = reference_w2sd(x.clone(), SDXL, n, strong_fn, weak_fn, model_fn, indexing)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()
    assert w.nfe == 3 * n - 2
    ratio = 1000 // n
    assert strong.calls == ts[:-1] and model.calls == ts
    # the weak model: at t (official, x̃ being at t − Δ) or at t − Δ (consistent)
    assert weak.calls == (ts[:-1] if indexing == "official" else [t - ratio for t in ts[:-1]])


def test_official_indexing_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    n = 10
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # the official loop (utils/pipeline_stable_diffusion_xl.py: w2sd_lora + reflection_operation), verbatim calls
    sch = diffusers.DDIMScheduler.from_config(SDXL)
    inv = diffusers.DDIMInverseScheduler.from_config(SDXL)
    sch.set_timesteps(n)
    inv.set_timesteps(n)
    timesteps = sch.timesteps
    latents = x0.clone()
    for i, t in enumerate(timesteps):
        if i < len(timesteps) - 1:
            noise_pred = strong_fn(latents, float(t))
            sch._step_index = None
            latents = sch.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
            noise_pred = weak_fn(latents, float(t))
            inv._step_index = None
            latents = inv.step(noise_pred, timesteps[i + 1], latents, return_dict=False)[0]
        noise_pred = model_fn(latents, float(t))
        latents = sch.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
    w = W2SD(diffusers.DDIMScheduler.from_config(SDXL), Recorder(strong_fn), Recorder(weak_fn), Recorder(model_fn))
    assert isinstance(w.scheduler, DDIMScheduler)  # converted to distkern's
    out = w(x0.clone(), n)
    scale = latents.abs().max()
    assert (out - latents).abs().max() <= 1e-5 * scale


def test_strength_zero_is_the_plain_sampler_and_strength_scales(rng):
    n = 6
    x = torch.randn(5, 3, generator=rng, dtype=torch.float64)
    w0 = W2SD(SDXL, strong_fn_t, weak_fn_t, model_fn_t, strength=0.0)
    out0 = w0(x.clone(), n)
    assert w0.nfe == n  # no reflection calls at all
    plain = DDIMScheduler.from_config(SDXL)
    plain.set_timesteps(n)
    y = x.clone()
    for t in plain.timesteps:
        y = plain.step(model_fn_t(y, t), t, y).prev_sample
    assert torch.equal(out0, y)
    # strength multiplies the reflection's displacement
    w1 = W2SD(SDXL, strong_fn_t, weak_fn_t, strength=1.0)
    wh = W2SD(SDXL, strong_fn_t, weak_fn_t, strength=0.5)
    w1.set_timesteps(n)
    wh.set_timesteps(n)
    r1, rh = w1.reflect(x, 2), wh.reflect(x, 2)
    assert torch.allclose(rh, x + 0.5 * (r1 - x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(r1, x)


def strong_fn_t(x, t):
    return strong_fn(x, float(t))


def weak_fn_t(x, t):
    return weak_fn(x, float(t))


def model_fn_t(x, t):
    return model_fn(x, float(t))


def test_consistent_reflection_is_identity_for_equal_models(rng):
    """With weak == strong and an x-independent ε, the consistent reflection undoes its DDIM step exactly; the
    official one (inversion over another interval, weak model at another timestep) moves the latent."""
    n = 10
    eps = torch.randn(4, 5, generator=rng, dtype=torch.float64)

    def const(x, t):
        return eps

    x = torch.randn(4, 5, generator=rng, dtype=torch.float64)
    cons = W2SD(SDXL, const, const, indexing="consistent")
    off = W2SD(SDXL, const, const, indexing="official")
    cons.set_timesteps(n)
    off.set_timesteps(n)
    for i in (0, 4, 8):
        assert torch.allclose(cons.reflect(x, i), x, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(off.reflect(x, i), x, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(cons.reflect(x, n - 1)).all()  # consistent may reflect the last step


def test_reflection_steps_and_progress(rng):
    n = 7
    x = torch.randn(2, 3, generator=rng)
    w = W2SD(None, strong_fn_t, weak_fn_t, reflection_steps={0, 2, 5})
    w(x, n, progress=True)
    assert w.nfe == n + 2 * 3
    assert W2SD(None, strong_fn_t, weak_fn_t, reflection_steps=range(3)).reflection_indices(n) == [0, 1, 2]
    odd = W2SD(None, strong_fn_t, weak_fn_t, reflection_steps=lambda i: i % 2 == 1)
    assert odd.reflection_indices(n) == [1, 3, 5]  # index 6 (the last) is never asked under "official"
    with pytest.raises(ValueError, match="official indexing needs"):
        W2SD(None, strong_fn_t, weak_fn_t, reflection_steps={n - 1})(x, n)
    with pytest.raises(ValueError, match="integer step indices"):  # 1.5 used to become step 1
        W2SD(None, strong_fn_t, weak_fn_t, reflection_steps=[1.5])
    with pytest.raises(TypeError, match="not a string"):  # "01" used to mean {0, 1}
        W2SD(None, strong_fn_t, weak_fn_t, reflection_steps="01")
    last = W2SD(None, strong_fn_t, weak_fn_t, reflection_steps={n - 1}, indexing="consistent")
    last(x, n)
    assert last.nfe == n + 2
    seen = []
    W2SD(None, strong_fn_t, weak_fn_t)(x, n, callback=lambda i, t, lat: seen.append(i))
    assert seen == list(range(n))


def test_schedulers_configs_and_eta(rng):
    w = W2SD(EulerDiscreteScheduler(beta_schedule="scaled_linear"))  # converted, as the official code does
    assert isinstance(w.scheduler, DDIMScheduler) and isinstance(w.inverse_scheduler, DDIMInverseScheduler)
    assert w.scheduler.config.beta_schedule == "scaled_linear"
    assert W2SD({"timestep_spacing": "linspace"}).inverse_scheduler.config.timestep_spacing == "leading"
    x = torch.randn(3, 4, generator=rng)
    outs = []
    for _ in range(2):
        w = W2SD(SDXL, strong_fn_t, weak_fn_t, eta=0.5)
        outs.append(w(x, 5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outs[0], outs[1])


def test_bad_inputs(rng):
    x = torch.randn(2, 3, generator=rng)
    with pytest.raises(TypeError, match="strong must be a callable"):
        W2SD(None, strong="unet")
    with pytest.raises(TypeError, match="weak must be a callable"):
        W2SD(None, strong_fn_t, 3)
    with pytest.raises(TypeError, match="model must be a callable"):
        W2SD(None, strong_fn_t, weak_fn_t, model=object())
    with pytest.raises(ValueError, match="indexing must be one of"):
        W2SD(indexing="shifted")
    with pytest.raises(ValueError, match="strength must be a finite"):
        W2SD(strength=float("nan"))
    with pytest.raises(ValueError, match="eta must be"):
        W2SD(eta=-1)
    with pytest.raises(TypeError, match="scheduler must be"):
        W2SD(scheduler=42)
    w = W2SD(None, strong_fn_t, weak_fn_t)
    with pytest.raises(ValueError, match="call set_timesteps"):
        w.reflect(x, 0)
    w.set_timesteps(5)
    with pytest.raises(ValueError, match="out of range"):
        w.reflect(x, 7)
    with pytest.raises(ValueError, match="last step has no reflection"):
        w.reflect(x, 4)
    with pytest.raises(ValueError, match="needs both strong= and weak="):
        W2SD(None, strong_fn_t)(x, 5)
    with pytest.raises(ValueError, match="no denoiser"):
        W2SD()(x, 5)
    with pytest.raises(ValueError, match="returned shape"):
        W2SD(None, strong_fn_t, lambda x, t: x[:1])(x, 5)
