// Launcher of the kernel_matmul CUDA kernel on raw pointers and a stream (no torch types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"
#include "kernel_sum/kernel_math.h"

namespace distkern {
namespace kernel_sum {

// out (N×C, float32, contiguous) = Σ_m φ(x_n, y_m) v[m, :]; x is `xtype` with strides (sx0, sx1),
// center (D), yc (M×D, y − center), yy (M, ‖yc‖²) and v (M×C, or null for ones with C = 1) are
// float32. float32 accumulation (float64 inputs are refused by the caller).
cudaError_t launch_kernel_matmul(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                 const float* center, const float* yc, const float* yy,
                                 const float* v, float* out, int64_t N, int64_t M, int64_t D,
                                 int64_t C, const Params& kp, cuda::MatMode mode, cudaStream_t stream);

}  // namespace kernel_sum
}  // namespace distkern
