"""distkern.cpp_extension — what a plugin's setup.py builds its own ops with — and the in-tree plugin built
that way, plugins/example_kernel (its own tests run as a third party's would)."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import distkern
from distkern import cpp_extension as ce

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "example_kernel"


@pytest.fixture(autouse=True)
def _restore_build_env(monkeypatch):
    """The build helpers set CUDA_HOME / TORCH_CUDA_ARCH_LIST like a setup.py run would; undo it after each test."""
    for key in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "DISTKERN_CUDA"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # ninja
    return env


# ---------------------------------------------------------------------------------------------
# Headers, selection, the extension
# ---------------------------------------------------------------------------------------------


def test_include_dirs_hold_the_shared_headers():
    (inc,) = ce.include_dirs()
    for h in ce.HEADERS:
        assert (Path(inc) / h).is_file(), h
    for h in ("common/macros.h", "common/cuda_types.cuh"):  # usable from pure-CUDA files
        text = (Path(inc) / h).read_text()
        assert "#include <ATen" not in text and "#include <torch" not in text


def test_loads_by_path_without_the_package():
    """A setup.py can load the module by path before distkern is built (no distkern, no torch import)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('dk_ce', {str(Path(ce.__file__))!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.include_dirs()[0], m._distkern_version(), m._api_version(), m.DEFAULT_CUDA_ARCHS)\n"
            "assert 'distkern' not in sys.modules and 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    inc, version, api, archs = r.stdout.split()
    assert inc == ce.include_dirs()[0] and version == distkern.__version__
    assert int(api) == distkern.methods.API_VERSION and archs == "8.0;9.0+PTX"


def test_installed_layout_finds_the_packaged_headers(tmp_path):
    """From a wheel (no csrc/ beside the package) the headers are the copies setup.py ships in
    distkern/include/common."""
    pkg = tmp_path / "site-packages" / "distkern"
    (pkg / "include" / "common").mkdir(parents=True)
    for name in ("cpp_extension.py", "_version.py", "methods.py"):
        (pkg / name).write_text((Path(ce.__file__).parent / name).read_text())
    spec = importlib.util.spec_from_file_location("dk_ce_installed", pkg / "cpp_extension.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    with pytest.raises(FileNotFoundError, match="headers were not found"):
        m.include_dirs()
    for h in ce.HEADERS:
        (pkg / "include" / h).write_text((ROOT / "csrc" / h).read_text())
    assert m.include_dirs() == [str(pkg / "include")]
    # the wheel ships them as package data (the sdist's csrc/: tests/test_build.py builds one)
    assert '"include/**/*.h", "include/**/*.cuh"' in (ROOT / "setup.py").read_text()


def test_same_rules_as_our_setup_py():
    """setup.py keeps its own copy of the selection (it is built before distkern exists); the two agree."""
    text = (ROOT / "setup.py").read_text()
    assert f'"{ce.DEFAULT_CUDA_ARCHS}"' in text and ce.CUDA_ENV in text and "TORCH_CUDA_ARCH_LIST" in text


def test_cuda_wanted(monkeypatch):
    monkeypatch.setenv("DISTKERN_CUDA", "0")
    assert ce.cuda_wanted() is False
    auto = torch.version.cuda is not None and ce.find_nvcc() is not None
    monkeypatch.setenv("DISTKERN_CUDA", "perhaps")  # as setup.py: anything but 0/1 means "when possible"
    assert ce.cuda_wanted() is auto
    monkeypatch.delenv("DISTKERN_CUDA")
    assert ce.cuda_wanted() is auto
    if torch.version.cuda is None:
        with pytest.raises(SystemExit, match="CPU-only build"):
            ce.cuda_wanted("1")


def test_cuda_archs_default(monkeypatch):
    assert ce.cuda_archs(False) == ""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert ce.cuda_archs(True) == "7.5"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert ce.cuda_archs(True) == "8.0;9.0+PTX" and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"


def test_extension_cpu_build_drops_the_cuda_sources():
    srcs = ["csrc/op.cpp", "csrc/op_cpu.cpp", "csrc/op_cuda.cpp", "csrc/op_kernel.cu"]
    ext = ce.DistkernExtension("pkg._C", srcs, include_dirs=["csrc"], with_cuda=False)
    assert ext.sources == ["csrc/op.cpp", "csrc/op_cpu.cpp"]
    assert ext.include_dirs[0] == "csrc" and ce.include_dirs()[0] in ext.include_dirs
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and "nvcc" not in ext.extra_compile_args
    assert ("DISTKERN_WITH_CUDA", "1") not in ext.define_macros
    assert ext._distkern == {"with_cuda": False, "archs": "", "build_info": True}
    with pytest.raises(ValueError, match="no CPU source"):
        ce.DistkernExtension("pkg._C", ["csrc/op_kernel.cu"], with_cuda=False)
    with pytest.raises(ValueError, match="'cxx' / 'nvcc'"):
        ce.DistkernExtension("pkg._C", srcs, with_cuda=False, extra_compile_args={"gcc": []})


def test_extension_cuda_build_keeps_them(monkeypatch):
    if ce.find_cuda_home(set_env=False) is None:
        pytest.skip("no CUDA toolkit")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = ce.DistkernExtension("pkg._C", ["a.cpp", "a_cuda.cpp", "a_kernel.cu"], with_cuda=True)
    assert ext.sources == ["a.cpp", "a_cuda.cpp", "a_kernel.cu"]
    assert "--expt-relaxed-constexpr" in ext.extra_compile_args["nvcc"]
    assert ("DISTKERN_WITH_CUDA", "1") in ext.define_macros and ext._distkern["archs"] == "8.0;9.0"


# ---------------------------------------------------------------------------------------------
# The import-time check
# ---------------------------------------------------------------------------------------------


def test_check_built_against_accepts_this_build_and_patch_releases():
    info = ce.build_info(False, package="pkg")
    ce.check_built_against(info)
    major, minor, _ = distkern.__version__.split(".")
    ce.check_built_against({**info, "DISTKERN_VERSION": f"{major}.{minor}.999"})


@pytest.mark.parametrize("change,message", [
    ({"TORCH_VERSION": "1.0.0"}, r"built against torch 1\.0\.0 but torch .* is installed"),
    ({"WITH_CUDA": True, "TORCH_CUDA_VERSION": "9.9"}, r"CUDA kernels were built for CUDA 9\.9"),
    ({"DISTKERN_VERSION": "99.0.0"}, r"built against distkern 99\.0\.0 but distkern .* is installed"),
    ({"DISTKERN_API": 99}, r"plugin API 99 but this distkern provides plugin API 1"),
    ({"TORCH_VERSION": None}, r"no TORCH_VERSION"),
])
def test_check_built_against_names_the_mismatch_and_the_fix(change, message):
    info = {**ce.build_info(False), **change}
    with pytest.raises(ImportError, match=message) as e:
        ce.check_built_against(info, package="my-plugin")
    assert "my-plugin" in str(e.value) and "pip install --no-build-isolation" in str(e.value)


def test_write_build_info_round_trip(tmp_path):
    ce.write_build_info(tmp_path / "_build_info.py", ce.build_info(False, package="pkg"))
    spec = importlib.util.spec_from_file_location("bi", tmp_path / "_build_info.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TORCH_VERSION == torch.__version__ and mod.PACKAGE == "pkg"
    ce.check_built_against(mod)


def test_load_extension_without_a_build(tmp_path, monkeypatch):
    (tmp_path / "unbuilt_pkg").mkdir()
    (tmp_path / "unbuilt_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="was not built"):
        ce.load_extension("unbuilt_pkg", distribution="unbuilt-pkg")


def test_nvcc_check_refuses_torch_in_a_cu_file(tmp_path):
    if ce.find_nvcc() is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "bad_kernel.cu"
    bad.write_text('#include <torch/extension.h>\n__global__ void k() {}\n')
    with pytest.raises(RuntimeError, match="nvcc failed on"):
        ce.nvcc_compile_check([bad], archs="8.0")
    with pytest.raises(ValueError, match="arch"):
        ce.nvcc_compile_check([bad], archs="ampere")


# ---------------------------------------------------------------------------------------------
# plugins/example_kernel: built (by the Makefile, or here once), installed, tested like a third party's
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_kernel_site(tmp_path_factory):
    """None when distkern-example-kernel is installed (the Makefile installs every plugin); else it is
    built once, into a temporary prefix, and that prefix's site directory is returned."""
    try:
        importlib.metadata.distribution("distkern-example-kernel")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    prefix = tmp_path_factory.mktemp("example_kernel")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-warn-script-location", "--prefix", str(prefix), str(EXAMPLE)],
                         capture_output=True, text=True, env=_env())
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-5000:]
    return sysconfig.get_path("platlib", vars={"base": str(prefix), "platbase": str(prefix)})


@pytest.mark.slow
def test_example_kernel_plugin_passes_its_tests(example_kernel_site, tmp_path):
    code = ("import json, site, sys\n"
            "if sys.argv[1]: site.addsitedir(sys.argv[1])\n"
            "import distkern, pytest, torch\n"
            "import distkern_example_kernel._build_info as bi\n"
            "from distkern.testing import check_method\n"
            "info = {'passed': check_method(distkern.methods.get('diag-gaussian')),\n"
            "        'op': hasattr(torch.ops.distkern_example_kernel, 'standardized_sqdist'),\n"
            "        'build': {k: getattr(bi, k) for k in ('TORCH_VERSION', 'WITH_CUDA', 'DISTKERN_API')}}\n"
            "print('RESULT ' + json.dumps(info))\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[2]]))\n")
    r = subprocess.run([sys.executable, "-c", code, example_kernel_site or "", str(EXAMPLE / "tests")],
                       capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    info = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert info["op"] and {"higher-is-anomalous", "save-load"} <= set(info["passed"])
    assert info["build"]["TORCH_VERSION"] == torch.__version__ and info["build"]["DISTKERN_API"] == 1


def test_example_kernel_layout_follows_the_rules():
    """The pure-CUDA rule and one namespace per plugin, checked on the sources (no build needed)."""
    csrc = EXAMPLE / "csrc"
    for cu in csrc.glob("*.cu"):
        text = cu.read_text()
        assert not any(f"#include <{p}" in text for p in ("torch", "ATen", "c10")), cu
    assert "TORCH_LIBRARY(distkern_example_kernel, m)" in (csrc / "distkern_example_kernel.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(distkern_example_kernel, CPU, m)" in (csrc / "standardized_sqdist_cpu.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(distkern_example_kernel, CUDA, m)" in (csrc / "standardized_sqdist_cuda.cpp").read_text()
    toml = (EXAMPLE / "pyproject.toml").read_text()
    assert '"distkern.methods"' in toml and '"distkern.benchmarks"' in toml
