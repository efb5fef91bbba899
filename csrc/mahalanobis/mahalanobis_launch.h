// Launchers of the Mahalanobis CUDA kernels on raw pointers and a stream. No torch types: the .cu
// file that defines them compiles with nvcc alone (CMakeLists.txt), the _cuda.cpp file calls them.
//
// Pointer types: x is `xtype`; mean, factor, grad, out, z and partial are the accumulation type
// (double for F64, float otherwise), contiguous. factor is D×R row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace distkern {
namespace mahalanobis {

// out[n] = ‖Wᵀ(x[n] − mean)‖²  (N ≥ 1)
cudaError_t launch_forward(DType xtype, const void* x, int64_t sx0, int64_t sx1, const void* mean,
                           const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                           bool lower, cudaStream_t stream);

// gx[n] = W (2·grad[n]·Wᵀ(x[n] − mean))  written in xtype, contiguous N×D;
// partial[b][k] = −Σ_{n in row block b} gx[n][k] in the accumulation type, (ceil(N/64))×D;
// z is an N×R scratch buffer in the accumulation type.
cudaError_t launch_backward(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* grad, const void* mean, const void* factor, void* z,
                            void* gx, void* partial, int64_t N, int64_t D, int64_t R, bool lower,
                            cudaStream_t stream);

// Rows per thread block of both kernels (the partial-sum buffer has ceil(N / kRowsPerBlock) rows).
constexpr int64_t kRowsPerBlock = 64;

}  // namespace mahalanobis
}  // namespace distkern
