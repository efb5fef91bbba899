"""Benchmark cases of the fused sampler steps (``distkern.ops.diffusion``).

Baselines: the same step written plainly in eager PyTorch the way diffusers writes it (primary),
diffusers' own ``Scheduler.step`` when diffusers is installed, and the eager formula under
``torch.compile`` when it compiles on this machine.

Count model (the floor of a step): read the sample and the model output (and the previous x0 for
DPM-Solver++ 2M), write ``prev_sample`` and ``pred_original_sample``: 4 (5) × numel × element size
bytes, ~10 FLOPs per element. At 8×4×128×128 fp32 that is 8 MiB (10 MiB) — a memory-bound step
whose floor on the 2-core CPU is 0.11–0.2 ms at the 42–78 GB/s copy rates measured there (less when the
inputs sit in cache, as they do at this size; benchmarks/README.md, "Sampler step"), and ~3 µs on an H100.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .cases import Case, _has, dtype_name

Inputs = dict[str, Any]

_T, _T_PREV = 801, 781  # DDIM at 50 steps of 1000: timesteps 801 → 781
_SIGMA, _SIGMA_NEXT, _SIGMA_PREV = 3.0, 2.6, 3.5


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear (SD)
    return torch.cumprod(1 - betas, 0)


def _setup(shape: tuple[int, ...], prev: bool):
    def setup(device, dtype, *, seed: int = 0) -> Inputs:
        g = torch.Generator(device=device)
        g.manual_seed(12_345 + seed)
        x = torch.randn(shape, generator=g, device=device).to(dtype)
        m = torch.randn(shape, generator=g, device=device).to(dtype)
        out = {"sample": x, "model_output": m}
        if prev:
            out["prev_x0"] = torch.randn(shape, generator=g, device=device).to(dtype)
        return out

    return setup


# ---- DDIM (η = 0, epsilon prediction) ----------------------------------------------------------------
_AC = _alphas_cumprod()
_AT, _AP = float(_AC[_T]), float(_AC[_T_PREV])


def _ddim_ours(i: Inputs):
    from ..ops.diffusion import ddim_step

    return ddim_step(i["model_output"], i["sample"], _AT, _AP)[0]


def _ddim_eager_fn(sample, model_output, at: float, ap: float):
    # diffusers' DDIMScheduler.step, η = 0, epsilon, no clipping
    x0 = (sample - (1 - at) ** 0.5 * model_output) / at**0.5
    direction = (1 - ap) ** 0.5 * model_output
    return ap**0.5 * x0 + direction, x0


def _ddim_eager(i: Inputs):
    return _ddim_eager_fn(i["sample"], i["model_output"], _AT, _AP)[0]


# ---- Euler (epsilon) ---------------------------------------------------------------------------------
def _euler_ours(i: Inputs):
    from ..ops.diffusion import euler_step

    return euler_step(i["model_output"], i["sample"], _SIGMA, _SIGMA_NEXT)[0]


def _euler_eager_fn(sample, model_output, sigma: float, sigma_next: float):
    # diffusers' EulerDiscreteScheduler.step without churn: upcast, x0, derivative, Euler update
    s = sample.float()
    x0 = s - sigma * model_output
    derivative = (s - x0) / sigma
    return (s + derivative * (sigma_next - sigma)).to(model_output.dtype), x0


def _euler_eager(i: Inputs):
    return _euler_eager_fn(i["sample"], i["model_output"], _SIGMA, _SIGMA_NEXT)[0]


# ---- DPM-Solver++ 2M (midpoint, epsilon) -------------------------------------------------------------
def _alpha_sigma(s: float) -> tuple[float, float]:
    a = 1 / math.sqrt(s * s + 1)
    return a, s * a


def _dpm_ours(i: Inputs):
    from ..ops.diffusion import dpmpp_2m_step

    return dpmpp_2m_step(i["model_output"], i["sample"], _SIGMA, _SIGMA_NEXT, prev_x0=i["prev_x0"],
                         sigma_prev=_SIGMA_PREV)[0]


def _dpm_eager_fn(sample, model_output, prev_x0, sigma: float, sigma_next: float, sigma_prev: float):
    # diffusers' DPMSolverMultistepScheduler: convert_model_output + multistep_dpm_solver_second_order_update
    s = sample.float()
    a_s, s_s = _alpha_sigma(sigma)
    a_t, s_t = _alpha_sigma(sigma_next)
    a_p, s_p = _alpha_sigma(sigma_prev)
    lam_t, lam_s0, lam_s1 = math.log(a_t / s_t), math.log(a_s / s_s), math.log(a_p / s_p)
    x0 = (s - s_s * model_output) / a_s
    h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
    r0 = h_0 / h
    d0, d1 = x0, (1.0 / r0) * (x0 - prev_x0)
    e = math.exp(-h) - 1.0
    x_t = (s_t / s_s) * s - (a_t * e) * d0 - 0.5 * (a_t * e) * d1
    return x_t.to(model_output.dtype), x0


def _dpm_eager(i: Inputs):
    return _dpm_eager_fn(i["sample"], i["model_output"], i["prev_x0"], _SIGMA, _SIGMA_NEXT, _SIGMA_PREV)[0]


# ---- diffusers' own step (installed) -----------------------------------------------------------------
def _diffusers_ddim():
    import diffusers

    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(50)

    def run(i: Inputs):
        return sched.step(i["model_output"], _T, i["sample"]).prev_sample

    return run


def _sigma_index(sched, sigma: float) -> int:
    return int((sched.sigmas - sigma).abs().argmin())


def _diffusers_euler():
    import diffusers

    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(50)
    k = _sigma_index(sched, _SIGMA)
    sched.sigmas[k], sched.sigmas[k + 1] = _SIGMA, _SIGMA_NEXT  # step between exactly our σ's

    def run(i: Inputs):
        sched._step_index = k
        sched.is_scale_input_called = True
        return sched.step(i["model_output"], sched.timesteps[k], i["sample"]).prev_sample

    return run


def _diffusers_dpm():
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(50)
    k = _sigma_index(sched, _SIGMA)
    sched.sigmas[k - 1], sched.sigmas[k], sched.sigmas[k + 1] = _SIGMA_PREV, _SIGMA, _SIGMA_NEXT

    def run(i: Inputs):
        sched._step_index = k
        sched.lower_order_nums = 2
        sched.model_outputs = [i["prev_x0"], i["prev_x0"]]
        return sched.step(i["model_output"], sched.timesteps[k], i["sample"]).prev_sample

    return run


def _compiled(fn, *args_from):
    state: dict[str, Any] = {}

    def run(i: Inputs):
        if "f" not in state:
            state["f"] = torch.compile(fn, dynamic=False)
        return state["f"](*[i[k] if isinstance(k, str) else k for k in args_from])[0]

    return run


def _compile_works() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


_STEPS = {
    "ddim_step": (_ddim_ours, _ddim_eager, _ddim_eager_fn, ("sample", "model_output", _AT, _AP), _diffusers_ddim,
                  False),
    "euler_step": (_euler_ours, _euler_eager, _euler_eager_fn, ("sample", "model_output", _SIGMA, _SIGMA_NEXT),
                   _diffusers_euler, False),
    "dpmpp_2m_step": (_dpm_ours, _dpm_eager, _dpm_eager_fn,
                      ("sample", "model_output", "prev_x0", _SIGMA, _SIGMA_NEXT, _SIGMA_PREV), _diffusers_dpm, True),
}


def diffusion_cases() -> list[Case]:
    out = []
    # torch.compile is a baseline where it is cheap to build (inductor's C++ on the CPU) and on the one
    # CUDA bandwidth case: each shape is a fresh Triton compile, which the GPU check's time cannot afford
    grid = [
        ((8, 4, 128, 128), torch.float32, ("cpu",), False, "the issue's CPU shape", True),
        ((8, 4, 128, 128), torch.float32, ("cuda",), False, "", False),
        ((1, 4, 128, 128), torch.float32, ("cuda",), False, "SD-sized latents: per-step latency", False),
        ((16, 16, 256, 256), torch.float32, ("cuda",), False, "16.8M elements: bandwidth", True),
        ((16, 16, 256, 256), torch.bfloat16, ("cuda",), False, "16.8M elements: bandwidth", False),
        ((2, 4, 32, 32), torch.float32, ("cpu", "cuda"), True, "", False),
    ]
    for op, (ours, eager, eager_fn, args, diffusers_fn, prev) in _STEPS.items():
        for shape, dtype, devices, quick, note, compile_it in grid:
            if quick and op != "ddim_step":
                continue
            numel = math.prod(shape)
            elem = torch.finfo(dtype).bits // 8
            baselines = {"eager": eager}
            if _has("diffusers") and dtype == torch.float32:
                try:
                    baselines["diffusers"] = diffusers_fn()
                except Exception:  # noqa: BLE001 - an incompatible diffusers is simply not compared
                    pass
            if compile_it and _compile_works():
                baselines["torch.compile"] = _compiled(eager_fn, *args)
            out.append(Case(
                op=op,
                label=f"{'x'.join(map(str, shape))} {dtype_name(dtype)}",
                params={"numel": numel},
                dtype=dtype,
                setup=_setup(shape, prev),
                ours=ours,
                baselines=baselines,
                bytes=(5 if prev else 4) * numel * elem,
                flops=(14 if prev else 10) * numel,
                devices=devices,
                quick=quick,
                note=note,
            ))
    return out
