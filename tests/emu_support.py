"""Building distkern's CUDA sources for the CPU emulation (tests/emu): the include paths, and the
sources rewritten by tests/emu/cu2cpp.py. Used by test_tile_emulation and test_kernel_emulation."""
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "emu"
# Set by test_emulation_sanitized.py for its rerun of the emulation under ASan / UBSan.
SANITIZE = os.environ.get("DK_EMU_SANITIZE") == "1"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (host headers only: vector_types.h, cuda_fp16.h), or None."""
    from distkern.cpp_extension import find_cuda_home

    for home in (find_cuda_home(set_env=False), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "vector_types.h").exists():
            return Path(home) / "include"
    return None


def missing() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "needs g++ (C++20)"
    if cuda_include() is None:
        return "needs the CUDA headers (vector_types.h, cuda_fp16.h)"
    return None


def compile_flags(tmp: Path) -> list[str]:
    """Rewrite csrc's .cu / .cuh under tmp/cu and return the g++ flags that build against them."""
    sys.path.insert(0, str(EMU))
    try:
        import cu2cpp
    finally:
        sys.path.pop(0)
    cu2cpp.transform_tree(ROOT / "csrc", tmp / "cu")
    # the example plugin's kernel too (the template plugin authors start from)
    plugin = ROOT / "plugins" / "example_kernel" / "csrc"
    cu2cpp.transform_tree(plugin, tmp / "cu_plugin")
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if SANITIZE else []
    # -O0 under the sanitizers: g++ took 135 s for the Mahalanobis wrapper with ASan + UBSan at -O1 (34 s at
    # -O0, 26 s plain at -O1), and every access stays in the code to be checked
    return ["-std=c++20", "-O0" if SANITIZE else "-O1", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas",
            *san, f"-I{EMU / 'stub'}", f"-I{tmp / 'cu'}", f"-I{tmp / 'cu_plugin'}", f"-I{ROOT / 'csrc'}",
            f"-I{plugin}", f"-I{cuda_include()}"]
