// CUDA schedule of the Mahalanobis op (pure CUDA: no torch headers; built standalone by
// CMakeLists.txt for sm_80 / sm_90 and into distkern._C by setup.py).
//
// Forward: one tile-product kernel. Each block centres 64 rows of x as it loads them (any
// strides, fp32/fp16/bf16/fp64 → fp32/fp64), multiplies by the factor tile by tile (skipping the
// zero blocks of a triangular factor), and squares-and-sums z = Wᵀ(x − μ) in registers: no N×D
// or N×R intermediate, x read once from DRAM (re-reads of a 64-row tile hit L1/L2).
//
// Backward: z' = 2g·z into an N×R scratch, then gx = z'·Wᵀ with per-block column sums for ∂μ
// (deterministic: reduced later in a fixed order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_types.cuh"
#include "common/tile_gemm.cuh"
#include "mahalanobis/mahalanobis_launch.h"
#include "mahalanobis/mahalanobis_math.h"

namespace distkern {
namespace mahalanobis {
namespace {

using cuda::from_acc;
using cuda::kTileM;
using cuda::kTileN;
using cuda::Tri;
using cuda::to_acc;

static_assert(kRowsPerBlock == kTileM, "partial-sum rows must match the tile");

template <typename T, typename acc_t>
struct XLoad {
  const T* x;
  int64_t sx0, sx1;
  const acc_t* mean;
  __device__ acc_t operator()(int64_t row, int64_t k, acc_t& guard) const {
    return center(to_acc<acc_t>(x[row * sx0 + k * sx1]), mean[k], guard);
  }
};

template <typename acc_t>
struct ZLoad {  // the N×R scratch, row-major
  const acc_t* z;
  int64_t R;
  __device__ acc_t operator()(int64_t row, int64_t k, acc_t&) const { return z[row * R + k]; }
};

template <typename acc_t>
struct FactorLoad {  // B = W (D×R)
  const acc_t* w;
  int64_t R;
  __device__ acc_t operator()(int64_t k, int64_t j) const { return w[k * R + j]; }
};

template <typename acc_t>
struct FactorTLoad {  // B = Wᵀ (R×D): B[k][j] = W[j][k]
  const acc_t* w;
  int64_t R;
  __device__ acc_t operator()(int64_t k, int64_t j) const { return w[j * R + k]; }
};

// Forward epilogue: per-row sum of z², reduced over the 16 column threads, finished with the guard.
template <typename acc_t>
struct SumSqEpi {
  acc_t* out;
  int64_t M;
  struct State {
    acc_t s[4];
  };
  __device__ void init(State& st) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) st.s[i] = 0;
  }
  __device__ void block(State& st, const acc_t (&c)[4][4], int64_t, int64_t, acc_t*,
                        const acc_t*) const {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) st.s[i] += c[i][j] * c[i][j];
  }
  __device__ void finish(State& st, int64_t row_base, const acc_t* guard_rows) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc_t v = st.s[i];
      // The 16 threads sharing a row are lanes 0–15 or 16–31 of one warp.
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      const int r = ty * 4 + i;
      if (tx == 0 && row_base + r < M) out[row_base + r] = mahalanobis::finish(v, guard_rows[r]);
    }
  }
};

// Backward, first product: z' = grad_coef(g)·z (+ guard: NaN for a non-finite row).
template <typename acc_t>
struct ScaleStoreEpi {
  acc_t* z;
  const acc_t* grad;
  int64_t M, R;
  struct State {};
  __device__ void init(State&) const {}
  __device__ void block(State&, const acc_t (&c)[4][4], int64_t row_base, int64_t j0, acc_t*,
                        const acc_t* guard_rows) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
      const int64_t row = row_base + r;
      if (row >= M) continue;
      const acc_t coef = grad_coef(grad[row]) + guard_rows[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = j0 + tx * 4 + j;
        if (col < R) z[row * R + col] = coef * c[i][j];
      }
    }
  }
  __device__ void finish(State&, int64_t, const acc_t*) const {}
};

// Backward, second product: gx = z'·Wᵀ stored in x's dtype, and −Σ_rows gx per column block.
template <typename T, typename acc_t>
struct GradStoreEpi {
  T* gx;
  acc_t* partial;
  int64_t M, D;
  struct State {};
  __device__ void init(State&) const {}
  __device__ void block(State&, const acc_t (&c)[4][4], int64_t row_base, int64_t j0,
                        acc_t* scratch, const acc_t*) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row_base + ty * 4 + i;
      if (row >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = j0 + tx * 4 + j;
        if (col < D) gx[row * D + col] = from_acc<T>(c[i][j]);
      }
    }
    // Rows past M hold zeros (their A loads were 0), so they add nothing to the column sums.
