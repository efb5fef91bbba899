"""``distkern bench``: time each op against its eager-PyTorch baseline and the installed peers.

First the device's two ceilings are measured — a large copy (GB/s, read + write counted) and a
large fp32 matmul (GFLOP/s) — then every case of the selected suite (:mod:`distkern.bench.cases`)
is run:

* ours is checked against the primary baseline (relative error, dtype tolerance); a case whose
  result disagrees is marked FAILED and the run exits non-zero;
* each implementation is warmed up, then timed a number of times, interleaved with the others (a
  fresh seeded order each round, so that none always runs right after the same one) so
  that noise from other processes hits all of them alike: median, min and inter-quartile range.
  CPU: ``time.perf_counter``. CUDA: CUDA events, rotating among several input sets when one set
  would stay in L2;
* each implementation's peak extra memory over one call is measured: CUDA:
  ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; CPU: growth of
  the process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset through
  ``/proc/self/clear_refs``, after ``malloc_trim``), which sees every allocation — torch's, BLAS
  workspaces, numpy's — at page granularity;
* from the case's byte/FLOP count model: achieved GB/s and GFLOP/s and the fraction of the
  ceiling (the floor time ``max(bytes / copy-rate, flops / matmul-rate)`` over the measured time).

Results print as a table (rich when installed) and can be written as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

from .cases import Case, cases_for, dtype_name, known_ops, tolerance
from .hooks import hook_report

__all__ = ["main", "run", "measure_ceilings", "print_results", "write_json"]

SCHEMA_VERSION = 1

# Timing budget per implementation and repeat limits, by (device kind, quick).
_POLICY = {
    ("cpu", False): dict(target_s=1.0, min_reps=3, max_reps=25, warm_s=0.05, warm_min=1),
    ("cpu", True): dict(target_s=0.03, min_reps=3, max_reps=5, warm_s=0.005, warm_min=1),
    ("cuda", False): dict(target_s=0.25, min_reps=10, max_reps=200, warm_s=0.05, warm_min=3),
    ("cuda", True): dict(target_s=0.03, min_reps=5, max_reps=20, warm_s=0.01, warm_min=2),
}

TIMING_METHOD = {
    "cpu": "time.perf_counter around each call (CPU ops are synchronous); warm-up, then repeats "
    "interleaved across implementations, in a fresh (seeded) order each round; median, min, IQR",
    "cuda": "CUDA events around each call on the current stream, synchronised after the repeats; "
    "warm-up, then repeats interleaved across implementations in a fresh (seeded) order each round, "
    "rotating input sets when one set fits in L2; median, min, IQR",
}
MEMORY_METHOD = {
    "cpu": "peak RSS growth over one call: gc + malloc_trim(0), reset VmHWM via /proc/self/clear_refs "
    "('5'), call, VmHWM - VmRSS before (all allocations incl. BLAS/numpy, page granularity, output "
    "included; min of up to 3 calls)",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats, minus "
    "memory_allocated() before the call (caching-allocator tensors, output included)",
}


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """One timed call in seconds (synchronised), for warm-up and estimates."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t0
    del out
    return dt


