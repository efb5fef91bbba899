"""Build distkern._C.

Always builds the CPU kernels (C++, OpenMP, -O3). Builds the CUDA kernels too when the installed
torch is a CUDA build and nvcc is found, or when forced:

    DISTKERN_CUDA=1   build the CUDA kernels or fail with a clear message
    DISTKERN_CUDA=0   CPU kernels only
    DISTKERN_DEBUG_INFO=1   keep -g (debug information; off by default: it costs ~40 % of the build)
    TORCH_CUDA_ARCH_LIST   target archs; defaults to "8.0;9.0+PTX" when no GPU is visible
    MAX_JOBS          parallel compile jobs (ninja)

torch must already be installed: `pip install --no-build-isolation .`
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "python", "distkern"))
from _version import __version__  # noqa: E402

sys.path.pop(0)



def _load_build_helpers():
    """distkern/cpp_extension.py by path (it needs neither distkern nor torch at import): the CPU/CUDA
    selection, CUDA_HOME discovery and arch defaults shared with plugins that build against distkern."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_distkern_cpp_extension",
                                                  os.path.join(ROOT, "python", "distkern", "cpp_extension.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_build = _load_build_helpers()
# torch guesses CUDA_HOME from the nvcc on PATH when torch.utils.cpp_extension is first imported; a
# wrapper script there (/usr/local/bin/nvcc on some machines) makes it guess a directory without headers.
_build.find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - build-time message
    raise SystemExit(
        "distkern builds against the torch you will run it with, so torch must be installed first "
        "and the build run without isolation:\n"
        "    pip install torch && pip install --no-build-isolation .\n"
        f"(import failed: {e})"
    )


def _sources(patterns):
    out = []
    for p in patterns:
        out += sorted(glob.glob(os.path.join("csrc", p), recursive=True))
    return out


with_cuda = _build.cuda_wanted()
# torch's own arch detection raises without a visible GPU (pytorch#137261): 8.0;9.0+PTX then
archs = _build.cuda_archs(with_cuda)

cpu_sources = ["csrc/distkern.cpp"] + [
    s for s in _sources(["*/*.cpp"]) if not s.endswith("_cuda.cpp")
]
cuda_sources = _sources(["*/*_kernel.cu", "*/*_cuda.cpp"])

define_macros = [("DISTKERN_VERSION", f'"{__version__}"'), ("DISTKERN_ARCHS", f'"{archs}"')]
# the C++ standard is left to torch (C++17 up to 2.13, C++20 from 2.14); -O3 -fopenmp -g0 (cpp_extension.cxx_flags)
cxx_flags = _build.cxx_flags()
if with_cuda:
    define_macros.append(("DISTKERN_WITH_CUDA", "1"))
nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]

# Build facts the Python side reads before it loads the compiled module, so a mismatch between the
# torch it was built against and the torch it runs with gives a clear message instead of a linker trace.
with open(os.path.join(ROOT, "python", "distkern", "_build_info.py"), "w") as f:
    f.write(
        "# written by setup.py at build time\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )

# Ship the shared headers of csrc/common as package data (distkern/include/common/*.h, *.cuh) so that
# plugins build their own ops against them from an installed distkern (distkern.cpp_extension.include_dirs()).
_headers = os.path.join(ROOT, "python", "distkern", "include", "common")
# The folder is a build copy (git-ignored): it is emptied first, as is its copy in setuptools' build/lib of
# an in-tree build, so a header removed from csrc/common is not shipped from an earlier build of the checkout.
for _old in [_headers, *glob.glob(os.path.join(ROOT, "build", "lib*", "distkern", "include", "common"))]:
    shutil.rmtree(_old, ignore_errors=True)
os.makedirs(_headers, exist_ok=True)
for _pattern in ("*.h", "*.cuh", "*.inc"):
    for _h in sorted(glob.glob(os.path.join(ROOT, "csrc", "common", _pattern))):
        shutil.copyfile(_h, os.path.join(_headers, os.path.basename(_h)))

include_dirs = [os.path.join(ROOT, "csrc")]
if with_cuda:
    ext = CUDAExtension(
        "distkern._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "distkern._C",
        cpu_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    version=__version__,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_data={"distkern": ["include/**/*.h", "include/**/*.cuh", "include/**/*.inc"]},
)
