"""The gaussian-teleport sampler (plugins/gaussian_teleport): registry, sampler contract, the closed-form teleport
against the probability-flow ODE integrated numerically, VE / VP latents, the demo, bad inputs."""
import math
import sys
from pathlib import Path

import pytest
import torch

import distkern
from distkern.diffusion import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)
from distkern.ops.diffusion import LowRankGaussian


def _get():
    try:
        return distkern.methods.get("gaussian-teleport")
    except distkern.methods.UnknownMethodError:  # not installed: register the source tree in-process
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "gaussian_teleport" / "src"))
        from distkern_gaussian_teleport import GaussianTeleport

        distkern.methods.register(GaussianTeleport)
        return distkern.methods.get("gaussian-teleport")


GaussianTeleport = _get()
gt = sys.modules[GaussianTeleport.__module__.rsplit(".", 1)[0]]  # the plugin package


def _gaussian(g, D=4, r=3):
    mu = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 0.05, r, dtype=torch.float64)
    return LowRankGaussian(mu, U, lam)


def _dense_denoiser(G):
    """Independent optimal denoiser of N(μ, Σ), Σ = U diag(λ) Uᵀ: μ + Σ(Σ + σ²I)⁻¹(x − μ)."""
    mu, U, lam = G
    S = U @ torch.diag(lam) @ U.T
    eye = torch.eye(mu.numel(), dtype=torch.float64)
    return lambda x, s: mu + (x - mu) @ torch.linalg.solve(S + s * s * eye, S).T


def test_registry_and_contract(rng):
    assert GaussianTeleport.kind == "sampler" and GaussianTeleport.distkern_api == distkern.methods.API_VERSION
    rows = [m for m in distkern.methods.available() if m.name == "gaussian-teleport"]
    assert rows and rows[0].status == "ok" and rows[0].kind == "sampler"
    sched = EulerDiscreteScheduler()
    tp = GaussianTeleport(sched, skip_fraction=0.3)
    tp.set_timesteps(7)  # the remaining schedule: the last 7 of a 10-step one
    assert tp.full_num_inference_steps == 10 and tp.begin_index == 3
    full = EulerDiscreteScheduler()
    full.set_timesteps(10)
    assert torch.equal(tp.timesteps, full.timesteps[3:]) and len(tp.timesteps) == 7
    assert tp.sigma_from == pytest.approx(float(full.sigmas[0])) and tp.sigma_to == pytest.approx(float(full.sigmas[3]))
    x = torch.randn(3, 4, generator=rng) * float(full.sigmas[3])
    t = tp.timesteps[0]
    eps = torch.randn(3, 4, generator=rng)
    out = tp.step(eps, t, tp.scale_model_input(x, t))
    assert out.prev_sample.shape == x.shape
    full.set_begin_index(3)
    assert torch.equal(out.prev_sample, full.step(eps, t, full.scale_model_input(x, t)).prev_sample)
    import distkern.testing as dt
    if "sampler" in getattr(dt, "RULES", {}):  # distkern's own contract check for samplers
        assert "reproducible" in dt.check_method(GaussianTeleport)