def _time_interleaved(
    fns: dict[str, Sequence[Callable[[], Any]]], reps: dict[str, int], device: torch.device
) -> dict[str, list[float]]:
    """Time each implementation ``reps[name]`` times, round-robin across implementations.

    ``fns[name]`` holds one zero-argument callable per input set; repeat ``r`` uses set
    ``r % len(sets)``. Each round runs the implementations in a fresh order (a seeded shuffle): what
    ran just before a call (dirty cache lines, freed blocks, another runtime's spinning threads)
    changes its time — a sampler step on the 2-core CPU took 242 µs after torch.compile's call and
    169 µs after its own — so no implementation always follows the same one. (Rotating the start
    would not do: consecutive rounds then still form one cycle.)
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    rounds = max(reps.values(), default=0)
    names = list(fns)
    shuffle = random.Random(0).shuffle

    def order(r: int) -> list[str]:
        if r > 0:
            shuffle(names)
        return names

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            events: dict[str, list[tuple[Any, Any]]] = {k: [] for k in fns}
            for r in range(rounds):
                for name in order(r):
                    sets = fns[name]
                    if r >= reps[name]:
                        continue
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = sets[r % len(sets)]()
                    end.record()
                    del out
                    events[name].append((start, end))
                # keep the queue short enough that host-side gaps never starve the GPU oddly
                if r % 8 == 7:
                    torch.cuda.synchronize(device)
            torch.cuda.synchronize(device)
            for name, evs in events.items():
                times[name] = [s.elapsed_time(e) / 1e3 for s, e in evs]
        else:
            for r in range(rounds):
                for name in order(r):
                    sets = fns[name]
                    if r >= reps[name]:
                        continue
                    fn = sets[r % len(sets)]
                    t0 = time.perf_counter()
                    out = fn()
                    times[name].append(time.perf_counter() - t0)
                    del out
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _stats(ts: list[float]) -> dict[str, Any]:
    ts = sorted(ts)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    return {
        "median_s": statistics.median(ts),
        "min_s": ts[0],
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "repeats": len(ts),
    }


class _RssProbe:
    """Peak resident-set growth of one call, on Linux (see MEMORY_METHOD['cpu'])."""

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        self._trim = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            self._trim = None  # non-glibc: the measurement still works, a bit coarser
        try:
            self._reset()
            self._read()
            self.available = True
        except (OSError, KeyError, ValueError) as e:
            self.reason = f"peak RSS unavailable ({type(e).__name__}: {e})"

    @staticmethod
    def _read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
        return {"rss": out["VmRSS"], "hwm": out["VmHWM"]}

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], Any]) -> int:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self._reset()
        before = self._read()["rss"]
        out = fn()
        peak = self._read()["hwm"]
        del out
        return max(0, peak - before)


def _measure_peak(fn: Callable[[], Any], device: torch.device, probe: _RssProbe | None, tries: int) -> int | None:
    if device.type == "cuda":
        best = None
        for _ in range(tries):
            torch.cuda.synchronize(device)
            gc.collect()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            best = peak if best is None else min(best, peak)
        return best
    if probe is None or not probe.available:
        return None
    return min(probe.measure(fn) for _ in range(tries))


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_fp32():
    """fp32 matmuls in true fp32 (no TF32) while benchmarking; restored afterwards."""
    prev_prec = torch.get_float32_matmul_precision()
    prev_cuda = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_prec)
        torch.backends.cuda.matmul.allow_tf32 = prev_cuda
        torch.backends.cudnn.allow_tf32 = prev_cudnn


def _best_of(fn: Callable[[], Any], device: torch.device, warm: int, reps: int) -> tuple[float, float]:
    for _ in range(warm):
        _time_once(fn, device)
    ts = _time_interleaved({"f": [fn]}, {"f": reps}, device)["f"]
    return min(ts), statistics.median(ts)


def measure_ceilings(device: str | torch.device = "cpu", *, quick: bool = False) -> dict[str, Any]:
    """The device's copy rate (GB/s, read + write) and matmul rates (GFLOP/s)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        copy_bytes = (64 if quick else 1024) * 2**20
        sizes = {"matmul_fp32": (2048 if quick else 8192, torch.float32),
                 "matmul_tf32": (2048 if quick else 8192, torch.float32),
                 "matmul_bf16": (2048 if quick else 8192, torch.bfloat16)}
        copy_reps, mm_reps = (5, 3) if quick else (20, 10)
    else:
        copy_bytes = (16 if quick else 256) * 2**20
        sizes = {"matmul_fp32": (512 if quick else 2048, torch.float32)}
        copy_reps, mm_reps = (5, 3) if quick else (10, 5)
    out: dict[str, Any] = {}
    with torch.no_grad(), _strict_fp32():
        src = torch.randn(copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        best, med = _best_of(lambda: dst.copy_(src), device, warm=2, reps=copy_reps)
        out["copy"] = {
            "buffer_bytes": copy_bytes,
            "bytes_per_iter": 2 * copy_bytes,
            "best_s": best,
            "median_s": med,
            "gb_per_s": 2 * copy_bytes / best / 1e9,
            "gb_per_s_median": 2 * copy_bytes / med / 1e9,
        }
        del src, dst
        for key, (n, dt) in sizes.items():
            a = torch.randn(n, n, device=device).to(dt)
            b = torch.randn(n, n, device=device).to(dt)
            c = torch.empty(n, n, device=device, dtype=dt)
            torch.backends.cuda.matmul.allow_tf32 = key == "matmul_tf32"
            try:
                best, med = _best_of(lambda: torch.mm(a, b, out=c), device, warm=1 if not cuda else 3, reps=mm_reps)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            via = "torch.mm"
            if not cuda and dt == torch.float32:
                # torch's BLAS may not use the widest vectors the CPU has (MKL runs AVX2 on AMD's AVX-512
                # cores); distkern's own product (common/cpu_gemm.h) is then the faster one: the ceiling is
                # the better of the two
                import distkern  # noqa: F401  (loads the ops)

                ours_best, ours_med = _best_of(lambda: torch.ops.distkern.dense_mm(a, b), device, warm=1,
                                               reps=mm_reps)
                if distkern._C.cpu_fast_gemm() and ours_best < best:
                    from distkern.ops._cpu import product_kernel_name

                    best, med, via = ours_best, ours_med, f"distkern.dense_mm ({product_kernel_name()})"
            flops = 2 * n**3
            out[key] = {
                "n": n,
                "dtype": dtype_name(dt),
                "via": via,
                "flops_per_iter": flops,
                "best_s": best,
                "median_s": med,
                "gflop_per_s": flops / best / 1e9,
                "gflop_per_s_median": flops / med / 1e9,
            }
            del a, b, c
    out["note"] = (
        "best of the repeats (a ceiling is what the device can do); copy counts read + write; "
        "matmul_fp32 in true fp32 (TF32 off; on the CPU the better of torch.mm and distkern's AVX-512 product, "
        "see 'via'), matmul_tf32 (CUDA) with TF32 on. The fraction of the ceiling "
        "uses copy and the case's matmul ceiling (matmul_fp32 unless the case names another)."
    )
    if cuda:
        torch.cuda.empty_cache()
    return out


def _floor(case: Case, ceilings: dict[str, Any]) -> tuple[float, str]:
    t_mem = case.bytes / (ceilings["copy"]["gb_per_s"] * 1e9)
    mm = ceilings.get(case.matmul_ceiling) or ceilings["matmul_fp32"]
    t_flop = case.flops / (mm["gflop_per_s"] * 1e9)
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


# ---------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------


def _as_tensor(v: Any, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(v, dtype=torch.float64, device=device)


def relative_error(value: Any, reference: Any) -> float:
    """Largest element-wise relative error, with the denominator floored at 1e-3 of the median
    magnitude (so near-zero reference entries do not blow it up). inf on shape or finiteness mismatch."""
    ref = _as_tensor(reference, torch.device("cpu") if not isinstance(reference, torch.Tensor) else reference.device)
    val = _as_tensor(value, ref.device)
    if val.shape != ref.shape:
        val = val.reshape(-1)
        ref = ref.reshape(-1)
        if val.shape != ref.shape:
            return math.inf
    if val.numel() == 0:
        return 0.0
    fin_r, fin_v = torch.isfinite(ref), torch.isfinite(val)
    if bool((fin_r != fin_v).any()):
        return math.inf
    ref, val = ref[fin_r], val[fin_r]
    if ref.numel() == 0:
        return 0.0
    floor = 1e-3 * float(ref.abs().median()) + 1e-30
    return float(((val - ref).abs() / ref.abs().clamp_min(floor)).max())


# ---------------------------------------------------------------------------------------------
# Running the cases
# ---------------------------------------------------------------------------------------------


def _tensor_bytes(inputs: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


def _l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _input_sets(case: Case, device: torch.device) -> list[dict[str, Any]]:
    """One input set; on CUDA, enough fresh ones (≥ 2) to exceed 4×L2 when one set fits in L2."""
    first = case.setup(device, case.dtype, seed=0)
    sets = [first]
    if device.type == "cuda":
        one, l2 = _tensor_bytes(first), _l2_bytes(device)
        if one <= l2:
            n = max(2, min(64, math.ceil(4 * l2 / max(one, 1))))
            n = max(2, min(n, (2 * 2**30) // max(one, 1)))
            sets += [case.setup(device, case.dtype, seed=k) for k in range(1, n)]
    return sets


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _run_case(case: Case, device: torch.device, ceilings: dict[str, Any], *, quick: bool,
              repeats: int | None, probe: _RssProbe | None, progress: bool) -> dict[str, Any]:
    policy = _POLICY[(device.type, quick)]
    floor_s, bound = _floor(case, ceilings)
    rec: dict[str, Any] = {
        "op": case.op,
        "label": case.label,
        "name": case.name,
        "origin": case.origin,
        "params": dict(case.params),
        "dtype": dtype_name(case.dtype),
        "note": case.note,
        "bytes": case.bytes,
        "flops": case.flops,
        "floor_s": floor_s,
        "bound": bound,
        "tolerance": (case.tol if case.tol is not None else tolerance(case.dtype)),
        "primary_baseline": case.primary_baseline,
        "status": "ok",
        "error": None,
        "rel_err": None,
        "impls": {},
    }
    t_case = time.perf_counter()
    try:
        sets = _input_sets(case, device)
    except Exception as e:  # noqa: BLE001 - report and go on with the next case
        rec.update(status="ERROR", error=f"setup: {type(e).__name__}: {e}")
        return rec
    rec["input_sets"] = len(sets)
    rec["input_bytes_per_set"] = _tensor_bytes(sets[0])

    impls: dict[str, tuple[str, Callable]] = {"ours": ("ours", case.ours)}
    for k, f in case.baselines.items():
        impls[k] = ("baseline", f)
    for k, f in case.peers_on(device.type).items():
        impls[k] = ("peer", f)

    # 1. agreement (and the first, cold call of each implementation)
    outputs: dict[str, Any] = {}
    first_call: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, (kind, f) in impls.items():
        try:
            _sync(device)
            t0 = time.perf_counter()
            outputs[name] = f(sets[0])
            _sync(device)
            first_call[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    primary = case.primary_baseline
    if "ours" in errors or primary in errors:
        who = "ours" if "ours" in errors else primary
        rec.update(status="ERROR", error=f"{who}: {errors[who]}")
        return rec
    ref = outputs[primary]
    agreement = {}
    for name in outputs:
        if name != primary:
            agreement[name] = relative_error(outputs[name], ref)
    rec["rel_err"] = agreement["ours"]
    if not (agreement["ours"] <= rec["tolerance"]):
        rec["status"] = "FAILED"
        rec["error"] = (f"ours disagrees with {primary}: relative error {agreement['ours']:.3g} > "
                        f"tolerance {rec['tolerance']:.1g}")
    outputs.clear()
    live = [n for n in impls if n not in errors]

    # 2. warm-up and per-implementation repeat counts
    calls = {n: [(lambda f=impls[n][1], s=s: f(s)) for s in sets] for n in live}
    est: dict[str, float] = {}
    with torch.no_grad():
        for n in live:
            ts = [first_call[n]]
            k = 0
            while len(ts) < policy["warm_min"] + 1 or sum(ts[1:]) < policy["warm_s"]:
                ts.append(_time_once(calls[n][k % len(calls[n])], device))
                k += 1
                if len(ts) > 50:
                    break
            est[n] = min(ts[1:])
        if repeats is not None:
            reps = {n: max(1, repeats) for n in live}
        else:
            reps = {
                n: int(min(policy["max_reps"], max(policy["min_reps"], round(policy["target_s"] / max(est[n], 1e-7)))))
                for n in live
            }
        # 3. timing
        times = _time_interleaved({n: calls[n] for n in live}, reps, device)
        # 4. memory
        peaks: dict[str, int | None] = {}
        for n in live:
            tries = 1 if est[n] > 0.5 else 3
            try:
                peaks[n] = _measure_peak(calls[n][0], device, probe, tries)
            except Exception as e:  # noqa: BLE001
                peaks[n] = None
                errors.setdefault(n, f"memory: {type(e).__name__}: {e}")

    ours_t = statistics.median(times["ours"])
    ours_mem = peaks.get("ours")
    for name, (kind, _) in impls.items():
        r: dict[str, Any] = {"kind": kind}
        if name in errors and name not in times:
            r["error"] = errors[name]
            rec["impls"][name] = r
            continue
        r.update(_stats(times[name]))
        med = r["median_s"]
        r["gb_per_s"] = case.bytes / med / 1e9
        r["gflop_per_s"] = case.flops / med / 1e9
        r["floor_fraction"] = floor_s / med
        r["peak_mem_bytes"] = peaks.get(name)
        if name != "ours":
            r["ratio"] = med / ours_t  # > 1: ours faster
            pm = peaks.get(name)
            r["mem_ratio"] = (pm / ours_mem) if (pm is not None and ours_mem) else None  # > 1: ours smaller
            r["rel_err"] = agreement.get(name)
        if name in errors:
            r["error"] = errors[name]
        rec["impls"][name] = r

    if case.acceptance:
        acc = case.acceptance
        b = rec["impls"].get(acc["baseline"], {})
        bt, bm = b.get("median_s"), b.get("peak_mem_bytes")
        time_ok = bt is not None and ours_t <= acc["max_time_ratio"] * bt
        mem_ok = None if (bm is None or ours_mem is None) else ours_mem < acc["max_mem_fraction"] * bm
        rec["acceptance"] = {
            **acc,
            "time_ratio": (ours_t / bt) if bt else None,
            "mem_fraction": (ours_mem / bm) if (bm and ours_mem is not None) else None,
            "time_ok": time_ok,
            "mem_ok": mem_ok,
            "passed": bool(time_ok and mem_ok and rec["status"] == "ok"),
        }
    rec["wall_s"] = time.perf_counter() - t_case
    del sets, calls
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "l2_bytes": getattr(p, "L2_cache_size", None),
            "cuda_runtime": torch.version.cuda,
        }
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "capability": torch.backends.cpu.get_cpu_capability()}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _host_info(load_start: list[float] | None) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_start,  # 1, 5, 15 min, before the run: other work sharing the CPUs
        "loadavg_end": _loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _build_info() -> dict[str, Any]:
    try:
        import distkern

        return distkern.build_info()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def run(
    device: str = "cpu",
    ops: list[str] | None = None,
    *,
    quick: bool = False,
    repeats: int | None = None,
    progress: bool = False,
    time_budget: float | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    match: str | None = None,
    first: str | None = None,
) -> dict[str, Any]:
    """Measure the ceilings and run the selected cases; return the results (the JSON document).

    ``time_budget`` (seconds): start no case after that much wall time; the cases left are listed
    in ``skipped_for_time`` and ``complete`` is False. ``checkpoint(doc)`` is called after each case
    with the document so far (``distkern bench --json`` writes it, so a run cut short by an outer
    timeout still leaves its finished cases on disk). ``match``: a regular expression searched in the case
    names (``op/label``); only the cases it finds run. ``first``: a regular expression; the cases it finds
    run before the others (each group in suite order), so a time budget cuts the rest."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    load_start = _loadavg()
    selected = _first(cases_for(dev.type, quick=quick, ops=ops, match=match), first)
    _say(progress, f"distkern bench: {len(selected)} case(s) on {dev}; measuring ceilings ...")
    with torch.no_grad(), _strict_fp32():
        ceilings = measure_ceilings(dev, quick=quick)
        _say(progress, f"  copy {ceilings['copy']['gb_per_s']:.1f} GB/s, "
                       f"fp32 matmul {ceilings['matmul_fp32']['gflop_per_s']:.1f} GFLOP/s")
        probe = _RssProbe() if dev.type == "cpu" else None
        results: list[dict[str, Any]] = []
        skipped: list[str] = []
        for case in selected:
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                skipped.append(case.name)
                continue
            _say(progress, f"  {case.name} ...")
            rec = _run_case(case, dev, ceilings, quick=quick, repeats=repeats, probe=probe, progress=progress)
            _say(progress, f"    {rec['status']} in {rec.get('wall_s', 0.0):.1f} s")
            results.append(rec)
            if checkpoint is not None:
                checkpoint(_document(dev, quick, repeats, probe, load_start, ceilings, results, [], t0, partial=True))
    if skipped:
        _say(progress, f"  time budget of {time_budget:.0f} s spent: {len(skipped)} case(s) not run")
    return _document(dev, quick, repeats, probe, load_start, ceilings, results, skipped, t0, partial=False)


def _document(dev: torch.device, quick: bool, repeats: int | None, probe: Any, load_start: Any,
              ceilings: dict[str, Any], results: list[dict[str, Any]], skipped: list[str], t0: float, *,
              partial: bool) -> dict[str, Any]:
    import distkern

    memory_method = MEMORY_METHOD[dev.type]
    if probe is not None and not probe.available:
        memory_method = f"unavailable: {probe.reason}"
    return {
        "schema": SCHEMA_VERSION,
        "tool": "distkern bench",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(dev),
        "torch_version": torch.__version__,
        "distkern_version": distkern.__version__,
        "build_info": _build_info(),
        "host": _host_info(load_start),
        "mode": "quick" if quick else "full",
        "repeats": repeats if repeats is not None else "adaptive",
        "timing_method": TIMING_METHOD[dev.type],
        "memory_method": memory_method,
        "ratio_definition": "ratio = impl median time / ours median time (> 1: ours faster); "
        "mem_ratio = impl peak extra memory / ours (> 1: ours smaller); floor_fraction = "
        "max(bytes / copy rate, flops / fp32 matmul rate) / median time",
        "ceilings": ceilings,
        "cases": list(results),
        "complete": not partial and not skipped,
        "skipped_for_time": list(skipped),
        "benchmark_hooks": hook_report(),  # plugins' distkern.benchmarks entry points, broken ones included
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b} B"


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{suffix}"


_COLUMNS = ["case", "impl", "median", "min", "IQR", "× vs ours", "GB/s", "GFLOP/s", "% ceil",
            "peak mem", "mem ×", "rel err", "status"]


def _rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in res["cases"]:
        first = True
        if not c["impls"]:
            rows.append([c["name"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         f"{c['status']}: {c['error']}"])
            continue
        for name, r in c["impls"].items():
            label = c["name"] if first else ""
            first = False
            if "median_s" not in r:
                rows.append([label, name] + ["-"] * 10 + [f"error: {r.get('error')}"])
                continue
            if name == "ours":
                ratio, memr, err = "1.00", "1.00", _fmt(c["rel_err"], ".1e")
                status = c["status"]
                if c.get("acceptance"):
                    status += " | accept " + ("PASS" if c["acceptance"]["passed"] else "MISS")
            else:
                ratio = _fmt(r.get("ratio"), ".2f")
                memr = _fmt(r.get("mem_ratio"), ".1f")
                err = _fmt(r.get("rel_err"), ".1e") if name != c["primary_baseline"] else "(ref)"
                status = r.get("error", "") or ""
            rows.append([
                label, f"{name}" if r["kind"] != "peer" else f"{name} (peer)",
                _fmt_time(r["median_s"]), _fmt_time(r["min_s"]), _fmt_time(r["iqr_s"]),
                ratio, _fmt(r["gb_per_s"], ".1f"), _fmt(r["gflop_per_s"], ".1f"),
                _fmt(100 * r["floor_fraction"], ".0f", "%"), _fmt_bytes(r.get("peak_mem_bytes")),
                memr, err, status,
            ])
    return rows


def _header(res: dict[str, Any]) -> list[str]:
    c = res["ceilings"]
    d = res["device"]
    lines = [
        f"distkern bench — {d['type']}: {d['name']} — torch {res['torch_version']}, distkern "
        f"{res['distkern_version']} — {res['mode']} suite — {res['host']['torch_threads']} threads",
        f"ceilings (measured, best of repeats): copy {c['copy']['gb_per_s']:.1f} GB/s (read+write), "
        f"fp32 matmul {c['matmul_fp32']['gflop_per_s']:.1f} GFLOP/s (n={c['matmul_fp32']['n']})"
        + (f", tf32 matmul {c['matmul_tf32']['gflop_per_s']:.1f} GFLOP/s" if "matmul_tf32" in c else "")
        + (f", bf16 matmul {c['matmul_bf16']['gflop_per_s']:.1f} GFLOP/s" if "matmul_bf16" in c else ""),
    ]
    h = res["host"]
    load, cpus = h.get("loadavg_start"), h.get("cpus_usable") or h.get("cpu_count") or 1
    if res["device"]["type"] == "cpu" and load and load[0] > 0.5 * cpus:
        lines.append(f"warning: load average {load[0]:.2f} on {cpus} CPU(s) before the run: other work "
                     "shares the CPUs, timings are noisy (ratios, interleaved, less so)")
    return lines


def _footer(res: dict[str, Any]) -> list[str]:
    lines = [
        "× vs ours: impl time / ours time (> 1: ours faster). mem ×: impl peak / ours peak (> 1: ours "
        "smaller). % ceil: floor time (count model vs the ceilings) / median time. rel err: vs the "
        "primary baseline (ref).",
        f"memory: {res['memory_method']}",
    ]
    for c in res["cases"]:
        a = c.get("acceptance")
        if a:
            lines.append(
                f"acceptance {c['name']}: time ours/{a['baseline']} = {_fmt(a['time_ratio'], '.2f')} "
                f"(≤ {a['max_time_ratio']}), memory ours/{a['baseline']} = {_fmt(a['mem_fraction'], '.4f')} "
                f"(< {a['max_mem_fraction']}) → {'PASS' if a['passed'] else 'MISS'}"
            )
        if c["status"] != "ok":
            lines.append(f"{c['status']} {c['name']}: {c['error']}")
    lines += _broken_hook_lines(res.get("benchmark_hooks", []))
    lines.append(f"wall time {res['wall_s']:.1f} s")
    return lines


def _broken_hook_lines(hooks: list[dict[str, Any]]) -> list[str]:
    return [f"broken benchmark hook {h['name']} ({h['package']} {h['version'] or ''}, {h['target']}): {h['error']} "
            "-- its cases were left out" for h in hooks if h["status"] != "ok"]


def print_results(res: dict[str, Any], file=None) -> None:
    """Print the results as a table: rich when installed, aligned plain text otherwise."""
    file = file or sys.stdout
    rows = _rows(res)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment]
    if Console is not None:
        console = Console(file=file, width=None if getattr(file, "isatty", lambda: False)() else 200)
        for line in _header(res):
            console.print(line, highlight=False, markup=False)
        table = Table(show_lines=False, header_style="bold")
        for col in _COLUMNS:
            table.add_column(col, justify="left" if col in ("case", "impl", "status") else "right",
                             no_wrap=col != "status")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in _footer(res):
            console.print(line, highlight=False, markup=False)
        return
    widths = [max(len(col), *(len(r[i]) for r in rows)) if rows else len(col) for i, col in enumerate(_COLUMNS)]
    out = _header(res)
    out.append("  ".join(col.ljust(w) for col, w in zip(_COLUMNS, widths)))
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(
            (v.ljust(w) if i in (0, 1, 12) else v.rjust(w)) for i, (v, w) in enumerate(zip(r, widths))
        ).rstrip())
    out += _footer(res)
    print("\n".join(out), file=file)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


def write_json(res: dict[str, Any], path: str | os.PathLike) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(res), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distkern bench",
        description="Time distkern's ops against their eager-PyTorch baselines and installed peer "
        "libraries, after measuring the device's copy and matmul ceilings.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device to benchmark on (default: cpu); cuda needs a GPU and a CUDA build of distkern")
    p.add_argument("--ops", nargs="+", metavar="NAME",
                   help=f"only these ops (known: {', '.join(known_ops())})")
    p.add_argument("--cases", metavar="REGEX",
                   help="only the cases whose name (op/label, as --list prints it) matches this regular expression")
    p.add_argument("--first", metavar="REGEX",
                   help="run the cases whose name matches this regular expression before the others (with "
                        "--time-budget: the ones that must not be cut)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats: a smoke run (about 30 s on 2 cores; used by the tests)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed calls per implementation (default: adaptive, ~1 s per implementation "
                   "on CPU, 0.25 s on CUDA, at least 3)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no case after this many seconds; the rest are listed as skipped (with --json the "
                   "file is also rewritten after every case, so an outer timeout keeps the finished ones)")
    p.add_argument("--list", action="store_true", help="list the cases that would run, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    return p


def _list(cases: list[Case], device: str, quick: bool) -> None:
    print(f"{len(cases)} case(s), device {device}, {'quick' if quick else 'full'} suite:")
    for c in cases:
        impls = ["ours", *c.baselines, *(f"{p} (peer)" for p in c.peers_on(device))]
        extra = f"  [{c.note}]" if c.note else ""
        origin = f"  (from {c.origin})" if c.origin != "distkern" else ""
        print(f"  {c.name:<40} {', '.join(impls)}{origin}{extra}")
    for line in _broken_hook_lines(hook_report()):
        print(line)


def _other_suite_hint(args) -> str:
    """When the filters select nothing in the chosen suite but something in the other: how to get it."""
    other = cases_for(args.device, quick=not args.quick, ops=args.ops, match=args.cases)
    if not other:
        return ""
    return (f" ({len(other)} in the {'full' if args.quick else 'quick'} suite: "
            f"{'drop' if args.quick else 'add'} --quick)")


def _first(cases: list, first: str | None) -> list:
    """The cases whose name ``first`` finds, then the rest (a stable partition)."""
    if not first:
        return list(cases)
    rx = re.compile(first)
    return [c for c in cases if rx.search(c.name)] + [c for c in cases if not rx.search(c.name)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``distkern bench`` (``argv``: the arguments after ``bench``); returns the exit code:
    0 ok, 1 a case failed (wrong result or error) or the device is unavailable, 2 bad arguments."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    if args.repeats is not None and args.repeats < 1:
        print("distkern bench: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    known = known_ops()
    if args.ops:
        unknown = [o for o in args.ops if o not in known]
        if unknown:
            print(f"distkern bench: error: unknown op(s): {', '.join(unknown)}; known ops: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    for flag, rx in (("--cases", args.cases), ("--first", args.first)):
        if rx:
            try:
                re.compile(rx)
            except re.error as e:
                print(f"distkern bench: error: {flag} {rx!r} is not a regular expression: {e}", file=sys.stderr)
                return 2
    cases = _first(cases_for(args.device, quick=args.quick, ops=args.ops, match=args.cases), args.first)
    if args.list:
        _list(cases, args.device, args.quick)
        if not cases and (args.ops or args.cases):
            print(f"  none match{_other_suite_hint(args)}")
        return 0
    for line in _broken_hook_lines(hook_report()):
        print(f"distkern bench: warning: {line}", file=sys.stderr)
    if not cases:
        print(f"distkern bench: error: no {'quick' if args.quick else 'full'}-suite cases for "
              f"{', '.join(args.ops or known)}{f' matching {args.cases!r}' if args.cases else ''} on {args.device}"
              f"{_other_suite_hint(args)}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
            print(f"distkern bench: error: --device cuda but CUDA is not available: {why}.", file=sys.stderr)
            return 1
        info = _build_info()
        if not info.get("cuda"):
            print("distkern bench: error: --device cuda but distkern was built without its CUDA kernels "
                  f"(build info: {info}); rebuild with DISTKERN_CUDA=1 "
                  "pip install --no-build-isolation --force-reinstall --no-deps .", file=sys.stderr)
            return 1

    if args.time_budget is not None and args.time_budget <= 0:
        print("distkern bench: error: --time-budget must be > 0", file=sys.stderr)
        return 2
    checkpoint = (lambda doc: write_json(doc, args.json)) if args.json else None
    res = run(args.device, args.ops, quick=args.quick, repeats=args.repeats, progress=not args.quiet,
              time_budget=args.time_budget, checkpoint=checkpoint, match=args.cases, first=args.first)
    print_results(res)
    if args.json:
        write_json(res, args.json)
        print(f"results written to {args.json}")
    if res["skipped_for_time"]:
        print(f"distkern bench: time budget spent, not run: {', '.join(res['skipped_for_time'])}", file=sys.stderr)
    bad = [c["name"] for c in res["cases"] if c["status"] != "ok"]
    if bad:
        print(f"distkern bench: {len(bad)} case(s) not ok: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
