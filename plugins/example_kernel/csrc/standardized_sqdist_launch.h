// Launcher of the standardized_sqdist CUDA kernel on raw pointers and a stream: the interface
// between the pure-CUDA .cu file and the torch side (*_cuda.cpp). No torch types here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace distkern_example_kernel {

// out[n] = Σ_d ((x[n·sx0 + d·sx1] − mean[d]) · inv_std[d])² for n < N. x has element type `xtype`;
// mean, inv_std and out are double when xtype is F64, else float (the accumulation type).
cudaError_t launch_standardized_sqdist(distkern::DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                       const void* mean, const void* inv_std, void* out, int64_t N,
                                       int64_t D, cudaStream_t stream);

}  // namespace distkern_example_kernel
