"""Build a plugin's own C++ / CUDA torch ops against distkern.

A plugin with kernels builds them in its ``setup.py`` the way distkern builds its own::

    from setuptools import setup
    from distkern.cpp_extension import DistkernExtension, build_ext

    setup(ext_modules=[DistkernExtension("my_plugin._C", ["csrc/my_op.cpp", "csrc/my_op_cpu.cpp",
                                                          "csrc/my_op_cuda.cpp", "csrc/my_op_kernel.cu"],
                                         include_dirs=["csrc"])],
          cmdclass={"build_ext": build_ext})

and loads them at import with :func:`load_extension`, which first checks (:func:`check_built_against`)
that the build matches the torch and distkern it now runs with.

What :func:`DistkernExtension` applies (the same rules as distkern's own ``setup.py``):

* the CPU sources are always built (C++, OpenMP, ``-O3``, no debug information unless
  ``DISTKERN_DEBUG_INFO=1``: :func:`cxx_flags`); the CUDA sources — ``*.cu`` and
  ``*_cuda.cpp`` — only when CUDA is wanted: ``DISTKERN_CUDA=1`` (build them or fail with a clear
  message), ``DISTKERN_CUDA=0`` (never), unset: when torch is a CUDA build *and* nvcc is found;
* ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX`` when no GPU is visible (torch's own detection
  raises without one);
* ``CUDA_HOME`` is found from a directory that really holds the CUDA headers (``nvcc`` on ``PATH``
  may be a wrapper script, which makes torch guess a wrong ``CUDA_HOME``);
* distkern's shared headers (``csrc/common``: ``macros.h`` with ``DK_HD`` / ``DType``, ``check.h``,
  ``cuda_types.cuh``, ``tile_gemm.cuh``) are on the include path: ``#include "common/macros.h"``;
* ``DISTKERN_WITH_CUDA=1`` is defined when the CUDA sources are built;
* ``build_ext`` writes ``_build_info.py`` next to the compiled module: the torch, CUDA, distkern
  and plugin-API versions it was built against, read back by :func:`check_built_against`.

This module is importable on its own (by path, without importing the ``distkern`` package and its
compiled module) so that a ``setup.py`` can use its build helpers before distkern is built.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["DEFAULT_CUDA_ARCHS", "CUDA_ENV", "HEADERS", "include_dirs", "find_cuda_home", "find_nvcc",
           "cuda_wanted", "cuda_archs", "is_cuda_source", "DistkernExtension", "build_ext", "build_info",
           "write_build_info", "check_built_against", "load_extension", "nvcc_compile_check"]

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
"""The archs built when ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible: sm_80 and sm_90 code, and
compute_90 PTX that the driver compiles for newer GPUs (sm_100, sm_120), which would otherwise refuse every
launch with "no kernel image"."""
CUDA_ENV = "DISTKERN_CUDA"
"""``DISTKERN_CUDA=1`` forces the CUDA sources, ``0`` leaves them out; unset: built when possible."""
HEADERS = ("common/macros.h", "common/check.h", "common/cuda_types.cuh", "common/matmul_mode.h", "common/tile_gemm.cuh")
"""The public headers, relative to :func:`include_dirs`. ``macros.h`` and ``cuda_types.cuh`` include no
torch header (usable in pure-CUDA ``.cu`` files); ``check.h`` is torch-side only."""

_HERE = Path(__file__).resolve().parent
_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


# ---------------------------------------------------------------------------------------------
# Versions (read without importing the distkern package, so that setup.py can load this by path)
# ---------------------------------------------------------------------------------------------


def _distkern_version() -> str:
    text = (_HERE / "_version.py").read_text()
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if m is None:  # pragma: no cover
        raise RuntimeError(f"cannot read distkern's version from {_HERE / '_version.py'}")
    return m.group(1)


def _api_version() -> int:
    if __package__ == "distkern" or "distkern.methods" in sys.modules:
        return importlib.import_module("distkern.methods").API_VERSION
    m = re.search(r"^API_VERSION\s*=\s*(\d+)", (_HERE / "methods.py").read_text(), flags=re.M)
    if m is None:  # pragma: no cover
        raise RuntimeError(f"cannot read distkern's plugin API version from {_HERE / 'methods.py'}")
    return int(m.group(1))


def _base(version: str) -> str:
    return str(version).split("+")[0]


def _major_minor(version: str) -> str:
    return ".".join(_base(version).split(".")[:2])


# ---------------------------------------------------------------------------------------------
# Headers, CUDA toolkit, selection
# ---------------------------------------------------------------------------------------------


def include_dirs() -> list[str]:
    """The include directory of distkern's shared headers (``#include "common/macros.h"``).

    From a source checkout: ``<repo>/csrc``. From an installed distkern: ``distkern/include``, where its
    ``setup.py`` copies ``csrc/common/*.h`` / ``*.cuh`` at build time. Only ``common/`` is public.
    """
    src = _HERE.parent.parent / "csrc"  # python/distkern/ -> csrc/ of a source checkout
    if (src / "distkern.cpp").is_file() and (src / "common" / "macros.h").is_file():
        return [str(src)]
    if (_HERE / "include" / "common" / "macros.h").is_file():
        return [str(_HERE / "include")]
    raise FileNotFoundError(
        f"distkern's shared headers were not found (looked for common/macros.h under {_HERE / 'include'} and "
        f"{_HERE.parent.parent / 'csrc'}); this distkern was installed without them: reinstall it from a "
        "version that ships its headers (pip install --no-build-isolation --force-reinstall --no-deps distkern)")


_include_dirs = include_dirs  # for the functions below whose include_dirs argument shadows it


def find_cuda_home(set_env: bool = True) -> str | None:
    """The CUDA toolkit directory: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the first of (the toolkit of
    the ``nvcc`` on ``PATH``, following symlinks; ``/usr/local/cuda``; ``/usr/local/cuda-*``, newest first)
    that has both ``include/cuda_runtime_api.h`` and ``bin/nvcc``. With ``set_env`` a found directory is
    put in ``CUDA_HOME`` (torch reads it when ``torch.utils.cpp_extension`` is first imported)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            if set_env:
                os.environ["CUDA_HOME"] = home
            return home
    return None


def find_nvcc() -> str | None:
    """Path of ``nvcc`` (from :func:`find_cuda_home`, else ``PATH``), or None."""
    home = find_cuda_home(set_env=False)
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_wanted(flag: str | None = None, *, what: str = "the CUDA kernels") -> bool:
    """Whether to build the CUDA sources: ``flag`` (default: the ``DISTKERN_CUDA`` environment variable)
    ``1`` forces them (``SystemExit`` with the reason when torch is CPU-only or nvcc is missing), ``0``
    leaves them out; unset: when torch is a CUDA build and nvcc is found."""
    import torch

    flag = (os.environ.get(CUDA_ENV, "") if flag is None else str(flag)).strip().lower()
    home = find_cuda_home()
    has_torch_cuda = torch.version.cuda is not None
    has_nvcc = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if flag in _FALSE:
        return False
    if flag in _TRUE:
        if not has_torch_cuda:
            raise SystemExit(
                f"{CUDA_ENV}=1 but the installed torch ({torch.__version__}) is a CPU-only build: it has no "
                f"CUDA runtime to link {what} against. Install a CUDA build of torch, or use {CUDA_ENV}=0. "
                "(The pure-CUDA .cu files still compile standalone: distkern.cpp_extension.nvcc_compile_check.)")
        if not has_nvcc:
            raise SystemExit(f"{CUDA_ENV}=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit.")
        return True
    return has_torch_cuda and has_nvcc  # unset (or another value, as in distkern's setup.py): when possible


def cuda_archs(with_cuda: bool) -> str:
    """The arch list a CUDA build targets: ``TORCH_CUDA_ARCH_LIST`` if set; else ``8.0;9.0+PTX`` when no GPU is
    visible (and then also put in ``TORCH_CUDA_ARCH_LIST``, since torch's detection raises without a GPU);
    else ``"native"`` (torch builds for the visible GPUs). ``""`` for a CPU-only build."""
    if not with_cuda:
        return ""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "native")


def is_cuda_source(path: str) -> bool:
    """``*.cu`` / ``*.cuh`` and ``*_cuda.cpp`` files are built only with CUDA (the naming of distkern's sources)."""
    return path.endswith((".cu", ".cuh")) or path.endswith("_cuda.cpp")


# ---------------------------------------------------------------------------------------------
# The extension and build_ext
# ---------------------------------------------------------------------------------------------


def _torch_cpp_extension():
    """``torch.utils.cpp_extension``, imported after CUDA_HOME is settled (torch reads it at import)."""
    home = find_cuda_home()
    already = "torch.utils.cpp_extension" in sys.modules
    import torch.utils.cpp_extension as tce

    if already and home and tce.CUDA_HOME != home and not os.path.exists(
            os.path.join(str(tce.CUDA_HOME), "include", "cuda_runtime_api.h")):
        tce.CUDA_HOME = home  # imported earlier with a CUDA_HOME that has no headers (see find_cuda_home)
    return tce


def cxx_flags() -> list[str]:
    """The C++ flags of distkern's builds and of :func:`DistkernExtension`: ``-O3 -fopenmp``, and ``-g0``
    unless ``DISTKERN_DEBUG_INFO=1``. Python's own CFLAGS (pyenv, distro builds) often carry ``-g``, which
    torch's headers make expensive: debug information cost ~40 % of each unit's compile time on 2 cores
    (distkern's mahalanobis_cpu.cpp 25.5 s → 15.5 s; the whole build 4 min 52 s → 2 min 32 s, the wheel
    14.3 MB → 0.8 MB). Symbols stay."""
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("DISTKERN_DEBUG_INFO", "0") != "1":
        flags.append("-g0")
    return flags


def DistkernExtension(name: str, sources: Sequence[str], *, include_dirs: Iterable[str] = (),  # noqa: N802
                      define_macros: Iterable[tuple[str, str | None]] = (),
                      extra_compile_args: dict[str, list[str]] | None = None,
                      extra_link_args: Iterable[str] = (), with_cuda: bool | None = None,
                      build_info: bool = True, **kwargs: Any):
    """A ``setuptools.Extension`` building ``sources`` against torch and distkern's headers.

    ``name``: the dotted module, e.g. ``"my_plugin._C"``. ``sources``: paths relative to ``setup.py``;
    CUDA-only files (:func:`is_cuda_source`) are dropped from a CPU build. ``with_cuda``: None applies
    :func:`cuda_wanted` (``DISTKERN_CUDA``), True / False force it. ``include_dirs`` come before
    distkern's (:func:`include_dirs`). ``extra_compile_args``: ``{"cxx": [...], "nvcc": [...]}`` added to
    the defaults (:func:`cxx_flags`; ``-O3 -lineinfo --expt-relaxed-constexpr``). ``build_info``: have
    :data:`build_ext` write ``_build_info.py`` next to the module. Other keyword arguments go to torch's
    ``CppExtension`` / ``CUDAExtension``.
    """
    tce = _torch_cpp_extension()
    if with_cuda is None:
        with_cuda = cuda_wanted(what=name)
    archs = cuda_archs(bool(with_cuda))
    sources = [os.fspath(s) for s in sources]
    cpu = [s for s in sources if not is_cuda_source(s)]
    if not cpu:
        raise ValueError(f"DistkernExtension({name!r}): no CPU source among {sources}: the CPU build is always "
                         "made (a CPU kernel, or at least the file with TORCH_LIBRARY)")
    extra = dict(extra_compile_args or {})
    args = {"cxx": [*cxx_flags(), *extra.pop("cxx", [])]}
    macros = list(define_macros)
    if with_cuda:
        args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *extra.pop("nvcc", [])]
        macros.append(("DISTKERN_WITH_CUDA", "1"))
    if extra:
        raise ValueError(f"DistkernExtension: extra_compile_args keys must be 'cxx' / 'nvcc'; got {sorted(extra)}")
    make = tce.CUDAExtension if with_cuda else tce.CppExtension
    ext = make(name, sources if with_cuda else cpu, include_dirs=[*include_dirs, *_include_dirs()],
               define_macros=macros, extra_compile_args=args, extra_link_args=["-fopenmp", *extra_link_args],
               **kwargs)
    ext._distkern = {"with_cuda": bool(with_cuda), "archs": archs, "build_info": bool(build_info)}
    return ext


def build_info(with_cuda: bool, archs: str = "", package: str | None = None) -> dict[str, Any]:
    """The facts a build records: torch / CUDA / distkern / plugin-API versions it was built against."""
    import torch

    return {
        "PACKAGE": package,
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda if with_cuda else None,
        "WITH_CUDA": bool(with_cuda),
        "CUDA_ARCHS": archs if with_cuda else "",
        "DISTKERN_VERSION": _distkern_version(),
        "DISTKERN_API": _api_version(),
    }


def write_build_info(path: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Write ``info`` (see :func:`build_info`) as a Python module of constants."""
    lines = ["# written by distkern.cpp_extension at build time; read by check_built_against at import\n"]
    lines += [f"{k} = {v!r}\n" for k, v in info.items()]
    Path(path).write_text("".join(lines))


class _LazyBuildExt:
    cls = None


def _make_build_ext():
    if _LazyBuildExt.cls is not None:
        return _LazyBuildExt.cls
    tce = _torch_cpp_extension()

    class build_ext(tce.BuildExtension):  # noqa: N801 - the setuptools command name
        """torch's ``BuildExtension`` (ninja when available) that also writes each
        :func:`DistkernExtension`'s ``_build_info.py`` next to its compiled module (in the build tree,
        and in the source package for in-place and editable builds)."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            if kwargs["use_ninja"] and shutil.which("ninja") is None:
                # the ninja pip package installs next to the interpreter, which is not on PATH when a venv's
                # python is run without activating it (as the Makefile does); without it the build is serial
                here = os.path.dirname(sys.executable)
                if shutil.which("ninja", path=here):
                    os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
            super().__init__(*args, **kwargs)

        def run(self):
            super().run()
            for ext in self.extensions:
                meta = getattr(ext, "_distkern", None)
                if not meta or not meta["build_info"]:
                    continue
                package = ext.name.rpartition(".")[0]
                info = build_info(meta["with_cuda"], meta["archs"], package or None)
                targets = {os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))}
                if package and (getattr(self, "inplace", False) or getattr(self, "editable_mode", False)):
                    build_py = self.get_finalized_command("build_py")
                    targets.add(os.path.abspath(build_py.get_package_dir(package)))
                for d in targets:
                    os.makedirs(d, exist_ok=True)
                    write_build_info(os.path.join(d, "_build_info.py"), info)

        def get_outputs(self):
            outs = list(super().get_outputs())
            for ext in self.extensions:
                if getattr(ext, "_distkern", {}).get("build_info"):
                    outs.append(os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py"))
            return outs

    _LazyBuildExt.cls = build_ext
    return build_ext


def __getattr__(name: str):  # PEP 562: build_ext is made on first use (it imports setuptools and torch's builder)
    if name == "build_ext":
        return _make_build_ext()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# At import: the compatibility check and the loader
# ---------------------------------------------------------------------------------------------


def _rebuild_hint(package: str) -> str:
    return ("Rebuild it against the torch and distkern you run with, in this environment:\n"
            f"    pip install --no-build-isolation --no-deps --force-reinstall {package}\n"
            "(from the plugin's source folder: `pip install --no-build-isolation --no-deps --force-reinstall .`).")


def check_built_against(info: Any, package: str | None = None) -> None:
    """Raise ``ImportError`` when the build described by ``info`` (a plugin's ``_build_info`` module, or a
    dict with the keys of :func:`build_info`) cannot run with the torch and distkern installed now.

    Rules: the same torch release (``major.minor.patch``; a C++ extension is tied to the torch it was built
    with); CUDA kernels built for the CUDA of the torch installed; the same distkern ``major.minor``
    (the shared headers are compiled in) and the same plugin API version. A patch release of distkern needs
    no rebuild.
    """
    import torch

    def get(key):
        return info.get(key) if isinstance(info, Mapping) else getattr(info, key, None)

    name = package or get("PACKAGE") or "this plugin"
    built_torch = get("TORCH_VERSION")
    if built_torch is None:
        raise ImportError(f"{name}: its build info has no TORCH_VERSION: it was not built with "
                          "distkern.cpp_extension.build_ext.\n" + _rebuild_hint(name))
    problems = []
    if _base(built_torch) != _base(torch.__version__):
        problems.append(f"it was built against torch {built_torch} but torch {torch.__version__} is installed "
                        "(a C++ extension is tied to the torch it was built with)")
    if get("WITH_CUDA") and torch.version.cuda != get("TORCH_CUDA_VERSION"):
        now = torch.version.cuda or "none (a CPU-only torch)"
        problems.append(f"its CUDA kernels were built for CUDA {get('TORCH_CUDA_VERSION')} but the installed "
                        f"torch uses CUDA {now}")
    built_dk, now_dk = get("DISTKERN_VERSION"), _distkern_version()
    if built_dk is None or _major_minor(built_dk) != _major_minor(now_dk):
        problems.append(f"it was built against distkern {built_dk} but distkern {now_dk} is installed (the "
                        "major.minor versions must match: distkern's headers are compiled in)")
    built_api, now_api = get("DISTKERN_API"), _api_version()
    if built_api != now_api:
        problems.append(f"it was built for distkern plugin API {built_api} but this distkern provides "
                        f"plugin API {now_api}")
    if problems:
        raise ImportError(f"{name} cannot be loaded: " + "; ".join(problems) + ".\n" + _rebuild_hint(name))


def load_extension(package: str, module: str = "_C", *, distribution: str | None = None):
    """Import ``<package>._build_info``, :func:`check_built_against` it, then import and return
    ``<package>.<module>`` (whose static initialisers register the plugin's torch ops). Every failure is
    an ``ImportError`` that says how to rebuild. ``distribution``: the pip name, for the message."""
    name = distribution or package
    try:
        info = importlib.import_module(f"{package}._build_info")
    except ImportError as e:
        raise ImportError(f"{name}: its compiled extension was not built (no {package}._build_info module).\n"
                          + _rebuild_hint(name)) from e
    check_built_against(info, package=name)
    try:
        return importlib.import_module(f"{package}.{module}")
    except (ImportError, OSError) as e:
        raise ImportError(f"{name}: its compiled module {package}.{module} failed to load: {e}\n"
                          + _rebuild_hint(name)) from e


# ---------------------------------------------------------------------------------------------
# The standalone CUDA compile check (no torch: the pure-CUDA rule makes it possible)
# ---------------------------------------------------------------------------------------------


def _gencode(archs: str | Sequence[str]) -> list[str]:
    items = archs.replace(",", ";").replace(" ", ";").split(";") if isinstance(archs, str) else list(archs)
    flags = []
    for a in (x.strip() for x in items):
        if not a:
            continue
        a = a.replace("+PTX", "").replace("sm_", "").replace(".", "")
        if not a.isdigit():
            raise ValueError(f"nvcc_compile_check: arch {a!r} is not like '8.0', '80' or 'sm_80'")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if not flags:
        raise ValueError("nvcc_compile_check: no arch given")
    return flags


def nvcc_compile_check(sources: Sequence[str | os.PathLike], *, include_dirs: Iterable[str] = (),
                       archs: str | Sequence[str] = DEFAULT_CUDA_ARCHS, flags: Iterable[str] = (),
                       nvcc: str | None = None) -> list[str]:
    """Compile each pure-CUDA ``.cu`` file with nvcc alone (no torch), as distkern's ``CMakeLists.txt`` does
    for its own kernels, and return the command lines run. ``include_dirs`` come before distkern's.
    ``FileNotFoundError`` without nvcc; ``RuntimeError`` with nvcc's output when a file does not compile
    (a torch header included from a ``.cu`` file fails here: torch's headers are not on the path)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc_compile_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    incs = [*include_dirs, *_include_dirs()]
    ran = []
    with tempfile.TemporaryDirectory(prefix="dk-nvcc-") as tmp:
        for i, src in enumerate(sources):
            cmd = [nvcc, "-c", os.fspath(src), "-o", os.path.join(tmp, f"{i}.o"), "-std=c++17", "-O3",
                   "--expt-relaxed-constexpr", "-Werror=all-warnings", *_gencode(archs),
                   *(f"-I{d}" for d in incs), *flags]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src} (exit {r.returncode}):\n{' '.join(cmd)}\n"
                                   f"{(r.stdout + r.stderr)[-6000:]}")
            ran.append(" ".join(cmd))
    return ran