#pragma unroll
    for (int j = 0; j < 4; ++j) scratch[ty * kTileN + tx * 4 + j] = c[0][j] + c[1][j] + c[2][j] + c[3][j];
    __syncthreads();
    if (threadIdx.x < kTileN) {
      acc_t s = 0;
#pragma unroll
      for (int t = 0; t < 16; ++t) s += scratch[t * kTileN + threadIdx.x];
      const int64_t col = j0 + threadIdx.x;
      if (col < D) partial[static_cast<int64_t>(blockIdx.x) * D + col] = -s;
    }
    __syncthreads();
  }
  __device__ void finish(State&, int64_t, const acc_t*) const {}
};

template <typename acc_t, typename A, typename B, typename E>
cudaError_t launch_tiles(int64_t M, int64_t K, int64_t Ncols, Tri tri, A a, B b, E e,
                         cudaStream_t stream) {
  const int64_t blocks = (M + kTileM - 1) / kTileM;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  cuda::tile_gemm_rows_kernel<acc_t, A, B, E>
      <<<static_cast<unsigned>(blocks), cuda::kTileThreads, 0, stream>>>(M, K, Ncols, tri, a, b, e);
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t forward_typed(const void* x, int64_t sx0, int64_t sx1, const void* mean,
                          const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                          bool lower, cudaStream_t stream) {
  XLoad<T, acc_t> a{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(mean)};
  FactorLoad<acc_t> b{static_cast<const acc_t*>(factor), R};
  SumSqEpi<acc_t> e{static_cast<acc_t*>(out), N};
  return launch_tiles<acc_t>(N, D, R, lower ? Tri::Lower : Tri::None, a, b, e, stream);
}

template <typename T, typename acc_t>
cudaError_t backward_typed(const void* x, int64_t sx0, int64_t sx1, const void* grad,
                           const void* mean, const void* factor, void* z, void* gx, void* partial,
                           int64_t N, int64_t D, int64_t R, bool lower, cudaStream_t stream) {
  const acc_t* w = static_cast<const acc_t*>(factor);
  XLoad<T, acc_t> a1{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(mean)};
  FactorLoad<acc_t> b1{w, R};
  ScaleStoreEpi<acc_t> e1{static_cast<acc_t*>(z), static_cast<const acc_t*>(grad), N, R};
  cudaError_t err = launch_tiles<acc_t>(N, D, R, lower ? Tri::Lower : Tri::None, a1, b1, e1, stream);
  if (err != cudaSuccess) return err;
  ZLoad<acc_t> a2{static_cast<const acc_t*>(z), R};
  FactorTLoad<acc_t> b2{w, R};
  GradStoreEpi<T, acc_t> e2{static_cast<T*>(gx), static_cast<acc_t*>(partial), N, D};
  return launch_tiles<acc_t>(N, R, D, lower ? Tri::Upper : Tri::None, a2, b2, e2, stream);
}

}  // namespace

cudaError_t launch_forward(DType xtype, const void* x, int64_t sx0, int64_t sx1, const void* mean,
                           const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                           bool lower, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return forward_typed<float, float>(x, sx0, sx1, mean, factor, out, N, D, R, lower, stream);
    case DType::F16: return forward_typed<__half, float>(x, sx0, sx1, mean, factor, out, N, D, R, lower, stream);
    case DType::BF16: return forward_typed<__nv_bfloat16, float>(x, sx0, sx1, mean, factor, out, N, D, R, lower, stream);
    case DType::F64: return forward_typed<double, double>(x, sx0, sx1, mean, factor, out, N, D, R, lower, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* grad, const void* mean, const void* factor, void* z,
                            void* gx, void* partial, int64_t N, int64_t D, int64_t R, bool lower,
                            cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return backward_typed<float, float>(x, sx0, sx1, grad, mean, factor, z, gx, partial, N, D, R, lower, stream);
    case DType::F16: return backward_typed<__half, float>(x, sx0, sx1, grad, mean, factor, z, gx, partial, N, D, R, lower, stream);
    case DType::BF16: return backward_typed<__nv_bfloat16, float>(x, sx0, sx1, grad, mean, factor, z, gx, partial, N, D, R, lower, stream);
    case DType::F64: return backward_typed<double, double>(x, sx0, sx1, grad, mean, factor, z, gx, partial, N, D, R, lower, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mahalanobis
}  // namespace distkern
