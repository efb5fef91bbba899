// φ over rows of a CPU kernel-sum tile, 16 pairs per instruction with AVX-512.
//
// Why: once the x·y products run at AVX-512 rate (common/cpu_gemm.h), the per-pair φ is what costs on
// the CPU. kernel_math.h's phi evaluates one pair at a time through libm's scalar expf (~3 ns a call
// here): for the Gaussian kernel with three bandwidths at D = 64 that is 9 ns per pair against 0.3 ns
// for its share of the product. This evaluates the same formulas (same r², same clamp, same NaN
// rules, same derivative kinds) on 16 pairs at a time, with an exp of our own: Cody–Waite reduction,
// Cephes' degree-7 polynomial (≤ 2 ulp over float32's range), 2ⁿ applied by scalef (gradual underflow
// to 0). The CUDA kernels keep kernel_math.h's phi; the tests hold the two to the float64 reference.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_sum/kernel_math.h"

namespace distkern {
namespace kernel_sum {

// True when phi_row_avx512 takes this kernel: the AVX-512 code is compiled in, the CPU has AVX-512F,
// DISTKERN_CPU_GEMM is not 0 (the switch of all of distkern's AVX-512 CPU code), and the kind is one it
// evaluates (every kind; the polynomial ones for integer exponents up to 16 — KID's 3 and its 2).
bool phi_avx512_takes(const Params& kp);

// k[j] holds the centred x·y_j on entry and φ(x, y_j) on return, for j < n, with r² = sq_dist(xx,
// yy[j], k[j]) for the distance kinds. The indices j whose r² the norm form does not resolve
// (needs_exact_r2) are appended to `refine`: their k[j] holds the norm form's φ, which the caller
// replaces by φ of the r² from the coordinates. Only where phi_avx512_takes(kp).
void phi_row_avx512(const Params& kp, float* k, int64_t n, float xx, const float* yy, std::vector<int64_t>& refine);

}  // namespace kernel_sum
}  // namespace distkern
