"""A whole DDIM sampling loop captured in one CUDA graph, at SD-sized latents (1×4×128×128).

    python benchmarks/cuda_graph_loop.py [--steps 50] [--dtype float16] [--json FILE]

Reports, for distkern's DDIMScheduler (and diffusers' when installed): the eager per-step time of
``scheduler.step`` alone (CUDA events, median over the loop), the kernels launched per step (torch
profiler), and the time of the whole loop captured in a CUDA graph and replayed — the step never
reads a device value back, so capture needs no special care — checked against the eager loop.
The "model" is a fixed elementwise function of the latents (the step, not a UNet, is measured).
Needs a CUDA GPU; exits with status 1 and a clear message without one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def fake_model(x, t):
    return 0.2 * x + 0.01 * float(t) / 1000.0


def sd_config(lib):
    return lib.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)


def eager_loop(sched, x, steps, torch):
    sched.set_timesteps(steps, device=x.device)
    times = []
    for t in [int(v) for v in sched.timesteps]:  # host timesteps: coefficients become kernel arguments
        eps = fake_model(x, t)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x = sched.step(eps, t, x).prev_sample
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # µs
    return x, statistics.median(times)


def launches_per_step(sched, x, torch):
    from torch.profiler import ProfilerActivity, profile

    sched.set_timesteps(10, device=x.device)
    t = int(sched.timesteps[3])
    eps = fake_model(x, t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sched.step(eps, t, x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)


def graph_loop(sched, x0, steps, torch):
    sched.set_timesteps(steps, device=x0.device)
    timesteps = [int(v) for v in sched.timesteps]  # read before capture; inside it nothing is read back
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
        y = static_x
        for t in timesteps[:2]:
            y = sched.step(fake_model(y, t), t, y).prev_sample
    torch.cuda.current_stream().wait_stream(stream)
    sched.set_timesteps(steps, device=x0.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = static_x
        for t in timesteps:
            y = sched.step(fake_model(y, t), t, y).prev_sample
        static_out = y
    static_x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    out = static_out.clone()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return out, a.elapsed_time(b) * 1e3 / reps  # µs per whole loop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("cuda_graph_loop: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    import distkern.diffusion as ours

    libs = {"distkern": ours}
    try:
        import diffusers

        libs["diffusers"] = diffusers
    except ImportError:
        pass
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(1, 4, 128, 128, device="cuda", generator=g).to(dtype)
    report = {"shape": [1, 4, 128, 128], "dtype": args.dtype, "steps": args.steps,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    for name, lib in libs.items():
        rec = {}
        try:
            ref, rec["eager_step_us"] = eager_loop(sd_config(lib), x0.clone(), args.steps, torch)
            rec["launches_per_step"] = launches_per_step(sd_config(lib), x0.clone(), torch)
            out, rec["graph_loop_us"] = graph_loop(sd_config(lib), x0, args.steps, torch)
            rec["graph_per_step_us"] = rec["graph_loop_us"] / args.steps
            rec["graph_vs_eager_max_abs"] = float((out.float() - ref.float()).abs().max())
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - report and go on with the next library
            rec["status"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        report["results"][name] = rec
        print(f"{name:10s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in rec.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("CUDA_GRAPH_LOOP " + json.dumps(report))
    return 0 if report["results"]["distkern"].get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
