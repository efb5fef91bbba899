"""The benchmark harness (`distkern bench`): a quick CPU run, listing, argument errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

bench = pytest.importorskip("distkern.bench")


def test_quick_cpu_run_writes_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert bench.main(["--quick", "--quiet", "--json", str(path)]) == 0
    res = json.loads(path.read_text())

    assert res["device"]["type"] == "cpu"
    assert res["torch_version"] == torch.__version__
    assert "cuda" in res["build_info"]
    assert res["host"]["cpu_count"] >= 1
    assert res["timestamp"] and res["memory_method"] and res["timing_method"]
    ceil = res["ceilings"]
    assert ceil["copy"]["gb_per_s"] > 0
    assert ceil["matmul_fp32"]["gflop_per_s"] > 0

    maha = [c for c in res["cases"] if c["op"] == "mahalanobis"]
    assert maha, "no mahalanobis case in the quick suite"
    for c in maha:
        assert c["status"] == "ok", c["error"]
        assert c["rel_err"] is not None and c["rel_err"] <= c["tolerance"]
        assert c["bytes"] > 0 and c["flops"] > 0 and c["floor_s"] > 0
        ours = c["impls"]["ours"]
        assert math.isfinite(ours["median_s"]) and ours["median_s"] > 0
        assert 0 < ours["min_s"] <= ours["median_s"]
        assert ours["gb_per_s"] > 0 and ours["gflop_per_s"] > 0 and ours["floor_fraction"] > 0
        eager = c["impls"][c["primary_baseline"]]
        assert eager["kind"] == "baseline"
        assert eager["ratio"] > 0 and math.isfinite(eager["ratio"])
        assert eager["ratio"] == pytest.approx(eager["median_s"] / ours["median_s"])
        if res["memory_method"].startswith("peak RSS"):
            assert ours["peak_mem_bytes"] is not None and eager["peak_mem_bytes"] is not None

    out = capsys.readouterr().out
    assert "mahalanobis" in out and "eager" in out


def test_run_returns_results_dict():
    res = bench.run("cpu", ["mahalanobis"], quick=True, repeats=2)
    assert res["mode"] == "quick"
    assert all(c["impls"]["ours"]["repeats"] == 2 for c in res["cases"])


def test_relative_error_flags_disagreement():
    ref = torch.tensor([1.0, 2.0, 4.0])
    assert bench.relative_error(ref.clone(), ref) == 0.0
    assert bench.relative_error(ref * 1.1, ref) == pytest.approx(0.1)
    assert bench.relative_error(torch.tensor([1.0, float("nan"), 4.0]), ref) == math.inf
    assert bench.relative_error(torch.ones(2), ref) == math.inf


def test_list(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "mahalanobis/N=200000 D=256 fp32" in out
    assert bench.main(["--list", "--quick", "--ops", "mahalanobis"]) == 0
    assert "N=2000 D=64" in capsys.readouterr().out
    # a filter that selects only the other suite's cases says so, listing or running
    assert bench.main(["--list", "--ops", "mahalanobis", "--cases", "N=2000 "]) == 0
    assert "none match (2 in the quick suite: add --quick)" in capsys.readouterr().out
    assert bench.main(["--quick", "--ops", "mahalanobis", "--cases", "N=200000 "]) == 2
    assert "in the full suite: drop --quick" in capsys.readouterr().err


def test_cases_regex_selects_cases(capsys, tmp_path):
    assert bench.main(["--list", "--device", "cuda", "--cases", r"^kernel_matmul/gaussian x3 N=M=65536 D=\d+ fp32$"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert [ln.split()[3] for ln in lines] == ["D=64", "D=512", "D=2048"]
    assert bench.main(["--list", "--cases", "("]) == 2
    assert "not a regular expression" in capsys.readouterr().err
    assert bench.main(["--quick", "--cases", "no such case"]) == 2
    assert "matching 'no such case'" in capsys.readouterr().err
    res = bench.run("cpu", quick=True, repeats=1, match="^mahalanobis/")
    assert res["cases"] and all(c["name"].startswith("mahalanobis/") for c in res["cases"])


def test_first_runs_the_matching_cases_first(capsys):
    assert bench.main(["--list", "--device", "cuda"]) == 0
    plain = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    rx = r"^kernel_matmul/.* fp32$|_step/16x16x256x256 fp32$"
    assert bench.main(["--list", "--device", "cuda", "--first", rx]) == 0
    ordered = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    heads = [n for n in plain if n.startswith("kernel_matmul/")][:1] + ["ddim_step/16x16x256x256"]
    assert sorted(ordered) == sorted(plain) and ordered != plain
    assert ordered[0] == heads[0] and ordered.index("ddim_step/16x16x256x256") < ordered.index("mahalanobis/N=1000000")
    assert bench.main(["--list", "--first", "("]) == 2
    assert "--first" in capsys.readouterr().err


def test_peers_on_cuda_only_where_declared():
    from distkern.bench.cases import Case

    def f(i):
        return None

    c = Case(op="x", label="y", params={}, dtype=torch.float32, setup=f, ours=f, baselines={"eager": f},
             bytes=1, flops=1, devices=("cpu", "cuda"), peers={"numpy-lib": f, "torch-lib": f},
             cuda_peers=("torch-lib",))
    assert list(c.peers_on("cpu")) == ["numpy-lib", "torch-lib"]
    assert list(c.peers_on("cuda")) == ["torch-lib"]
    assert list(c.peers_on("cuda:0")) == ["torch-lib"]


def test_unknown_op_is_a_usage_error(capsys):
    assert bench.main(["--ops", "no-such-op"]) == 2
    err = capsys.readouterr().err
    assert "no-such-op" in err and "mahalanobis" in err


def test_bad_arguments_exit_2():
    assert bench.main(["--device", "tpu"]) == 2
    assert bench.main(["--repeats", "0"]) == 2


def test_help_exits_0(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--device", "--ops", "--quick", "--json", "--repeats", "--list"):
        assert opt in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_exits_1(capsys):
    assert bench.main(["--device", "cuda", "--quick"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_cuda_run(tmp_path):
    import distkern

    if not distkern.build_info().get("cuda"):
        pytest.skip("distkern built without CUDA kernels")
    path = tmp_path / "c.json"
    assert bench.main(["--device", "cuda", "--quick", "--quiet", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["device"]["type"] == "cuda"
    assert "matmul_bf16" in res["ceilings"]
    assert all(c["status"] == "ok" for c in res["cases"])


def test_time_budget_and_checkpoints(tmp_path):
    from distkern.bench import main, run

    docs = []
    res = run("cpu", ["mahalanobis"], quick=True, repeats=1, time_budget=1e-9, checkpoint=docs.append)
    assert res["cases"] == [] and res["skipped_for_time"] and res["complete"] is False and docs == []
    res = run("cpu", ["mahalanobis"], quick=True, repeats=1, checkpoint=docs.append)
    assert res["complete"] and res["skipped_for_time"] == []
    assert len(docs) == len(res["cases"]) >= 2 and not any(d["complete"] for d in docs)
    assert [c["name"] for c in docs[0]["cases"]] == [res["cases"][0]["name"]]
    out = tmp_path / "b.json"
    assert main(["--quick", "--ops", "mahalanobis", "--repeats", "1", "--quiet", "--time-budget", "1e-9",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["cases"] == [] and len(doc["skipped_for_time"]) >= 2
    assert main(["--quick", "--time-budget", "0"]) == 2


def test_gpu_check_script_fails_fast_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh parses, and on a machine without a GPU stops at once with a named reason."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    bash = shutil.which("bash")
    if bash is None or not script.exists():
        pytest.skip("no bash or no benchmarks/gpu_check.sh in this checkout")
    assert subprocess.run([bash, "-n", str(script)]).returncode == 0
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    r = subprocess.run([bash, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DK_VENV": str(tmp_path / "venv")})
    assert r.returncode == 1
    assert "nvidia-smi not found" in (tmp_path / "env.txt").read_text()
    assert not (tmp_path / "venv").exists()


def test_profile_kernels_script_fails_fast_and_knows_its_cases(tmp_path):
    """benchmarks/profile_kernels.sh parses and stops at once, naming what is missing; every case it knows is a
    case of benchmarks/profile_driver.py."""
    import importlib.util
    import re
    import shutil
    import subprocess
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    script, driver = bench_dir / "profile_kernels.sh", bench_dir / "profile_driver.py"
    bash = shutil.which("bash")
    if bash is None or not script.exists():
        pytest.skip("no bash or no benchmarks/profile_kernels.sh in this checkout")
    assert subprocess.run([bash, "-n", str(script)]).returncode == 0
    r = subprocess.run([bash, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "DK_VENV": str(tmp_path / "no-venv")})
    assert r.returncode == 1 and "no venv at" in r.stderr
    known = set(re.findall(r"\[(\w+)\]=", script.read_text()))
    spec = importlib.util.spec_from_file_location("profile_driver", driver)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert known and known == set(mod.CASES)
    assert mod.main(["no-such-case"]) == 2


def test_issue_shapes_script_finds_its_cases():
    """benchmarks/issue_shapes_cpu.py runs named cases of the full suite on the CPU: a renamed case fails
    here, not in a long run."""
    import importlib.util
    from pathlib import Path

    from distkern.bench import cases as bench_cases

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "issue_shapes_cpu.py"
    spec = importlib.util.spec_from_file_location("issue_shapes_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = {c.name for c in bench_cases.all_cases()}
    assert set(mod.NAMES) <= names, set(mod.NAMES) - names


def test_variant_cases_exist_and_restore_the_switches():
    """The matmul-mode, 8x8-tile and fused-attention variants are built from cases that exist, and each
    variant's switch is on inside the call and back to what it was after it."""
    from distkern import _C
    from distkern.bench import cases

    names = {c.name for c in cases.all_cases()}
    assert {f"{n} fused" for n in cases._FUSED_VARIANTS} <= names
    assert {f"{n} tiles128" for n in cases._TILE_VARIANTS} <= names
    assert {f"{n} {m}" for n, ms in cases._MODE_VARIANTS.items() for m in ms} <= names
    before = _C.fused_attention()
    seen = []
    cases._under_fused(lambda i: seen.append(_C.fused_attention()))({})
    assert seen == [True] and _C.fused_attention() == before
    if hasattr(_C, "cuda_tile_config"):  # CUDA builds
        before = _C.cuda_tile_config()
        cases._under_tiles(lambda i: seen.append(_C.cuda_tile_config()), 2)({})
        assert seen[-1] == 2 and _C.cuda_tile_config() == before
    with pytest.raises(LookupError, match="fused-attention"):
        cases._named([], ("prompt_align/none",), "fused-attention")
