"""The CUDA tile-product skeleton (csrc/common/tile_gemm.cuh) run on the CPU through a small CUDA
stand-in (tests/emu/cuda_emulate.h, the header rewritten by tests/emu/cu2cpp.py): both kernels — FMA with 4×4 / 8×8 thread tiles, tensor cores
with TF32 / 3xTF32 — against float64 products, with B read along either axis, triangular factors,
several problems per block and the per-row guards. It checks the index arithmetic, the shared-memory
layouts, the mma.sync fragment layout (as the PTX ISA documents it) and the accumulator hand-off to the epilogues on a machine
without a GPU; it says nothing about the hardware (the cuda-marked tests do that).

First, the stand-in itself (tests/emu/emu_selftest.cpp): barriers order shared-memory writes before
reads, a missing barrier is seen (the fibers of a block alternate their order from one barrier to the
next), the shuffles match their definitions, every block runs once, and a barrier that a thread never
reaches stops the run with a message instead of hanging it; under the sanitizers, out-of-bounds writes to
shared memory and to a fiber's stack are caught."""
import subprocess

import pytest

from emu_support import EMU, SANITIZE, compile_flags, missing


def _build(tmp_path, name: str):
    """tests/emu/<name>.cpp built against the rewritten sources: the executable's path."""
    if missing():
        pytest.skip(missing())
    exe = tmp_path / name
    build = subprocess.run(["g++", *compile_flags(tmp_path), str(EMU / f"{name}.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def test_emulation_itself(tmp_path):
    exe = _build(tmp_path, "emu_selftest")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout + run.stderr[-2000:]
    assert run.stdout.count(" ok\n") == 4, run.stdout
    stuck = subprocess.run([str(exe), "deadlock"], capture_output=True, text=True, timeout=60)
    assert stuck.returncode != 0 and "deadlock" in stuck.stderr, stuck.stdout + stuck.stderr[-2000:]
    assert "63 thread(s) from t1 at __syncthreads" in stuck.stderr and "1 thread(s) from t0 at end of block" in stuck.stderr
    if SANITIZE:  # the fibers' stacks and the __shared__ statics stay under AddressSanitizer's eye
        for case, where in (("oob-shared", "global-buffer-overflow"), ("oob-local", "stack-buffer-overflow")):
            bad = subprocess.run([str(exe), case], capture_output=True, text=True, timeout=60)
            assert bad.returncode != 0 and where in bad.stderr, case + ":\n" + bad.stdout + bad.stderr[-3000:]


def test_tile_skeleton_emulated(tmp_path):
    exe = _build(tmp_path, "tile_emulation")
    run = subprocess.run([str(exe), "7"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.count(" ok\n") >= 50
