"""distkern.diffusion schedulers: drop-in equality with Hugging Face diffusers, and their own behaviour.

The comparison tests (``diffusers = pytest.importorskip("diffusers")``) run whole sampling loops of our scheduler
and diffusers' side by side from the same latents, with the same deterministic fake model and the same
``torch.Generator`` seeds, and check every step's ``prev_sample`` and ``pred_original_sample``.

Tolerance. ``prev_sample``: 1e-5 relative (max |ours − theirs| / max |theirs|) at every step.
``pred_original_sample``: 1e-5 relative, plus what its formula ``x̂0 = a·x + b·m`` cannot help differing by:
its float32 rounding (``X0_ULPS`` ulps of ``|a|·max|x| + |b|·max|m|``) and the propagation ``a·Δx + b·Δm`` of
this step's input differences (``Δx`` is the previous step's ``prev_sample`` difference, already held to 1e-5).
Both only matter where x̂0 is ill-conditioned: ε-prediction at the noisiest steps, where
``x̂0 = (x − √(1−ā)·ε)/√ā`` cancels ~1000× (``√ā ≈ 0.006`` at t = 999). There diffusers' own float32 x̂0 is
3e-4 – 7e-4 (relative) away from the exact value of its formula on the same float32 inputs, so no float32
implementation can agree with it to 1e-5 unless it repeats its exact operation order. At well-conditioned steps
the measured x̂0 differences are ≤ 2e-6.

The fake model is the posterior-mean denoiser of N(0, ½·I) data plus a small smooth nonlinearity: being
consistent with the forward process it keeps the loop well conditioned, so differences measure step arithmetic.
(An arbitrary function such as ``0.3·x·cos(t/100)`` makes DDIM with clipping amplify float32 rounding ~1000× over
the loop: there diffusers itself drifts 4.5e-5 from a float64 run, and we 3.7e-5.)

Run with ``-s`` to see the measured worst errors and the fp16 / bf16 drifts.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from distkern import diffusion as dd

SHAPE = (2, 4, 8, 8)
REL = 1e-5          # relative tolerance vs diffusers
X0_ULPS = 8         # float32 ulps of the x̂0 formula's terms allowed on top (see the module docstring)
F32_EPS = 2.0**-24
WORST: dict[str, dict[str, float]] = {}


# ----------------------------------------------------------------------------------------------------- fake model

def fake_model(x: torch.Tensor, t, prediction_type: str = "epsilon", continuous: bool = False) -> torch.Tensor:
    """Deterministic stand-in for a network: ``(B, ...)`` input and a timestep (number, 0-dim or ``(B,)`` tensor;
    ``continuous``: Euler's ``0.25·log σ`` timesteps) → ``(B, ...)`` output of the given prediction type."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
    if continuous:
        sigma = torch.exp(4 * t)
        ab = 1 / (sigma**2 + 1)
    else:
        ab = torch.exp(-(1e-4 * t + 0.5 * (0.02 - 1e-4) * t * t / 1000))
    ab = ab.clamp(1e-6, 1 - 1e-4)
    view = (-1,) + (1,) * (x.dim() - 1)
    c2 = 0.5
    k = (ab.sqrt() * c2 / (ab * c2 + 1 - ab)).reshape(view).to(x.dtype)
    sa, sb = ab.sqrt().reshape(view).to(x.dtype), (1 - ab).sqrt().reshape(view).to(x.dtype)
    x0 = k * x + 0.05 * torch.sin(3 * x + (t.reshape(view) / 100).to(x.dtype))
    eps = (x - sa * x0) / sb
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return sa * eps - sb * x0


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------- harness

def _x0_terms(name, ref, i, t, cfg, step_kw):
    """``(a, b)`` of ``x̂0 = a·x + b·m`` at step ``i`` (for the float32 rounding floor of the tolerance)."""
    pt = cfg.get("prediction_type", "epsilon")
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        sigma = float(ref.sigmas[i])
        churn = step_kw.get("s_churn", 0.0)
        gamma = min(churn / (len(ref.sigmas) - 1), 2**0.5 - 1) if churn else 0.0
        if pt == "epsilon":
            return 1.0, sigma * (1 + gamma)
        if pt == "v_prediction":
            return 1 / (sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)
        return 0.0, 1.0
    if name == "DPMSolverMultistepScheduler":
        sigma = float(ref.sigmas[i])
        ab = 1 / (sigma**2 + 1)
    elif name == "DDIMInverseScheduler":
        ratio = ref.config.num_train_timesteps // ref.num_inference_steps
        cur = min(int(t) - ratio, ref.config.num_train_timesteps - 1)
        ab = float(ref.alphas_cumprod[cur]) if cur >= 0 else float(ref.initial_alpha_cumprod)
    else:
        ab = float(ref.alphas_cumprod[int(t)])
    if pt == "epsilon":
        return 1 / math.sqrt(ab), math.sqrt((1 - ab) / ab)
    if pt == "v_prediction":
        return math.sqrt(ab), math.sqrt(1 - ab)
    return 0.0, 1.0


def compare_loop(name, cfg, *, steps=20, step_kw=None, stochastic=False, set_kw=None, label=None):
    """Run diffusers' ``name`` and ours (built with ``from_config(diffusers.config)``) side by side; assert every
    step agrees; return the worst relative errors."""
    diffusers = pytest.importorskip("diffusers")
    step_kw = dict(step_kw or {})
    set_kw = dict(set_kw or {"num_inference_steps": steps})
    ref = getattr(diffusers, name)(**cfg)
    ours = getattr(dd, name).from_config(ref.config)
    direct = getattr(dd, name)(**cfg)
    assert _public(direct.config) == _public(ours.config)
    ref.set_timesteps(**set_kw)
    ours.set_timesteps(**set_kw)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)  # what the model sees: bit-identical
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    pt = cfg.get("prediction_type", "epsilon")
    continuous = cfg.get("timestep_type") == "continuous" and pt == "v_prediction"
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SHAPE, generator=g)
    if name == "DDIMInverseScheduler":
        x = x * 0.5  # starts from "data"
    else:
        x = x * float(ref.init_noise_sigma)
    xr, xo = x.clone(), x.clone()
    gr = torch.Generator().manual_seed(77) if stochastic else None
    go = torch.Generator().manual_seed(77) if stochastic else None
    worst = {"prev": 0.0, "x0": 0.0, "x0_wellcond": 0.0}
    for i, (tr, to) in enumerate(zip(ref.timesteps, ours.timesteps)):
        mr = fake_model(ref.scale_model_input(xr, tr), tr, pt, continuous)
        mo = fake_model(ours.scale_model_input(xo, to), to, pt, continuous)
        kr, ko = dict(step_kw), dict(step_kw)
        if stochastic:
            kr["generator"], ko["generator"] = gr, go
        out_r = ref.step(mr, tr, xr, **kr)
        out_o = ours.step(mo, to, xo, **ko)
        x0r = getattr(out_r, "pred_original_sample", None)
        if x0r is None:
            x0r = ref.model_outputs[-1]
        e_prev = rel_err(out_o.prev_sample, out_r.prev_sample)
        e_x0 = rel_err(out_o.pred_original_sample, x0r)
        # what x̂0 = a·x + b·m may differ by without any step error: the float32 rounding of its terms, and the
        # propagation of this step's (already checked) input differences
        j = ref.step_index - 1 if getattr(ref, "step_index", None) is not None else i
        a, b = _x0_terms(name, ref, j, tr, cfg, step_kw)
        scale = x0r.double().abs().max().item()
        floor = X0_ULPS * F32_EPS * (abs(a) * xr.abs().max().item() + abs(b) * mr.abs().max().item())
        carried = (a * (xo.double() - xr.double()) + b * (mo.double() - mr.double())).abs().max().item()
        explained = (floor + carried) / scale
        assert e_prev <= REL, f"{label or name} step {i} (t={float(tr)}): prev_sample rel err {e_prev:.3g}"
        assert e_x0 <= REL + explained, (f"{label or name} step {i} (t={float(tr)}): pred_original_sample rel err "
                                         f"{e_x0:.3g} > {REL} + explained {explained:.3g}")
        worst["prev"] = max(worst["prev"], e_prev)
        worst["x0"] = max(worst["x0"], e_x0)
        if explained < 2e-6:
            worst["x0_wellcond"] = max(worst["x0_wellcond"], e_x0)
        xr, xo = out_r.prev_sample, out_o.prev_sample
    w = WORST.setdefault(name, {"prev": 0.0, "x0": 0.0, "x0_wellcond": 0.0})
    for k, v in worst.items():
        w[k] = max(w[k], v)
    print(f"\n[{label or name}] worst rel err vs diffusers: prev_sample {worst['prev']:.2e}; pred_original_sample "
          f"{worst['x0']:.2e} (at well-conditioned steps {worst['x0_wellcond']:.2e})")
    return worst


