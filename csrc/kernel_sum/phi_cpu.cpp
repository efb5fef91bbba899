// φ for the CPU kernel-sum tiles on vector lanes (see phi_cpu.h for why and the contract): the math of
// phi_lanes.inc, compiled once for AVX-512F (16 lanes) and once for AVX2+FMA (8 lanes), the set that runs
// chosen by cpu::math_isa().
#include "kernel_sum/phi_cpu.h"

#include <cmath>

#include "common/cpu_gemm.h"
#include "common/macros.h"
#include "common/simd_math.h"

namespace distkern {
namespace kernel_sum {
namespace {

// An integer exponent 0..16 (the range kernel_math.h's dk_pow_kernel squares), else -1.
int small_integer(double e) {
  return e >= 0 && e <= 16 && e == std::floor(e) ? static_cast<int>(e) : -1;
}

}  // namespace

#define DK_LANES_FILE "kernel_sum/phi_lanes.inc"
#include "common/simd_targets.inc"

bool phi_vec_takes(const Params& kp) {
  if (cpu::math_isa() == cpu::Isa::None) return false;
  if (kp.kind == kPolynomial) return small_integer(kp.p[2]) >= 0;
  if (kp.kind == kPolynomialD) return small_integer(kp.p[2] - 1) >= 0;
  return kp.kind >= 0 && kp.kind < kNumKinds;
}

void phi_row_vec(const Params& kp, float* k, int64_t n, float xx, const float* yy, std::vector<int64_t>& refine) {
#if DK_AVX512_CODE
  switch (cpu::math_isa()) {
    case cpu::Isa::Avx512: return on_avx512::phi_row(kp, k, n, xx, yy, refine);
    case cpu::Isa::Avx2: return on_avx2::phi_row(kp, k, n, xx, yy, refine);
    case cpu::Isa::None: break;
  }
#endif
  (void)kp, (void)k, (void)n, (void)xx, (void)yy, (void)refine;
}

}  // namespace kernel_sum
}  // namespace distkern
