// The arithmetic of standardized_sqdist, once for the CPU and the CUDA kernels ("one math, two
// schedules"). No torch and no CUDA header: DK_HD makes it __host__ __device__ under nvcc.
#pragma once

#include "common/macros.h"

namespace distkern_example_kernel {

// One term of score_n = Σ_d ((x_nd − μ_d) · s_d)², s_d = 1 / σ_d, in the accumulation type.
template <typename acc_t>
DK_HD acc_t standardized_term(acc_t x, acc_t mean, acc_t inv_std) {
  const acc_t z = (x - mean) * inv_std;
  return z * z;
}

}  // namespace distkern_example_kernel