# ----------------------------------------------------------------------------------------------------- cases

PRED = ("epsilon", "v_prediction", "sample")

CASES = []


def case(name, cfg=None, steps=20, step_kw=None, stochastic=False, set_kw=None, id=None):
    CASES.append(pytest.param(name, cfg or {}, steps, step_kw, stochastic, set_kw, id=id))


for _pt in PRED:
    case("DDPMScheduler", {"prediction_type": _pt}, stochastic=True, id=f"ddpm-{_pt}")
    case("DDIMScheduler", {"prediction_type": _pt}, id=f"ddim-{_pt}")
    case("DDIMScheduler", {"prediction_type": _pt, "clip_sample": False}, step_kw={"eta": 0.6}, stochastic=True,
         id=f"ddim-eta-noclip-{_pt}")
    case("DDIMInverseScheduler", {"prediction_type": _pt, "set_alpha_to_one": _pt != "sample"},
         id=f"ddim_inverse-{_pt}")
    case("EulerDiscreteScheduler", {"prediction_type": _pt}, id=f"euler-{_pt}")
    case("DPMSolverMultistepScheduler", {"prediction_type": _pt}, id=f"dpm-{_pt}")
    case("DPMSolverMultistepScheduler", {"prediction_type": _pt, "algorithm_type": "sde-dpmsolver++"},
         stochastic=True, id=f"dpm-sde-{_pt}")
