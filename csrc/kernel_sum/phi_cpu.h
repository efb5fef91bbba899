// φ over rows of a CPU kernel-sum tile, 16 pairs per instruction with AVX-512, 8 with AVX2.
//
// Why: once the x·y products run at vector rate (common/cpu_gemm.h, or a good BLAS), the per-pair φ is
// what costs on the CPU. kernel_math.h's phi evaluates one pair at a time through libm's scalar expf
// (~3 ns a call): for the Gaussian kernel with three bandwidths at D = 64 that is 9 ns per pair against
// 0.3 ns for its share of the product. This evaluates the same formulas (same r², same clamp, same NaN
// rules, same derivative kinds) on 16 or 8 pairs at a time, with an exp of our own
// (common/simd_lanes.inc: Cody–Waite reduction, Cephes' polynomial, ≤ 1.4 ulp over float32's range,
// gradual underflow to 0); the AVX-512 and AVX2 forms give the same bits. The CUDA kernels keep
// kernel_math.h's phi; the tests hold both to the float64 reference.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_sum/kernel_math.h"

namespace distkern {
namespace kernel_sum {

// True when phi_row_vec takes this kernel: vector lanes run here (cpu::math_isa(): AVX-512F or AVX2+FMA,
// DISTKERN_CPU_GEMM not 0) and the kind is one it evaluates (every kind; the polynomial ones for integer
// exponents up to 16 — KID's 3 and its 2).
bool phi_vec_takes(const Params& kp);

// k[j] holds the centred x·y_j on entry and φ(x, y_j) on return, for j < n, with r² = sq_dist(xx,
// yy[j], k[j]) for the distance kinds. The indices j whose r² the norm form does not resolve
// (needs_exact_r2) are appended to `refine`: their k[j] holds the norm form's φ, which the caller
// replaces by φ of the r² from the coordinates. Only where phi_vec_takes(kp).
void phi_row_vec(const Params& kp, float* k, int64_t n, float xx, const float* yy, std::vector<int64_t>& refine);

}  // namespace kernel_sum
}  // namespace distkern
