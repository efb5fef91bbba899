// Launcher of the fused shared-K/V attention forward (pure CUDA: no torch types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace distkern {
namespace align {

// Largest feature width of the fused kernel (per-thread output registers are sized for it).
constexpr int64_t kFusedAttentionMaxD = 1024;

// out (B, M, D) of `t` = softmax(q xᵀ over P) x, lse (B, M) float32; q (B, M, D), x (B, P, D) contiguous of
// `t` (float32 / float16 / bfloat16); mask (B, P) bool or null (true: attend). float32 accumulation.
cudaError_t launch_shared_kv_attention(DType t, const void* q, const void* x, const bool* mask, void* out, float* lse,
                                       int64_t B, int64_t M, int64_t P, int64_t D, cudaStream_t stream);

}  // namespace align
}  // namespace distkern