for _pt in ("epsilon", "v_prediction"):  # diffusers' Euler ancestral does not implement "sample"
    case("EulerAncestralDiscreteScheduler", {"prediction_type": _pt}, stochastic=True, id=f"euler_a-{_pt}")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# DDPM variants
case("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_large"}, stochastic=True, id="ddpm-large")
case("DDPMScheduler", {"variance_type": "fixed_small_log", "timestep_spacing": "trailing"}, stochastic=True,
     id="ddpm-smalllog-trailing")
case("DDPMScheduler", {"thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"}, stochastic=True,
     id="ddpm-threshold")
case("DDPMScheduler", {**SD, "steps_offset": 1, "timestep_spacing": "linspace"}, stochastic=True, id="ddpm-sd-linspace")
case("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, stochastic=True,
     id="ddpm-cosine")
case("DDPMScheduler", {"beta_schedule": "sigmoid"}, stochastic=True, id="ddpm-sigmoid")
case("DDPMScheduler", {"prediction_type": "v_prediction"}, stochastic=True,
     set_kw={"timesteps": [999, 800, 640, 500, 300, 201, 100, 40, 7, 0]}, id="ddpm-custom-timesteps")
# DDIM variants
case("DDIMScheduler", {**SD, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}, id="ddim-sd")
case("DDIMScheduler", {"timestep_spacing": "trailing"}, step_kw={"eta": 1.0}, stochastic=True, id="ddim-trailing-eta1")
case("DDIMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": False}, id="ddim-linspace")
case("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.5}, id="ddim-threshold")
case("DDIMScheduler", {"prediction_type": "v_prediction", "thresholding": True, "sample_max_value": 2.0},
     step_kw={"eta": 0.3, "use_clipped_model_output": True}, stochastic=True, id="ddim-threshold-clipped-eps")
case("DDIMScheduler", {"clip_sample_range": 0.8}, step_kw={"eta": 0.5, "use_clipped_model_output": True},
     stochastic=True, id="ddim-clip-clipped-eps")
case("DDIMScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                       "timestep_spacing": "trailing", "clip_sample": False}, id="ddim-zero-snr")
case("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, steps=25,
     id="ddim-cosine")
# DDIM inverse variants
case("DDIMInverseScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, id="ddim_inverse-trailing")
case("DDIMInverseScheduler", {**SD, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
     id="ddim_inverse-sd")
# Euler variants
case("EulerDiscreteScheduler", {"use_karras_sigmas": True}, id="euler-karras")
case("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True, "sigma_min": 0.1,
                                "sigma_max": 20.0}, id="euler-karras-range")
case("EulerDiscreteScheduler", {}, step_kw={"s_churn": 2.0}, stochastic=True, id="euler-churn")
case("EulerDiscreteScheduler", {"use_karras_sigmas": True}, step_kw={"s_churn": 4.0, "s_tmin": 0.5, "s_tmax": 30.0,
                                                                     "s_noise": 1.003}, stochastic=True,
     id="euler-churn-gated")
case("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, id="euler-sd-leading")
case("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
     id="euler-trailing-sigmamin")
case("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, id="euler-loglinear")
case("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_type": "continuous"},
     id="euler-continuous-v")
case("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                "timestep_spacing": "trailing"}, id="euler-zero-snr")
case("EulerDiscreteScheduler", {}, set_kw={"timesteps": [999.0, 850.5, 700.0, 420.0, 250.0, 90.0, 10.0]},
     id="euler-custom-timesteps")
case("EulerDiscreteScheduler", {"prediction_type": "v_prediction"},
     set_kw={"sigmas": [80.0, 20.0, 7.0, 2.5, 1.0, 0.4, 0.1, 0.0]}, id="euler-custom-sigmas")
# Euler ancestral variants
case("EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, stochastic=True,
     id="euler_a-sd-leading")
case("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                         "rescale_betas_zero_snr": True}, stochastic=True, id="euler_a-zero-snr")
# DPM-Solver++ variants
case("DPMSolverMultistepScheduler", {"solver_order": 1}, id="dpm-order1")
case("DPMSolverMultistepScheduler", {"solver_type": "heun"}, id="dpm-heun")
case("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, stochastic=True,
     id="dpm-sde-heun")
case("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, steps=25, id="dpm-karras-25")
case("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}, steps=12,
     stochastic=True, id="dpm-karras-sde")
case("DPMSolverMultistepScheduler", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, steps=10,
     id="dpm-no-lower-final-sigmamin")
case("DPMSolverMultistepScheduler", {"euler_at_final": True, "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun"}, steps=16, id="dpm-euler-at-final")
case("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"},
     id="dpm-threshold")
case("DPMSolverMultistepScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, id="dpm-sd-leading")
case("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                     "rescale_betas_zero_snr": True}, id="dpm-zero-snr")
case("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
     steps=15, id="dpm-cosine-clipped")
case("DPMSolverMultistepScheduler", {}, set_kw={"timesteps": [999, 850, 700, 500, 333, 200, 80, 20]},
     id="dpm-custom-timesteps")


@pytest.mark.parametrize("name,cfg,steps,step_kw,stochastic,set_kw", CASES)
def test_loop_matches_diffusers(name, cfg, steps, step_kw, stochastic, set_kw, request):
    compare_loop(name, cfg, steps=steps, step_kw=step_kw, stochastic=stochastic, set_kw=set_kw,
                 label=request.node.callspec.id)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST:
        print("\n\nworst relative error vs diffusers per scheduler (prev_sample / pred_original_sample all steps / "
              "pred_original_sample at well-conditioned steps):")
        for name, w in WORST.items():
            print(f"  {name:34s} {w['prev']:.2e}  {w['x0']:.2e}  {w['x0_wellcond']:.2e}")


ALL = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "EulerDiscreteScheduler",
       "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")


# ----------------------------------------------------------------------------------------------------- from_config

def _public(cfg) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", ALL)
def test_config_has_diffusers_keys_and_defaults(name):
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, name)(beta_start=0.0002)
    ours = getattr(dd, name)(beta_start=0.0002)
    assert _public(ours.config) == _public(ref.config)
    # the defaulted arguments, under diffusers' key, so that its from_config of our config leaves them alone
    assert sorted(ours.config["_use_default_values"]) == sorted(ref.config["_use_default_values"])
    assert "beta_start" not in ours.config["_use_default_values"]
    assert ours.order == ref.order
    assert len(ours) == len(ref)


@pytest.mark.parametrize("name", [n for n in ALL if n != "DDIMInverseScheduler"])
def test_from_config_of_another_diffusers_scheduler(name):
    """The one-line swap of a pipeline: ``Ours.from_config(pipe.scheduler.config)`` where the pipeline's scheduler
    is another class (an SD-style DDIM config) builds what diffusers' ``from_config`` builds."""
    diffusers = pytest.importorskip("diffusers")
    source = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1).config
    ref = getattr(diffusers, name).from_config(source)
    ours = getattr(dd, name).from_config(source)
    assert _public(ours.config) == {k: ref.config[k] for k in _public(ours.config)}  # diffusers keeps unused keys
    compare_loop(name, dict(ours.config), steps=10, stochastic=name in ("DDPMScheduler",
                                                                       "EulerAncestralDiscreteScheduler"),
                 label=f"{name}-from-ddim-config")


def test_from_config_defaults_and_reverse_direction():
    """Arguments a scheduler took as defaults stay defaults in another class (diffusers' ``_use_default_values``
    rule), for our configs as for diffusers'; diffusers can read our config too."""
    ddim = dd.DDIMScheduler(**SD, clip_sample=False)
    euler = dd.EulerDiscreteScheduler.from_config(ddim.config)
    assert euler.config.timestep_spacing == "linspace" and euler.config.beta_schedule == "scaled_linear"
    assert "timestep_spacing" in ddim.config.use_default_values and "beta_end" not in ddim.config.use_default_values
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config)
    assert _public(euler.config) == {k: ref.config[k] for k in _public(euler.config)}
    back = diffusers.DDIMScheduler.from_config(ddim.config)
    assert {k: back.config[k] for k in _public(ddim.config)} == _public(ddim.config)
    # the defaults travel in the config dict itself (diffusers' key): a plain dict() copy keeps them, and
    # diffusers' from_config of our config leaves Euler's own default spacing
    assert dd.EulerDiscreteScheduler.from_config(dict(ddim.config)).config.timestep_spacing == "linspace"
    assert diffusers.EulerDiscreteScheduler.from_config(ddim.config).config.timestep_spacing == "linspace"


def test_ddpm_fixed_large_log_uses_beta(caplog):
    """diffusers 0.42 returns NaN for variance_type="fixed_large_log" (it takes √(log β)); we use β, with a warning."""
    with caplog.at_level("WARNING", logger="distkern.diffusion"):
        a = dd.DDPMScheduler(variance_type="fixed_large_log")
    assert "fixed_large_log" in caplog.text
    b = dd.DDPMScheduler(variance_type="fixed_large")
    x = torch.randn(SHAPE)
    for s in (a, b):
        s.set_timesteps(10)
    n = torch.randn(SHAPE)
    torch.testing.assert_close(a.step(x, 900, x, variance_noise=n).prev_sample,
                               b.step(x, 900, x, variance_noise=n).prev_sample, rtol=0, atol=0)


def test_from_config_ignores_unknown_keys_and_overrides(caplog):
    cfg = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", "skip_prk_steps": True,
           "prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}
    with caplog.at_level("INFO", logger="distkern.diffusion"):
        s = dd.DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
    assert s.config.prediction_type == "v_prediction" and s.config["beta_schedule"] == "scaled_linear"
    assert s.config.timestep_spacing == "trailing"
    assert "skip_prk_steps" in caplog.text and "_class_name" not in caplog.text
    assert dict(dd.DDIMScheduler.from_config(s).config) == dict(s.config)  # a scheduler works as a config too
    with pytest.warns(UserWarning, match="not_an_arg"):  # diffusers ignores it silently; we say so
        s2, unused = dd.DDIMScheduler.from_config(cfg, not_an_arg=1, return_unused_kwargs=True)
    assert unused == {"not_an_arg": 1} and _public(s2.config) == _public(dd.DDIMScheduler.from_config(cfg).config)
    with pytest.raises(TypeError, match="read-only"):
        s.config["eta"] = 1
    with pytest.raises(TypeError, match="read-only"):
        s.config.prediction_type = "epsilon"
    with pytest.raises(AttributeError, match="nope"):
        s.config.nope
    import copy
    import pickle
    assert dict(copy.deepcopy(s).config) == dict(s.config)
    assert pickle.loads(pickle.dumps(s.config)) == s.config
    assert "DDIMScheduler(" in repr(s)


@pytest.mark.parametrize("name,cfg,match", [
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one"),
    ("DDIMInverseScheduler", {"timestep_spacing": "linspace"}, "timestep_spacing"),
])
def test_unsupported_values_raise(name, cfg, match):
    with pytest.raises(ValueError, match=match):
        getattr(dd, name).from_config(cfg)


def test_dpm_maps_legacy_names_like_diffusers():
    s = dd.DPMSolverMultistepScheduler(algorithm_type="deis", solver_type="bh2")
    assert s.config.algorithm_type == "dpmsolver++" and s.config.solver_type == "midpoint"
    s = dd.DDIMInverseScheduler.from_config({"set_alpha_to_zero": False})
    assert s.config.set_alpha_to_one is False


# ----------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_named_errors(name):
    cls = getattr(dd, name)
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="trained_betas"):
        cls(trained_betas=[0.1, 0.2])
    s = cls()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, int(s.timesteps[0]), x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(5000)
    s.set_timesteps(10)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(2, 4, 8, 7), t, x)
    fresh = cls()
    fresh.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        fresh.step(x, 1000, x)
    with pytest.raises(ValueError, match="timestep"):
        fresh.step(x, -1, x)
    with pytest.raises(TypeError, match="timestep"):
        fresh.step(x, "999", x)
    with pytest.raises(ValueError, match="timestep"):
        fresh.step(x, torch.zeros(3), x)  # neither one timestep nor (B,) = (2,)


def test_more_bad_inputs():
    s = dd.DDIMScheduler()
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        s.step(x, 901, x, eta=-0.1)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        s.step(x, 901, x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(x, 901, x, eta=0.5, variance_noise=torch.zeros(3))
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, torch.tensor([901, 1000]), x)  # per-sample CPU timesteps are range-checked
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, 900.5, x)
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    e = dd.EulerDiscreteScheduler()
    e.set_timesteps(10)
    with pytest.raises(ValueError, match="integer timestep 3.*enumerate"):
        e.step(x, 3, x)  # an index, not a timestep value (refused as diffusers does, even where it is one)
    with pytest.raises(ValueError, match="integer timestep"):
        e.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        e.step(x, 3.0, x)
    e.set_timesteps(2)
    e.step(x, e.timesteps[0], x)
    e.step(x, e.timesteps[1], x)
    with pytest.raises(ValueError, match="set_timesteps again"):
        e.step(x, e.timesteps[1], x)
    with pytest.raises(ValueError, match="sigmas"):
        e.set_timesteps(timesteps=[999.0, 500.0], sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        dd.EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999.0, 500.0])
    with pytest.raises(ValueError, match="descending"):
        dd.DDPMScheduler().set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="mu"):
        dd.DPMSolverMultistepScheduler().set_timesteps(10, mu=0.5)
    with pytest.raises(ValueError, match="v_prediction"):  # ā = 0 at the zero-SNR timestep: ε undefined
        z = dd.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        z.set_timesteps(10)
        z.step(x, 999, x)
    with pytest.raises(ValueError, match="set_alpha_to_one"):  # ā = 1 at the first inversion step: x̂0 → ε undefined
        inv = dd.DDIMInverseScheduler(prediction_type="sample")
        inv.set_timesteps(10)
        inv.step(x, 0, x)
    with pytest.raises(ValueError, match="seed"):
        s.set_noise_seed(-1)


