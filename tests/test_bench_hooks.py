"""Plugins add cases to ``distkern bench`` through the entry-point group ``distkern.benchmarks``; they are
measured and reported like distkern's own, and a broken hook is reported without stopping the run.

The plugin here is a real distribution on ``sys.path`` (a ``.dist-info`` with ``entry_points.txt``, what
pip writes), so the hooks are found through ``importlib.metadata`` like an installed plugin's.
"""
import importlib
import importlib.metadata
import json
import sys
import textwrap

import pytest

from distkern import bench
from distkern.bench import cases as bench_cases
from distkern.bench import hooks

_MODULE = '''
import torch
from distkern.bench.cases import Case


def _setup(device, dtype, *, seed=0):
    g = torch.Generator(device=device).manual_seed(seed + 11)
    return {"x": torch.randn(300, 40, generator=g, device=device, dtype=dtype)}


def cases():
    return [Case(op="toy_rowsum", label="N=300 D=40 fp32", params={"N": 300, "D": 40}, dtype=torch.float32,
                 setup=_setup, ours=lambda i: i["x"].sum(1), baselines={"eager": lambda i: i["x"].double().sum(1)},
                 bytes=300 * 40 * 4 + 300 * 4, flops=300 * 40, devices=("cpu", "cuda"), quick=True)]


def explodes():
    raise RuntimeError("hook exploded")


def not_a_list():
    return 42


def tpu_case():
    (c,) = cases()
    c.devices = ("tpu",)
    return [c]
'''

_ENTRY_POINTS = '''
[distkern.benchmarks]
toy = toy_bench_plugin:cases
toy-explodes = toy_bench_plugin:explodes
toy-missing = toy_bench_plugin_not_there:cases
toy-not-a-list = toy_bench_plugin:not_a_list
toy-tpu = toy_bench_plugin:tpu_case
'''


@pytest.fixture
def toy_plugin(tmp_path):
    site = tmp_path / "site"
    info = site / "toy_bench_plugin-0.3.dist-info"
    info.mkdir(parents=True)
    (site / "toy_bench_plugin.py").write_text(textwrap.dedent(_MODULE))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-bench-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(_ENTRY_POINTS)
    sys.path.insert(0, str(site))
    hooks.refresh()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("toy_bench_plugin", None)
        hooks.refresh()


def _by_name(report):
    return {h["name"]: h for h in report if h["package"] == "toy-bench-plugin"}


def test_hooks_are_found_and_broken_ones_kept_with_their_error(toy_plugin):
    rows = _by_name(hooks.hook_report())
    assert rows["toy"]["status"] == "ok" and rows["toy"]["cases"] == 1 and rows["toy"]["version"] == "0.3"
    assert rows["toy-explodes"]["status"] == "broken" and "RuntimeError: hook exploded" in rows["toy-explodes"]["error"]
    assert "ModuleNotFoundError" in rows["toy-missing"]["error"]
    assert "must return a list" in rows["toy-not-a-list"]["error"]
    assert "unknown device kind" in rows["toy-tpu"]["error"]
    everything = bench_cases.all_cases()
    (case,) = [c for c in everything if c.op == "toy_rowsum"]
    assert case.origin == "toy-bench-plugin"
    assert all(c.origin == "distkern" for c in everything if c.op == "mahalanobis")


def test_bench_measures_plugin_cases_like_ours(toy_plugin, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--ops", "toy_rowsum", "--repeats", "3", "--quiet", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err  # broken hooks are reported, they do not fail the run
    res = json.loads(out.read_text())
    (case,) = res["cases"]
    assert case["name"] == "toy_rowsum/N=300 D=40 fp32" and case["origin"] == "toy-bench-plugin"
    assert case["status"] == "ok" and case["rel_err"] < 1e-4 and case["primary_baseline"] == "eager"
    for impl in ("ours", "eager"):
        assert case["impls"][impl]["median_s"] > 0 and case["impls"][impl]["repeats"] == 3
    assert case["impls"]["eager"]["ratio"] > 0 and case["floor_s"] > 0
    rows = _by_name(res["benchmark_hooks"])
    assert rows["toy"]["status"] == "ok" and rows["toy-explodes"]["status"] == "broken"
    assert "toy_rowsum/N=300 D=40 fp32" in captured.out  # the same table
    assert "broken benchmark hook toy-explodes" in captured.out  # under the table
    assert "warning: broken benchmark hook toy-explodes" in captured.err


def test_bench_list_shows_origin_and_broken_hooks(toy_plugin, capsys):
    assert bench.main(["--list", "--quick", "--ops", "toy_rowsum"]) == 0
    out = capsys.readouterr().out
    assert "toy_rowsum/N=300 D=40 fp32" in out and "(from toy-bench-plugin)" in out
    assert "broken benchmark hook toy-missing" in out


def test_a_wrong_plugin_result_fails_like_ours(toy_plugin, tmp_path, capsys, monkeypatch):
    mod = importlib.import_module("toy_bench_plugin")
    (good,) = mod.cases()
    monkeypatch.setattr(mod, "cases", lambda: [bench_cases.Case(**{**good.__dict__, "ours": lambda i: i["x"].sum(1) + 1})])
    hooks.refresh()
    assert bench.main(["--quick", "--ops", "toy_rowsum", "--repeats", "2", "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_the_example_kernel_plugin_registers_a_case():
    try:
        importlib.metadata.distribution("distkern-example-kernel")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("distkern-example-kernel is not installed (make install installs it)")
    hooks.refresh()
    found = bench_cases.cases_for("cpu", quick=True, ops=["distkern_example_kernel.standardized_sqdist"])
    assert found and all(c.origin == "distkern-example-kernel" for c in found)
    row = next(h for h in hooks.hook_report() if h["package"] == "distkern-example-kernel")
    assert row["status"] == "ok" and row["cases"] >= 1
