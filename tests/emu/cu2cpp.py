"""Rewrite CUDA sources as C++ for the CPU emulation in tests/emu (cuda_emulate.h).

Two rewrites, nothing else: each launch ``kernel<...><<<grid, block[, smem[, stream]]>>>(args)``
becomes ``::emu::launch([&] { kernel<...>(args); }, grid, block[, smem[, stream]])``, and
``extern __shared__ T name[];`` becomes a pointer into the emulated dynamic shared memory.

    python tests/emu/cu2cpp.py SRC_ROOT OUT_ROOT   # every .cu / .cuh under SRC_ROOT, same relative paths
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_KERNEL = re.compile(r"([A-Za-z_][\w:]*\s*(?:<[^;{}()]*>)?)\s*$")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;")


def _matching_paren(src: str, p: int) -> int:
    depth = 0
    for q in range(p, len(src)):
        if src[q] == "(":
            depth += 1
        elif src[q] == ")":
            depth -= 1
            if depth == 0:
                return q
    raise ValueError("unbalanced parentheses after a kernel launch")


def transform(src: str) -> str:
    src = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dyn_smem());", src)
    out, i = [], 0
    while (j := src.find("<<<", i)) >= 0:
        start = max(src.rfind(c, i, j) for c in ";{}") + 1
        expr = src[start:j]
        m = _KERNEL.search(expr)
        if m is None:
            raise ValueError(f"cannot find the kernel before a launch: {expr[-80:]!r}")
        e = src.index(">>>", j)
        p = src.index("(", e)
        q = _matching_paren(src, p)
        out.append(src[i:start] + expr[:m.start(1)])
        out.append(f"::emu::launch([&] {{ {m.group(1).strip()}({src[p + 1:q]}); }}, {src[j + 3:e]})")
        i = q + 1
    out.append(src[i:])
    return "".join(out)


def transform_tree(src_root: Path, out_root: Path) -> list[Path]:
    written = []
    for f in sorted(src_root.rglob("*")):
        if f.suffix in (".cu", ".cuh"):
            dst = out_root / f.relative_to(src_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(transform(f.read_text()))
            written.append(dst)
    return written


if __name__ == "__main__":
    for path in transform_tree(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