# ----------------------------------------------------------------------------------------------------- per-sample

def _batch_vs_alone(name, cfg=None, step_kw=None, noise=False, steps=20, picks=(0, 7, 19)):
    cfg = cfg or {}
    g = torch.Generator().manual_seed(3)
    B = len(picks)
    x = torch.randn((B,) + SHAPE[1:], generator=g) * 3
    vn = torch.randn_like(x) if noise else None
    s = getattr(dd, name)(**cfg)
    s.set_timesteps(steps)
    t = s.timesteps[list(picks)]
    pt = s.config.prediction_type
    xin = s.scale_model_input(x, t)
    m = fake_model(xin, t, pt)
    kw = dict(step_kw or {})
    if noise:
        kw["variance_noise"] = vn
    out = s.step(m, t, x, **kw)
    for b in range(B):
        alone = getattr(dd, name)(**cfg)
        alone.set_timesteps(steps)
        kb = dict(step_kw or {})
        if noise:
            kb["variance_noise"] = vn[b:b + 1]
        xb = alone.scale_model_input(x[b:b + 1], t[b])
        torch.testing.assert_close(xin[b:b + 1], xb, rtol=1e-6, atol=1e-6)
        ob = alone.step(m[b:b + 1], t[b], x[b:b + 1], **kb)
        torch.testing.assert_close(out.prev_sample[b:b + 1], ob.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.pred_original_sample[b:b + 1], ob.pred_original_sample, rtol=1e-6, atol=1e-6)
    return out


