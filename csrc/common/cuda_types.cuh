// Element conversions for the pure-CUDA kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace distkern {
namespace cuda {

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) { return static_cast<acc_t>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// Sum over the 32 lanes of a warp (every lane gets it; a fixed order, so deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace cuda
}  // namespace distkern
