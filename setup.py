"""Build distkern._C.

Always builds the CPU kernels (C++, OpenMP, -O3). Builds the CUDA kernels too when the installed
torch is a CUDA build and nvcc is found, or when forced:

    DISTKERN_CUDA=1   build the CUDA kernels or fail with a clear message
    DISTKERN_CUDA=0   CPU kernels only
    TORCH_CUDA_ARCH_LIST   target archs; defaults to "8.0;9.0" when no GPU is visible
    MAX_JOBS          parallel compile jobs (ninja)

torch must already be installed: `pip install --no-build-isolation .`
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "python", "distkern"))
from _version import __version__  # noqa: E402

sys.path.pop(0)



def _find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as /usr/local/bin/nvcc
    on some machines) makes it guess /usr/local, which has no CUDA headers. Prefer a directory that
    has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - build-time message
    raise SystemExit(
        "distkern builds against the torch you will run it with, so torch must be installed first "
        "and the build run without isolation:\n"
        "    pip install torch && pip install --no-build-isolation .\n"
        f"(import failed: {e})"
    )


def _want_cuda() -> bool:
    flag = os.environ.get("DISTKERN_CUDA", "").strip().lower()
    has_torch_cuda = torch.version.cuda is not None
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not has_torch_cuda:
            raise SystemExit(
                "DISTKERN_CUDA=1 but the installed torch "
                f"({torch.__version__}) is a CPU-only build: it has no CUDA runtime to link the "
                "kernels against. Install a CUDA build of torch, or use DISTKERN_CUDA=0. "
                "(The CUDA sources still compile standalone through CMakeLists.txt.)"
            )
        if not has_nvcc:
            raise SystemExit("DISTKERN_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit.")
        return True
    return has_torch_cuda and has_nvcc


def _sources(patterns):
    out = []
    for p in patterns:
        out += sorted(glob.glob(os.path.join("csrc", p), recursive=True))
    return out


with_cuda = _want_cuda()
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # torch's own arch detection raises without a visible GPU (pytorch#137261).
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if with_cuda else ""

cpu_sources = ["csrc/distkern.cpp"] + [
    s for s in _sources(["*/*.cpp"]) if not s.endswith("_cuda.cpp")
]
cuda_sources = _sources(["*/*_kernel.cu", "*/*_cuda.cpp"])

define_macros = [("DISTKERN_VERSION", f'"{__version__}"'), ("DISTKERN_ARCHS", f'"{archs}"')]
# the C++ standard is left to torch (C++17 up to 2.13, C++20 from 2.14)
cxx_flags = ["-O3", "-fopenmp"]
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
    package_data={"distkern": ["include/**/*.h"]},
)