@pytest.mark.parametrize("name,cfg,step_kw,noise", [
    ("DDPMScheduler", {"prediction_type": "v_prediction"}, None, True),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 2.0}, None, True),
    ("DDIMScheduler", {}, None, False),
    ("DDIMScheduler", {"prediction_type": "sample", "set_alpha_to_one": False}, {"eta": 0.5}, True),
    ("DDIMScheduler", {"clip_sample_range": 0.5}, {"eta": 0.3, "use_clipped_model_output": True}, True),
    ("DDIMInverseScheduler", {"prediction_type": "v_prediction"}, None, False),
    ("EulerDiscreteScheduler", {}, None, False),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {"s_churn": 3.0},
     True),
    ("EulerAncestralDiscreteScheduler", {}, None, True),
])
def test_per_sample_timesteps_equal_stepping_each_sample_alone(name, cfg, step_kw, noise):
    _batch_vs_alone(name, cfg, step_kw, noise)


def test_per_sample_timesteps_details():
    x = torch.randn(SHAPE)
    # the last DDPM step (t = 0) adds no noise, per sample
    s = dd.DDPMScheduler()
    s.set_timesteps(10)
    t = torch.tensor([0, int(s.timesteps[0])])
    a = s.step(x, t, x, variance_noise=torch.ones_like(x))
    b = s.step(x, t, x, variance_noise=torch.zeros_like(x))
    assert torch.equal(a.prev_sample[0], b.prev_sample[0]) and not torch.equal(a.prev_sample[1], b.prev_sample[1])
    # a 0-dim tensor and an int give the same step; a per-sample Euler step leaves the step counter alone
    d = dd.DDIMScheduler()
    d.set_timesteps(10)
    assert torch.equal(d.step(x, 901, x).prev_sample, d.step(x, torch.tensor(901), x).prev_sample)
    e = dd.EulerDiscreteScheduler()
    e.set_timesteps(10)
    e.step(x, e.timesteps[[2, 5]], x)
    assert e.step_index is None
    # per-sample churn gated by s_tmin / s_tmax: each sample as if stepped alone (same churn noise)
    ts = e.timesteps[[2, 5]]
    sig = [float(e.sigmas[2]), float(e.sigmas[5])]
    lo = (sig[0] + sig[1]) / 2  # sample 0 (larger σ) churns, sample 1 does not
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    both = e.step(x, ts, x, s_churn=3.0, s_tmin=lo, variance_noise=noise).prev_sample
    for i in range(2):
        one = dd.EulerDiscreteScheduler()
        one.set_timesteps(10)
        alone = one.step(x[i:i + 1], float(ts[i]), x[i:i + 1], s_churn=3.0, s_tmin=lo,
                         variance_noise=noise[i:i + 1]).prev_sample
        assert torch.allclose(both[i:i + 1], alone, atol=1e-6)
    plain = e.step(x, ts, x).prev_sample
    assert not torch.allclose(both[0], plain[0]) and torch.allclose(both[1], plain[1], atol=1e-6)
    # DPM-Solver++ keeps one history for the batch: per-sample timesteps are refused
    p = dd.DPMSolverMultistepScheduler()
    p.set_timesteps(10)
    with pytest.raises(ValueError, match="per-sample"):
        p.step(x, p.timesteps[[0, 1]], x)


