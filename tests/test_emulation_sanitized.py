"""The CPU emulation of the CUDA kernels (test_kernel_emulation.py, test_tile_emulation.py) once more, built
with AddressSanitizer and UndefinedBehaviorSanitizer: an out-of-bounds read or write of global or shared
memory (shared arrays are statics in the emulation, with redzones), a misaligned 128-bit access, an integer
overflow or a bad shift in a kernel aborts the run — what compute-sanitizer's memcheck reports on a GPU,
checked here on every CI run. The emulated tests run in a subprocess that preloads the sanitizer
runtimes (they must be loaded before Python's allocator is used)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu_support import missing

ROOT = Path(__file__).resolve().parents[1]


def _runtime(name: str) -> str | None:
    try:
        out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def test_emulated_kernels_under_asan_and_ubsan(tmp_path):
    if missing():
        pytest.skip(missing())
    libs = [_runtime("libasan.so"), _runtime("libubsan.so")]
    if not all(libs):
        pytest.skip("g++ has no shared ASan / UBSan runtime")
    env = dict(os.environ, DK_EMU_SANITIZE="1", LD_PRELOAD=" ".join(libs),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env_path] if (env_path := os.environ.get("PYTHONPATH"))
                                          else [str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
           str(ROOT / "tests" / "test_tile_emulation.py"), str(ROOT / "tests" / "test_kernel_emulation.py")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (run.stdout[-6000:] + "\n" + run.stderr[-6000:])
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "failed" not in run.stdout, tail
