// Nearest reference by cosine similarity (ResAD's matching step): the CUDA launcher (no torch
// types; defined in nearest_kernel.cu, called by nearest_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"

namespace distkern {
namespace nearest {

// For each row x[n] (strides sx0, sx1; xtype), the reference m maximising x[n]·rhat[m] with
// rhat the L2-normalised references (M×D, accumulation type, contiguous):
// out[n] = x[n]·rhat[m*] · inv_norm[n] (the cosine similarity), idx[n] = m*.
cudaError_t launch_nearest(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                           const void* rhat, const void* inv_norm, void* out, int64_t* idx,
                           int64_t N, int64_t D, int64_t M, cuda::MatMode mode, cudaStream_t stream);

}  // namespace nearest
}  // namespace distkern
