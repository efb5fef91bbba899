// standardized_sqdist on CUDA: pure CUDA, no torch header (compiles with nvcc alone).
// One warp per row: the lanes stride over D, then a warp-shuffle reduction; x is read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_types.cuh"
#include "standardized_sqdist_launch.h"
#include "standardized_sqdist_math.h"

namespace distkern_example_kernel {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block

template <typename T, typename acc_t>
__global__ void standardized_sqdist_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1,
                                           const acc_t* __restrict__ mean,
                                           const acc_t* __restrict__ inv_std, acc_t* __restrict__ out,
                                           int64_t N, int64_t D) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= N) return;  // the whole warp leaves together
  const T* xr = x + row * sx0;
  acc_t acc = 0;
  for (int64_t d = lane; d < D; d += 32) {
    acc += standardized_term<acc_t>(distkern::cuda::to_acc<acc_t>(xr[d * sx1]), mean[d], inv_std[d]);
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[row] = acc;
}

template <typename T, typename acc_t>
cudaError_t launch(const void* x, int64_t sx0, int64_t sx1, const void* mean, const void* inv_std,
                   void* out, int64_t N, int64_t D, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int64_t blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  standardized_sqdist_kernel<T, acc_t><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(mean),
      static_cast<const acc_t*>(inv_std), static_cast<acc_t*>(out), N, D);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_standardized_sqdist(distkern::DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                       const void* mean, const void* inv_std, void* out, int64_t N,
                                       int64_t D, cudaStream_t stream) {
  switch (xtype) {
    case distkern::DType::F32: return launch<float, float>(x, sx0, sx1, mean, inv_std, out, N, D, stream);
    case distkern::DType::F16: return launch<__half, float>(x, sx0, sx1, mean, inv_std, out, N, D, stream);
    case distkern::DType::BF16:
      return launch<__nv_bfloat16, float>(x, sx0, sx1, mean, inv_std, out, N, D, stream);
    case distkern::DType::F64: return launch<double, double>(x, sx0, sx1, mean, inv_std, out, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace distkern_example_kernel
