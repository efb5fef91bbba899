// Launcher of the anomaly map CUDA kernel on raw pointers and a stream (no torch types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"

namespace distkern {
namespace align {

// out (B, P) = mean over l < L, k < K of σ(x̂_lbp · d_{l,b,k}); patches (L, B, P, D) contiguous of
// `xtype`; dirs (Ld, Bd, K, D) contiguous float32 (float64 for float64 patches), broadcast over
// layers / images when Ld / Bd is 1; out float32 (float64). float32 accumulation runs on the tile skeleton
// (common/tile_gemm.cuh: FMAs or, in a tensor-core mode, tensor cores); float64 on its own FMA kernel.
// workspace: null, or anomaly_map_workspace(...) elements of out's type — then the FMA paths give each
// layer blocks of its own (L times the blocks) and a second kernel averages the layers' sums into out.
// The elements of workspace the launch would use: L·B·P on FMAs (float64 in any mode, else the "fma"
// mode) over 2..65535 layers, else 0 (the layers stay in one block; pass null).
int64_t anomaly_map_workspace(DType xtype, cuda::MatMode mode, int64_t L, int64_t B, int64_t P);

cudaError_t launch_anomaly_map(DType xtype, const void* patches, const void* dirs, void* out, int64_t L, int64_t B,
                               int64_t P, int64_t D, int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode,
                               void* workspace, cudaStream_t stream);

}  // namespace align
}  // namespace distkern