# ----------------------------------------------------------------------------------------------------- add_noise etc.

@pytest.mark.parametrize("name", [n for n in ALL if n != "DDIMInverseScheduler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_scale_model_input_match_diffusers(name, dtype):
    diffusers = pytest.importorskip("diffusers")
    cfg = {"use_karras_sigmas": True} if name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler") else {}
    ref, ours = getattr(diffusers, name)(**cfg), getattr(dd, name)(**cfg)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(SHAPE, generator=g).to(dtype)
    noise = torch.randn(SHAPE, generator=g).to(dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    if name in ("DDPMScheduler", "DDIMScheduler"):  # training-time use, no set_timesteps needed
        t = torch.tensor([3, 999])
        torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **tol)
        torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), **tol)
    ref.set_timesteps(15)
    ours.set_timesteps(15)
    t = ref.timesteps[[1, 9]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **tol)
    for tt in ref.timesteps[:3]:
        torch.testing.assert_close(ours.scale_model_input(x0, tt), ref.scale_model_input(x0, tt), **tol)
    if hasattr(ref, "set_begin_index"):  # image-to-image: the begin index decides the σ of add_noise
        ref.set_begin_index(4)
        ours.set_begin_index(4)
        torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **tol)


def test_generator_lists_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref, ours = diffusers.DDPMScheduler(), dd.DDPMScheduler()
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x = torch.randn(SHAPE)
    m = fake_model(x, 900)
    gr = [torch.Generator().manual_seed(s) for s in (1, 2)]
    go = [torch.Generator().manual_seed(s) for s in (1, 2)]
    torch.testing.assert_close(ours.step(m, 900, x, generator=go).prev_sample,
                               ref.step(m, 900, x, generator=gr).prev_sample, rtol=1e-5, atol=1e-6)
    assert torch.equal(go[0].get_state(), gr[0].get_state())  # the generators advanced alike


