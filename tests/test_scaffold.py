"""distkern new-plugin writes packages that install, register and pass their own tests — every kind, and
one with its own C++/CUDA kernel (really built with distkern.cpp_extension).

The packages are installed with ``pip install -e --no-build-isolation --prefix <tmp>`` (not into the
environment the other tests share) and checked in a fresh interpreter that adds that prefix as a site
directory: the registry finds them through their entry points, ``check_method`` passes, and their
generated tests pass as written.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from distkern.cli import main
from distkern.scaffold import KINDS_SUPPORTED, new_plugin

_DRIVER = r"""
import json, os, site, sys
for d in sys.argv[1].split(os.pathsep):
    site.addsitedir(d)
import distkern, pytest
from distkern.testing import check_method

out = {}
for name in json.loads(sys.argv[2]):
    cls = distkern.methods.get(name)            # through the entry point, like any installed plugin
    out[name] = {"kind": cls.kind, "module": cls.__module__, "passed": check_method(cls)}
print("RESULT " + json.dumps(out))
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[3:]]))
"""


def _site_dirs(prefix: Path) -> str:
    """purelib and platlib of the prefix (they differ where the platform uses lib64), os.pathsep-joined."""
    paths = {sysconfig.get_path(k, vars={"base": str(prefix), "platbase": str(prefix)}) for k in ("purelib", "platlib")}
    return os.pathsep.join(sorted(paths))


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "2")  # (distkern.cpp_extension.build_ext finds the venv's ninja without PATH)
    return env


def _install_and_check(tmp_path: Path, roots: list[Path], names: list[str]) -> dict:
    prefix = tmp_path / "prefix"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-warn-script-location",
           "--prefix", str(prefix)]
    for root in roots:
        cmd += ["-e", str(root)]
    pip = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-5000:]
    r = subprocess.run([sys.executable, "-c", _DRIVER, _site_dirs(prefix), json.dumps(names),
                        *(str(root / "tests") for root in roots)],
                       capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_every_kind_installs_registers_and_passes(tmp_path):
    roots, names = [], []
    for kind in KINDS_SUPPORTED:
        name = f"gen-{kind}-x"
        assert main(["new-plugin", name, "--kind", kind, "-o", str(tmp_path)]) == 0
        roots.append(tmp_path / name)
        names.append(name)
        assert (tmp_path / name / "pyproject.toml").exists() and not (tmp_path / name / "setup.py").exists()
    found = _install_and_check(tmp_path, roots, names)
    for kind, name in zip(KINDS_SUPPORTED, names):
        assert found[name]["kind"] == kind
        assert found[name]["module"] == f"distkern_{name.replace('-', '_')}.method"
        assert "declaration" in found[name]["passed"] and len(found[name]["passed"]) >= 7, found[name]


@pytest.mark.slow
def test_with_kernel_builds_and_passes(tmp_path):
    """A kernel plugin with its op named by --op: renamed everywhere, it builds and passes its tests."""
    name = "gen-kernel-x"
    assert main(["new-plugin", name, "--kind", "detector", "--op", "whitened_norm", "-o", str(tmp_path)]) == 0
    root = tmp_path / name
    ns = "distkern_gen_kernel_x"
    cu = (root / "csrc" / "whitened_norm_kernel.cu").read_text()
    assert "#include <torch" not in cu and "#include <ATen" not in cu and "#include <c10" not in cu  # pure CUDA
    assert f"TORCH_LIBRARY({ns}, m)" in (root / "csrc" / f"{ns}.cpp").read_text()
    assert f"TORCH_LIBRARY_IMPL({ns}, CPU, m)" in (root / "csrc" / "whitened_norm_cpu.cpp").read_text()
    assert f"TORCH_LIBRARY_IMPL({ns}, CUDA, m)" in (root / "csrc" / "whitened_norm_cuda.cpp").read_text()
    assert not [p for p in root.rglob("*") if p.is_file() and "standardized_sqdist" in p.read_text() + p.name]
    assert "distkern.cpp_extension" in (root / "setup.py").read_text()
    found = _install_and_check(tmp_path, [root], [name])
    assert {"higher-is-anomalous", "save-load"} <= set(found[name]["passed"])
    so = list((root / "src" / ns).glob("_C*.so"))
    assert so, "the extension was not built in place by the editable install"
    assert "TORCH_VERSION" in (root / "src" / ns / "_build_info.py").read_text()


def test_every_kind_and_kernel_variant_generates(tmp_path):
    """Fast: every template renders (no unfilled field) and the Python files compile."""
    for kind in KINDS_SUPPORTED:
        for kernel in (False, True):
            root = new_plugin(f"k-{kind}-{int(kernel)}", kind, tmp_path, with_kernel=kernel)
            for path in root.rglob("*.py"):
                compile(path.read_text(), str(path), "exec")
            assert (root / "csrc").exists() == kernel
            text = (root / "pyproject.toml").read_text()
            assert '[project.entry-points."distkern.methods"]' in text and f'k-{kind}-{int(kernel)} = ' in text


def test_op_name_renames_the_example_op(tmp_path):
    """Fast: --op renames the op in every file and file name; bad names are refused; it implies --with-kernel."""
    assert main(["new-plugin", "k-op", "--kind", "loss", "--op", "my_score", "-o", str(tmp_path)]) == 0
    root = tmp_path / "k-op"
    assert (root / "csrc" / "my_score_kernel.cu").exists() and (root / "setup.py").exists()
    for path in root.rglob("*"):
        if path.is_file():
            assert "standardized_sqdist" not in path.read_text() + path.name, path
            if path.suffix == ".py":
                compile(path.read_text(), str(path), "exec")
    assert 'm.def("my_score(' in (root / "csrc" / "distkern_k_op.cpp").read_text()
    assert "torch.ops.distkern_k_op.my_score" in (root / "src" / "distkern_k_op" / "ops.py").read_text()
    for bad in ("MyScore", "2x", "my-score", "class", "x_"):
        with pytest.raises(ValueError, match="--op must be"):
            new_plugin(f"k-bad-{len(bad)}", "detector", tmp_path, op=bad)
    for clash in ("reference", "torch", "sum"):
        with pytest.raises(ValueError, match="would shadow"):
            new_plugin("k-clash", "detector", tmp_path, op=clash)


def test_new_plugin_errors(tmp_path, capsys):
    assert main(["new-plugin", "Bad_Name", "--kind", "detector", "-o", str(tmp_path)]) == 1
    assert "NAME must be" in capsys.readouterr().err
    assert main(["new-plugin", "ok-name", "--kind", "teleporter", "-o", str(tmp_path)]) == 2  # argparse choices
    assert main(["new-plugin", "ok-name", "--kind", "sampler", "-o", str(tmp_path)]) == 0
    assert main(["new-plugin", "ok-name", "--kind", "sampler", "-o", str(tmp_path)]) == 1  # exists
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--kind must be one of"):
        new_plugin("other", "teleporter", tmp_path)


def test_new_plugin_refuses_an_installed_name(tmp_path, monkeypatch):
    """pip install -e of a scaffold named like an installed plugin would replace it: refused up front."""
    import importlib.metadata as md

    from distkern.methods import ENTRY_POINT_GROUP

    real_dist, real_eps = md.distribution, md.entry_points

    def distribution(name):
        if name == "distkern-taken-dist":
            return object()
        return real_dist(name)

    def entry_points(**kw):
        if kw.get("group") == ENTRY_POINT_GROUP:
            return [md.EntryPoint("taken-ep", "somepkg.method:Taken", ENTRY_POINT_GROUP)]
        return real_eps(**kw)

    monkeypatch.setattr(md, "distribution", distribution)
    monkeypatch.setattr(md, "entry_points", entry_points)
    with pytest.raises(ValueError, match="'distkern-taken-dist' is installed already"):
        new_plugin("taken-dist", "detector", tmp_path)
    with pytest.raises(ValueError, match="'taken-ep' is registered already"):
        new_plugin("taken-ep", "detector", tmp_path)
    assert not (tmp_path / "taken-dist").exists() and not (tmp_path / "taken-ep").exists()
