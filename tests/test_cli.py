"""The ``distkern`` command line."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import distkern
from distkern import methods
from distkern.cli import main


@pytest.fixture
def plugins(monkeypatch, tmp_path):
    """One in-process method and one broken entry-point plugin; removed afterwards."""
    p = "dkcli" + uuid.uuid4().hex[:8]
    site = tmp_path / "site"
    info = site / f"{p}_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {p}-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[distkern.methods]\n{p}-broken = {p}_mod:Method\n")
    (site / f"{p}_mod.py").write_text("raise ValueError('plugin is broken\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(site))
    methods.refresh()

    class Local:
        kind = "loss"
        distkern_api = methods.API_VERSION

    methods.register(Local, name=f"{p}-local")
    yield p
    methods.unregister(f"{p}-local")
    sys.modules.pop(f"{p}_mod", None)
    methods.refresh()


def test_info(capsys, plugins):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"distkern {distkern.__version__}" in out
    assert "distkern::mahalanobis" in out
    assert "torch_version" in out
    # which CPU product path runs (the README points here for it)
    path = {"avx512": "distkern AVX-512", "avx2": "distkern AVX2", "none": "torch BLAS"}[distkern._C.cpu_gemm_isa()]
    assert f"float32 products: {path}" in out
    if distkern._C.cpu_gemm_isa() == "none" and distkern._C.cpu_math_isa() == "avx2":  # AVX2-only CPU
        assert "distkern AVX2 for PaDiM's triangular products and mmd2's Gram" in out
    lanes = {"avx512": "AVX-512", "avx2": "AVX2", "none": "scalar"}[distkern._C.cpu_math_isa()]
    assert f"exp / sigmoid lanes: {lanes}" in out
    assert f"{plugins}-broken" in out  # the broken plugin is listed, not fatal


def test_info_json(capsys, plugins):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == distkern.__version__
    assert data["build"] == distkern.build_info()
    assert "distkern::mahalanobis" in data["ops"]
    assert data["devices"][0]["type"] == "cpu"
    assert {r["name"] for r in data["plugins"]} >= {f"{plugins}-broken", f"{plugins}-local"}


def test_plugins_table(capsys, plugins):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "ok" in out and "second line" not in out


def test_plugins_names_select_and_unknown_names_are_refused(capsys, plugins):
    assert main(["plugins", "--json", f"{plugins}-local"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [f"{plugins}-local"]
    assert main(["plugins", "no-such-method-xyz"]) == 1
    assert "no distkern method named 'no-such-method-xyz'" in capsys.readouterr().err


def test_plugins_rich_table_on_a_terminal(capsys, monkeypatch, plugins):
    pytest.importorskip("rich")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"{plugins}-broken" in out and f"{plugins}-local" in out


def test_plugins_json(capsys, plugins):
    assert main(["plugins", "--json"]) == 0
    data = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    broken, local = data[f"{plugins}-broken"], data[f"{plugins}-local"]
    assert broken["status"] == "broken" and broken["error"].startswith("ValueError: plugin is broken")
    assert (broken["package"], broken["version"], broken["source"]) == (
        f"{plugins}-broken", "0.1", "entry-point")
    assert (local["status"], local["kind"], local["source"]) == ("ok", "loss", "in-process")
    assert set(local) == {"name", "kind", "package", "version", "status", "error", "target", "source"}


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["plugins", "--bogus"]])
def test_usage_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "plugins" in out and "bench" in out


def test_failure_is_one_line_unless_debug(capsys, monkeypatch):
    def boom() -> list:
        raise RuntimeError("registry exploded")

    monkeypatch.delenv("DISTKERN_DEBUG", raising=False)
    monkeypatch.setattr("distkern.cli._plugin_rows", boom)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "distkern: error: RuntimeError: registry exploded"
    with pytest.raises(RuntimeError):
        main(["--debug", "plugins"])
    monkeypatch.setenv("DISTKERN_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["plugins"])


def test_bench_delegates(capsys, monkeypatch):
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("distkern.bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distkern.bench", fake)
    monkeypatch.setattr(distkern, "bench", fake, raising=False)
    assert main(["bench", "--ops", "mahalanobis", "--help"]) == 0
    assert seen == [["--ops", "mahalanobis", "--help"]]


def test_bench_missing_is_an_error(capsys, monkeypatch):
    # the attribute first: looking it up imports the (lazy) submodule, which must still work then
    monkeypatch.delattr(distkern, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "distkern.bench", None)  # import raises ImportError
    assert main(["bench"]) == 1
    assert "benchmark harness is not available" in capsys.readouterr().err


def test_python_m_distkern(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "distkern", "info"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "distkern::mahalanobis" in out.stdout