def test_return_dict_false_and_output_indexing():
    x = torch.randn(SHAPE)
    s = dd.DDIMScheduler()
    s.set_timesteps(10)
    out = s.step(x, 901, x)
    tup = s.step(x, 901, x, return_dict=False)
    assert len(tup) == 2 and torch.equal(tup[0], out.prev_sample) and torch.equal(out[0], out["prev_sample"])
    p = dd.DPMSolverMultistepScheduler()
    p.set_timesteps(10)
    assert len(p.step(x, p.timesteps[0], x, return_dict=False)) == 1  # as diffusers: (prev_sample,)


# ----------------------------------------------------------------------------------------------------- noise seeds

def _noisy_loop(name, seed, cfg=None, step_kw=None, steps=8, reseed=True, s=None):
    s = s or getattr(dd, name)(**(cfg or {}))
    if reseed and seed is not None:
        s.set_noise_seed(seed)
    s.set_timesteps(steps)
    x = torch.ones(SHAPE)
    for t in s.timesteps:
        x = s.step(fake_model(s.scale_model_input(x, t), t, s.config.prediction_type), t, x, **(step_kw or {}))
        x = x.prev_sample
    return x, s


@pytest.mark.parametrize("name,cfg,step_kw", [
    ("DDPMScheduler", None, None),
    ("DDIMScheduler", None, {"eta": 1.0}),
    ("EulerDiscreteScheduler", None, {"s_churn": 2.0}),
    ("EulerAncestralDiscreteScheduler", None, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, None),
])
def test_in_kernel_noise_is_reproducible_from_the_scheduler_seed(name, cfg, step_kw):
    a, sa = _noisy_loop(name, 11, cfg, step_kw)
    b, _ = _noisy_loop(name, 11, cfg, step_kw)
    c, _ = _noisy_loop(name, 12, cfg, step_kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert sa.noise_seed == 11 and sa.noise_offset == 8  # the offset advances every step
    d, _ = _noisy_loop(name, None, cfg, step_kw, reseed=False, s=sa)  # a second loop gets fresh noise
    assert not torch.allclose(a, d)
    torch.manual_seed(0)  # an unseeded scheduler draws each step's seed from torch's CPU generator
    e, se = _noisy_loop(name, None, cfg, step_kw)
    torch.manual_seed(0)
    f, _ = _noisy_loop(name, None, cfg, step_kw)
    assert torch.equal(e, f) and se.noise_seed is not None
    # ... so torch.manual_seed replays a loop of the same scheduler object too, as with diffusers
    torch.manual_seed(0)
    g, _ = _noisy_loop(name, None, cfg, step_kw, reseed=False, s=se)
    assert torch.equal(e, g)
    h, _ = _noisy_loop(name, None, cfg, step_kw, reseed=False, s=se)
    assert not torch.allclose(e, h)


def test_in_kernel_noise_is_standard_normal():
    x = torch.randn(8, 4, 32, 32)
    steps = []
    for kw in ({}, {"variance_noise": torch.zeros_like(x)}):
        s = dd.EulerAncestralDiscreteScheduler()
        s.set_timesteps(10)
        s.set_noise_seed(2024)
        s.set_begin_index(3)
        t = s.timesteps[3]
        steps.append(s.step(fake_model(s.scale_model_input(x, t), t), t, x, **kw).prev_sample)
    sig, nxt = float(s.sigmas[3]), float(s.sigmas[4])
    up = (nxt**2 * (sig**2 - nxt**2) / sig**2) ** 0.5
    n = ((steps[0] - steps[1]) / up).double()
    assert abs(n.mean().item()) < 0.03 and abs(n.std().item() - 1) < 0.03


# ----------------------------------------------------------------------------------------------------- precision

def _drift_loop(name, dtype, cfg, steps=50):
    s = getattr(dd, name)(**cfg)
    s.set_timesteps(steps)
    s.set_noise_seed(3)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(SHAPE, generator=g) * s.init_noise_sigma).to(dtype)
    out = []
    for t in s.timesteps:
        m = fake_model(s.scale_model_input(x, t), t)  # the model runs in the loop's dtype, as a real one would
        step = s.step(m, t, x)
        assert step.prev_sample.dtype == dtype
        x = step.prev_sample
        out.append(x.float())
    return out


