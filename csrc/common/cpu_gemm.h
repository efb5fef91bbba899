// Single-precision products for the CPU paths, with micro-kernels of our own (AVX-512F and AVX2+FMA).
//
// Why: torch's CPU builds multiply float32 through MKL, which on AMD processors runs its AVX2 code
// even where the core has full-width AVX-512 (Zen 4 / Zen 5): on the 2-core EPYC (Zen 5) of our CI a
// 1024³ torch.mm reaches 106 GFLOP/s on one core where the same core does 237 GFLOP/s in AVX-512.
// And our ops' CPU tiles are small, plain row-major products (64 rows × a few hundred), where a BLAS
// call's threading and packing cost as much as the arithmetic. One register-blocked kernel covers
// them: a 12×32 tile of C in 24 zmm accumulators (AVX-512F) or 6×16 in 12 ymm (AVX2+FMA; on CPUs
// without AVX-512 for the streamed triangular products and gram only, see mm_tril_out and gram), A
// broadcast from memory, B streamed in column panels (read in place when its rows are contiguous, else
// packed once per K block).
//
// Every product falls back to at::mm_out when the CPU has neither, for float64 / other dtypes, for
// layouts it does not take, or when DISTKERN_CPU_GEMM=0 is set (read once per process;
// DISTKERN_CPU_GEMM=avx2 takes the AVX2 kernel on an AVX-512 CPU too, for tests and comparisons).
// Accumulation is float32 in both paths (sequential over k within a K block, as BLAS does).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace distkern {
namespace cpu {

// True when the products (sgemm, mm_out, mm, gram) run on a micro-kernel of ours in this process: the
// AVX-512 one (x86-64 GCC build, AVX-512F, DISTKERN_CPU_GEMM not 0), or the AVX2 one when
// DISTKERN_CPU_GEMM=avx2 asks for it (on AVX2-only CPUs torch's BLAS was as fast or faster for them).
bool fast_gemm_enabled();

// True when that is the AVX-512 one.
bool avx512_enabled();

// The vector lanes of distkern's CPU math (common/simd_math.h: φ of the kernel sums, the anomaly map's
// sigmoid): AVX-512 where the AVX-512 product kernel runs, else AVX2 where the CPU has AVX2+FMA (with
// DISTKERN_CPU_GEMM=avx2 too), None (scalar code) with DISTKERN_CPU_GEMM=0 or neither set.
enum class Isa { None, Avx2, Avx512 };
Isa math_isa();

// "avx512", "avx2" or "none": math_isa() by name (build_info / distkern info).
const char* math_isa_name();

// "avx512", "avx2" or "none": which micro-kernel runs the products (build_info / distkern info).
const char* gemm_isa();

// C (M×N, row stride ldc, unit column stride) = A·B, or C += A·B when accumulate. A is M×K with
// element (i, k) at a[i·sam + k·sak]; B is K×N with (k, j) at b[k·sbk + j·sbn]. Single-threaded:
// for use inside a parallel region (the tile loops). Returns false, C untouched, when no micro-kernel
// is enabled.
bool sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b,
           int64_t sbk, int64_t sbn, float* c, int64_t ldc, bool accumulate);

// out = a @ b (out += a @ b with accumulate) for 2-D CPU tensors: float32 through sgemm when it is
// enabled and out's rows are contiguous, else at::mm_out / addmm_. A drop-in for at::mm_out in the
// tile loops (single-threaded: call it inside a parallel region or for small products).
void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// Memory a caller reads next, to be fetched into L2 while a product runs: rows [0, rows) of `base`,
// ld_bytes apart, row_bytes each. For the next of PaDiM's factors, which would otherwise come from memory
// one strided 32-column panel at a time, latency-bound (~14 GB/s of the machine's ~50).
struct PrefetchRows {
  const void* base;
  int64_t rows, ld_bytes, row_bytes;
};

// out = a @ b for a lower-triangular b (b[k, j] = 0 for k < j, not read there): float32 through the
// micro-kernel, skipping the zero blocks at its panel width (32 or 16 columns). With `next`, two lines
// of it are prefetched per step of the micro-kernel until it is all requested; such streamed products
// take the AVX2 kernel on CPUs without AVX-512 too, where it beat torch's BLAS (without `next`, the
// products' kernel runs them, where fast_gemm_enabled). Returns false (out untouched) where no kernel is
// enabled for it or the layout does not suit it (b's rows must be contiguous).
// Single-threaded, like mm_out.
bool mm_tril_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const PrefetchRows* next = nullptr);

// a @ b and z·zᵀ for 2-D CPU tensors, parallel over tiles of the output. Where mm takes torch's BLAS
// (no micro-kernel, float64), a product of few rows and many columns is split over the threads by
// columns, one BLAS call per slice (MKL threads over rows, and leaves the second core idle there). gram computes the tiles that
// touch the upper triangle only and mirrors them (z·zᵀ is symmetric to the last bit); it runs on the AVX2
// kernel on CPUs without AVX-512 too (half the arithmetic of BLAS' square), else as at::mm made symmetric.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor gram(const at::Tensor& z);

// The same for z = [top; bottom] without forming it: a · [top; bottom] (a's first top.size(0) columns
// multiply top, the rest bottom) and [x; y]·[x; y]ᵀ. mmd2's small path: the samples x and y are read in
// place, where their concatenation cost a copy of both (1 MiB at MMD-DDM's 2 × 64 × 2048).
at::Tensor mm_stacked(const at::Tensor& a, const at::Tensor& top, const at::Tensor& bottom);
at::Tensor gram_stacked(const at::Tensor& x, const at::Tensor& y);

}  // namespace cpu
}  // namespace distkern