def test_teleport_is_the_probability_flow_solution():
    """Closed form vs Euler integration of dx/dσ = (x − D(x, σ))/σ with the exact denoiser (float64, D = 4,
    rank 3 so the off-support part is exercised): first-order convergence to the closed form."""
    g = torch.Generator().manual_seed(0)
    G = _gaussian(g)
    den = _dense_denoiser(G)
    x_T = 80.0 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    tp = GaussianTeleport(EulerDiscreteScheduler(), G)
    closed = tp.teleport(x_T, 80.0, 0.3)

    def euler(steps):
        sig = torch.exp(torch.linspace(math.log(80.0), math.log(0.3), steps + 1, dtype=torch.float64))
        y = x_T.clone()
        for a, b in zip(sig[:-1], sig[1:]):
            y = y + (y - den(y, a)) / a * (b - a)
        return y

    y1, y2 = euler(1500), euler(3000)
    e1, e2 = (y1 - closed).abs().max(), (y2 - closed).abs().max()
    assert e2 < 2e-3 * closed.abs().max()
    assert 1.8 < float(e1 / e2) < 2.2  # first order: halving the step halves the error
    assert (2 * y2 - y1 - closed).abs().max() < 1e-5  # Richardson extrapolation lands on the closed form
    assert torch.allclose(tp.teleport(x_T, 0.3, 0.3), x_T)  # no move
    back = tp.teleport(closed, 0.3, 80.0)  # the flow is invertible along the support
    P = G.U @ G.U.T
    assert torch.allclose((back - G.mean) @ P, (x_T - G.mean) @ P, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("make,N,tol", [
    (lambda: EulerDiscreteScheduler(), 1000, 3e-4),                     # VE latents
    (lambda: DDIMScheduler(clip_sample=False), 1000, 3e-4),             # VP latents
    (lambda: DPMSolverMultistepScheduler(), 600, 1e-5),                 # VP latents, second order
    (lambda: DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear", timestep_spacing="trailing"), 500, 1e-3),
])
def test_teleport_matches_the_scheduler_in_its_latent_convention(make, N, tol):
    """For Gaussian data, the teleported latent equals the latent the scheduler itself reaches at the first kept
    step when it runs the skipped steps with the exact Gaussian model (up to its discretisation error)."""
    g = torch.Generator().manual_seed(1)
    G = _gaussian(g)
    n = int(0.4 * N)
    tp = GaussianTeleport(make(), G, skip_fraction=1 - n / N)
    tp.set_timesteps(n)
    assert tp.full_num_inference_steps == N and tp.begin_index == N - n
    x_T = torch.randn(8, 4, generator=g, dtype=torch.float64) * tp.init_noise_sigma
    x_tel = tp.teleport(x_T)
    s = make()
    s.set_timesteps(N)
    model = tp.denoiser()
    x = x_T.clone()
    for t in s.timesteps[:N - n]:
        x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    assert (x - x_tel).abs().max() <= tol * x_tel.abs().max()


def test_ve_vp_conversions(rng):
    x0 = torch.randn(5, 3, generator=rng, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=rng, dtype=torch.float64)
    ab = 0.37
    sigma = gt.sigma_from_alpha_bar(ab)
    assert sigma == pytest.approx(math.sqrt((1 - ab) / ab)) and gt.alpha_bar_from_sigma(sigma) == pytest.approx(ab)
    x_vp = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    assert torch.allclose(gt.vp_to_ve(x_vp, sigma), x0 + sigma * eps)
    assert torch.allclose(gt.ve_to_vp(x0 + sigma * eps, sigma), x_vp)
    per = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)  # per-sample σ
    assert torch.allclose(gt.ve_to_vp(gt.vp_to_ve(x_vp, per), per), x_vp)
    assert torch.allclose(gt.vp_to_ve(x_vp, per), x_vp * (per[:, None] ** 2 + 1).sqrt())
    # a VP teleport is the VE teleport between the converted latents
    G = _gaussian(torch.Generator().manual_seed(2), D=3, r=2)
    vp = GaussianTeleport(DDIMScheduler(clip_sample=False), G, skip_fraction=0.3)
    ve = GaussianTeleport(EulerDiscreteScheduler(), G, skip_fraction=0.3)
    assert vp.latent_convention == "vp" and ve.latent_convention == "ve"
    assert GaussianTeleport(DPMSolverMultistepScheduler(), G).latent_convention == "vp"
    assert GaussianTeleport(DDPMScheduler(), G).latent_convention == "vp"
    vp.set_timesteps(10)
    x_T = torch.randn(5, 3, generator=rng, dtype=torch.float64)
    want = gt.ve_to_vp(ve.teleport(gt.vp_to_ve(x_T, vp.sigma_from), vp.sigma_from, vp.sigma_to), vp.sigma_to)
    assert torch.allclose(vp.teleport(x_T), want, rtol=1e-12, atol=1e-12)
    ac = DDIMScheduler().alphas_cumprod.double()
    t0 = int(vp.scheduler.timesteps[0])
    assert vp.sigma_from == pytest.approx(math.sqrt((1 - ac[t0]) / ac[t0]))


def test_sigma_skip_schedule_and_plain_equivalence(rng):
    G = _gaussian(torch.Generator().manual_seed(3))
    tp = GaussianTeleport(EulerDiscreteScheduler(), G, sigma_skip=10.0)
    tp.set_timesteps(6)
    sig = gt.schedule_sigmas(tp.scheduler)
    assert (sig[tp.begin_index:] <= 10.0).all() and len(tp.timesteps) == 6 and tp.sigma_to <= 10.0
    shorter = EulerDiscreteScheduler()
    shorter.set_timesteps(tp.full_num_inference_steps - 1)
    assert (gt.schedule_sigmas(shorter) <= 10.0).sum() < 6  # the shortest such schedule
    # skip_fraction = 0: the plain sampler, bit for bit
    model = GaussianTeleport(EulerDiscreteScheduler(), G).denoiser()
    x_T = torch.randn(4, 4, generator=rng, dtype=torch.float64) * EulerDiscreteScheduler().init_noise_sigma
    plain_tp = GaussianTeleport(EulerDiscreteScheduler(), G, skip_fraction=0.0)
    out = plain_tp.sample(model, x_T.clone(), 8)
    s = EulerDiscreteScheduler()
    s.set_timesteps(8)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.equal(out, x) and plain_tp.nfe == 8
    # sampling from a shape, with the teleport
    y = tp.sample(model, (6, 2, 2), 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert y.shape == (6, 2, 2) and tp.nfe == 5 and torch.isfinite(y).all()


def test_fit_tensor_dataloader_and_save_load(tmp_path, rng):
    data = torch.randn(500, 2, 3, generator=rng, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.2]) + 1.0
    a = GaussianTeleport(DDIMScheduler(clip_sample=False), skip_fraction=0.25).fit(data, rank=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(500)), batch_size=64)
    b = GaussianTeleport(DDIMScheduler(clip_sample=False), skip_fraction=0.25).fit(loader, rank=4)
    assert a.dim == 6 and a.gaussian.U.shape == (6, 4)
    assert torch.allclose(a.gaussian.mean, b.gaussian.mean) and torch.allclose(a.gaussian.lam, b.gaussian.lam)
    path = tmp_path / "teleport.safetensors"
    a.save(path)
    assert distkern.io.model_method(path) == "gaussian-teleport"
    c = GaussianTeleport.load(path)
    assert isinstance(c.scheduler, DDIMScheduler) and c.scheduler.config.clip_sample is False
    assert c.skip_fraction == 0.25 and c.latent_convention == "vp"
    for u, v in zip(a.gaussian, c.gaussian):
        assert torch.equal(u, v)
    a.set_timesteps(5)
    c.set_timesteps(5)
    x = torch.randn(3, 2, 3, generator=rng)
    assert torch.equal(a.teleport(x), c.teleport(x))


