"""The host side of the CUDA build (csrc/*/*_cuda.cpp and distkern.cpp with DISTKERN_WITH_CUDA: the torch
entry points, cuBLAS calls through ATen, launcher calls) compiles, checked with ``g++ -fsyntax-only`` against
the torch headers and the CUDA toolkit's runtime headers on a machine without a CUDA torch.

test_cuda_build.py compiles the .cu kernels with nvcc; without this check the C++ that calls them would be
compiled for the first time on a GPU machine. The CUDA library headers that a CPU torch wheel's
ATen/cuda headers include and a bare toolkit may lack (cuBLAS, cuSPARSE, cuSOLVER handles) come from
tests/cuda_host_stub, searched after every real include directory. Nothing is linked."""
import os
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emu_support import cuda_include

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("csrc/*/*_cuda.cpp")) + [ROOT / "csrc" / "distkern.cpp"]


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()]
    return ["-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-DDISTKERN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
            f"-I{ROOT / 'csrc'}", *inc, f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include()}",
            "-idirafter", str(ROOT / "tests" / "cuda_host_stub")]


@pytest.mark.slow
def test_cuda_host_sources_compile():
    if cuda_include() is None:
        pytest.skip("needs the CUDA toolkit's headers (cuda_runtime_api.h)")
    assert len(SOURCES) >= 7, SOURCES
    flags = _flags()

    def check(src: Path):
        return src, subprocess.run(["g++", *flags, str(src)], capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        failed = [(src, run.stderr[-3000:]) for src, run in pool.map(check, SOURCES) if run.returncode != 0]
    assert not failed, "\n\n".join(f"{src.relative_to(ROOT)}:\n{err}" for src, err in failed)