DRIFT_BOUND = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}  # measured ≤ 7e-3 / ≤ 5.6e-2; ~3× margin


@pytest.mark.parametrize("name,cfg", [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", SD),
], ids=["ddim", "ddim-sd", "euler", "euler-sd"])
def test_half_precision_loops_drift_boundedly(name, cfg, request):
    ref = _drift_loop(name, torch.float32, cfg)
    for dtype in (torch.float16, torch.bfloat16):
        low = _drift_loop(name, dtype, cfg)
        drift = [rel_err(a, b) for a, b in zip(low, ref)]
        print(f"\n[{request.node.callspec.id} 50 steps] {str(dtype)[6:]} drift from the fp32 loop: "
              f"final {drift[-1]:.2e}, max over steps {max(drift):.2e} (bound {DRIFT_BOUND[dtype]:.1e})")
        assert max(drift) <= DRIFT_BOUND[dtype]


# ----------------------------------------------------------------------------------------------------- standalone

STANDALONE = r"""
import sys
sys.modules["diffusers"] = None  # any import of diffusers now fails
import torch
from distkern.diffusion import (DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, EulerDiscreteScheduler,
                                EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)
for cls, kw in ((DDPMScheduler, {}), (DDIMScheduler, {"eta": 0.5}), (DDIMInverseScheduler, {}),
                (EulerDiscreteScheduler, {"s_churn": 1.0}), (EulerAncestralDiscreteScheduler, {}),
                (DPMSolverMultistepScheduler, {})):
    s = cls()
    s.set_timesteps(5)
    s.set_noise_seed(1)
    x = torch.randn(2, 4, 8, 8) * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(0.1 * s.scale_model_input(x, t), t, x, **kw).prev_sample
    assert torch.isfinite(x).all(), cls.__name__
assert sys.modules["diffusers"] is None
print("standalone ok")
"""


def test_runs_without_diffusers():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    res = subprocess.run([sys.executable, "-c", STANDALONE], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "standalone ok" in res.stdout


# ----------------------------------------------------------------------------------------------------- in a pipeline

def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_swapped_into_a_diffusers_pipeline(name):
    """The one-line swap in a real diffusers pipeline (a tiny random UNet): the same images as diffusers'
    scheduler from the same generator, and, without a generator, ``torch.manual_seed`` replays a run."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=getattr(diffusers, name)())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=6, output_type="np", batch_size=2)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = getattr(dd, name).from_config(pipe.scheduler.config)
    ours = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ours - ref).max() <= 1e-5 * max(abs(ref).max(), 1e-6)
    torch.manual_seed(3)
    a = pipe(**kw).images
    torch.manual_seed(3)
    b = pipe(**kw).images
    assert (a == b).all()


def test_from_pretrained_and_save_pretrained_round_trip(tmp_path):
    """``X.from_pretrained(folder, subfolder="scheduler")`` reads diffusers' files, and diffusers reads ours."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDIMScheduler(**SD, steps_offset=1))
    pipe.save_pretrained(tmp_path / "pipe")
    ours = dd.DDIMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert _public(ours.config) == _public(pipe.scheduler.config)
    euler = dd.EulerDiscreteScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler", timestep_spacing="trailing")
    assert euler.config.beta_schedule == "scaled_linear" and euler.config.timestep_spacing == "trailing"
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.DDIMScheduler.from_pretrained(tmp_path / "ours")
    assert {k: back.config[k] for k in _public(ours.config)} == _public(ours.config)
    assert dd.DDIMScheduler.from_pretrained(tmp_path / "ours" / "scheduler_config.json").config == ours.config
    with pytest.raises(FileNotFoundError, match="subfolder='scheduler'"):
        dd.DDIMScheduler.from_pretrained(tmp_path / "pipe")
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        ours.save_pretrained(tmp_path / "x", push_to_hub=True)


def test_pipeline_config_fixups_take_effect():
    """StableDiffusionPipeline rewrites an outdated config through ``scheduler._internal_dict``: it must change
    the scheduler, as it changes diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.configuration_utils import FrozenDict

    ref, ours = diffusers.DDIMScheduler(**SD), dd.DDIMScheduler(**SD)
    for s in (ref, ours):
        new = dict(s.config)
        new["steps_offset"], new["clip_sample"] = 1, False
        s._internal_dict = FrozenDict(new)
        s.set_timesteps(10)
    assert ours.config.steps_offset == 1 and ours.config.clip_sample is False
    assert torch.equal(ours.timesteps, ref.timesteps) and int(ours.timesteps[0]) == 901


def test_dpm_solver_output_dtype_follows_diffusers():
    """fp32 latents under an fp16 model stay fp32 (diffusers casts to its converted data prediction's dtype)."""
    s = dd.DPMSolverMultistepScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    assert s.step(x.half(), s.timesteps[0], x).prev_sample.dtype == torch.float32
    s = dd.DPMSolverMultistepScheduler(prediction_type="sample")
    s.set_timesteps(5)
    assert s.step(x.half(), s.timesteps[0], x).prev_sample.dtype == torch.float16  # x̂0 is the model output