def test_quick_demo_teleport_helps_at_small_nfe():
    demo = pytest.importorskip("distkern_gaussian_teleport.demo")
    res = demo.run(quick=True)
    assert res.seconds < 120
    floor = res.reference["floor"]
    for sampler in ("euler", "dpm"):
        for nfe in (3, 5):
            plain, tele = res.get(sampler, 0.0, nfe), res.get(sampler, 0.3, nfe)
            assert tele["nfe"] == plain["nfe"] == nfe
            # measured (seed 0): teleport cuts MMD² 3-8x and sliced W2 by a third or more at NFE 3 and 5
            assert tele["mmd2"] < 0.5 * plain["mmd2"] and tele["sw"] < 0.8 * plain["sw"]
        for nfe in res.settings["nfes"]:
            assert res.get(sampler, 0.3, nfe)["mmd2"] <= res.get(sampler, 0.0, nfe)["mmd2"] + 1e-3
    assert res.reference["dpm_ref"]["sw"] < 1.5 * floor["sw"]  # the exact denoiser does reproduce the data
    assert "no teleport" in res.table()


def test_bad_inputs(rng):
    G = _gaussian(torch.Generator().manual_seed(4))
    x = torch.randn(2, 4, generator=rng)
    tp = GaussianTeleport(EulerDiscreteScheduler())
    tp.set_timesteps(5)
    with pytest.raises(RuntimeError, match="call fit"):
        tp.teleport(x)
    with pytest.raises(RuntimeError, match="call fit"):
        tp.sample(lambda x, t: x, x, 5)
    with pytest.raises(ValueError, match="outside the scheduler's noise levels"):
        GaussianTeleport(EulerDiscreteScheduler(), G, sigma_skip=500.0)
    with pytest.raises(ValueError, match="outside the scheduler's noise levels"):
        GaussianTeleport(EulerDiscreteScheduler(), G, sigma_skip=1e-4)
    with pytest.raises(ValueError, match="not both"):
        GaussianTeleport(EulerDiscreteScheduler(), G, sigma_skip=5.0, skip_fraction=0.2)
    mean, U, lam = G
    with pytest.raises(ValueError, match="finite and ≥ 0"):  # NaN passed the lam < 0 check before
        GaussianTeleport(EulerDiscreteScheduler(), (mean, U, torch.full_like(lam, float("nan"))))
    with pytest.raises(ValueError, match="skip_fraction must lie"):
        GaussianTeleport(EulerDiscreteScheduler(), G, skip_fraction=1.0)
    with pytest.raises(ValueError, match="more than num_train_timesteps"):
        GaussianTeleport(EulerDiscreteScheduler(), G, skip_fraction=0.9).set_timesteps(200)
    with pytest.raises(ValueError, match="no schedule"):
        GaussianTeleport(EulerDiscreteScheduler(), G, sigma_skip=0.02).set_timesteps(500)
    with pytest.raises(TypeError, match="scheduler must be a scheduler"):
        GaussianTeleport("euler", G)
    with pytest.raises(ValueError, match="latent_convention"):
        GaussianTeleport(EulerDiscreteScheduler(), G, latent_convention="edm")
    ok = GaussianTeleport(EulerDiscreteScheduler(), G)
    with pytest.raises(ValueError, match="call set_timesteps"):
        ok.teleport(x)
    ok.set_timesteps(4)
    with pytest.raises(ValueError, match="D = 4 features"):
        ok.teleport(torch.randn(2, 5))
    with pytest.raises(TypeError, match="denoiser must be a callable"):
        ok.sample("unet", x, 4)
    with pytest.raises(TypeError, match="latents must be a tensor or a shape"):
        ok.sample(lambda x, t: x, "noise", 4)
    with pytest.raises(ValueError, match="returned shape"):
        ok.sample(lambda x, t: x[:1], x, 4)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        ok.set_timesteps(0)
    with pytest.raises(ValueError, match="the Gaussian must be"):
        GaussianTeleport(EulerDiscreteScheduler(), (G.mean, G.U, G.lam[:1]))
    with pytest.raises(TypeError, match="epsilon_model: denoise must be a callable"):
        gt.epsilon_model(None, EulerDiscreteScheduler())
