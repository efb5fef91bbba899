"""The CUDA tile-product skeleton (csrc/common/tile_gemm.cuh) run on the CPU through a small CUDA
stand-in (tests/emu/cuda_emulate.h, the header rewritten by tests/emu/cu2cpp.py): both kernels — FMA with 4×4 / 8×8 thread tiles, tensor cores
with TF32 / 3xTF32 — against float64 products, with B read along either axis, triangular factors,
several problems per block and the per-row guards. It checks the index arithmetic, the shared-memory
layouts, the mma.sync fragment layout (as the PTX ISA documents it) and the accumulator hand-off to the epilogues on a machine
without a GPU; it says nothing about the hardware (the cuda-marked tests do that)."""
import subprocess

import pytest

from emu_support import EMU, compile_flags, missing


def test_tile_skeleton_emulated(tmp_path):
    if missing():
        pytest.skip(missing())
    exe = tmp_path / "tile_emulation"
    cmd = ["g++", *compile_flags(tmp_path), str(EMU / "tile_emulation.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe), "7"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.count(" ok\n") >= 50
