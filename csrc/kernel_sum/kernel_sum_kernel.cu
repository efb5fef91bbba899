// CUDA schedule of kernel_matmul (pure CUDA). Flash-style: a block owns 64 rows of x and 64
// output columns of v; for each 64-wide block of y it forms the x·y tile with the shared tile
// skeleton, applies φ in the epilogue into shared memory, and multiplies that K tile by the
// matching rows of v into register accumulators. K never leaves shared memory; x's centred
// squared norms come for free from the first column block's loads (the skeleton's per-row guard).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_types.cuh"
#include "common/tile_gemm.cuh"
#include "kernel_sum/kernel_math.h"
#include "kernel_sum/kernel_sum_launch.h"

namespace distkern {
namespace kernel_sum {
namespace {

using cuda::to_acc;

template <typename T>
struct XCLoad {  // x − center; the "guard" accumulates the squared norm of the centred row
  const T* x;
  int64_t sx0, sx1;
  const float* center;
  __device__ float operator()(int64_t, int64_t row, int64_t k, float& sq) const {
    const float v = to_acc<float>(x[row * sx0 + k * sx1]) - center[k];
    sq += v * v;
    return v;
  }
};

struct YTLoad {  // B[k][m] = yc[m][k]
  enum { kKContiguous = 1 };  // B[k][j] is contiguous along k: the tensor-core kernel loads it that way
  const float* yc;
  int64_t D;
  __device__ float operator()(int64_t, int64_t k, int64_t m) const { return yc[m * D + k]; }
};

template <typename T>
struct KV {
  struct Args {
    float* out;
    const float* v;
    const float* yy;
    Params kp;
    int64_t N, M, C;
    XCLoad<T> x;      // for the exact r² of near-coincident pairs (needs_exact_r2)
    const float* yc;  // (M, D) centred y
    int64_t D;
  };
  template <int TR, int TC>
  struct Epi {
    // Up to 128 registers (the FMA kernel's default 80 spills this epilogue's per-bandwidth state).
    enum { kMinBlocks = cuda::kBlocks128 };
    Args a;
    static constexpr int BM = 16 * TR, BN = 16 * TC;
    struct State {
      float o[TR][TC];
    };
    __device__ void init(State& st) const {
#pragma unroll
      for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TC; ++j) st.o[i][j] = 0.f;
    }
    __device__ void block(State& st, const float (&c)[TR][TC], int64_t p, int64_t row_base,
                          int64_t j0, float*, const float* xx) const {
      __shared__ float Ks[BM][BN + 1];
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
      const bool dist = uses_distance(a.kp.kind);
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int r = ty * TR + i;
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int m = tx * TC + j;
          const int64_t gm = j0 + m;
          float k = 0.f;
          if (row_base + r < a.N && gm < a.M) {
            const float dot = c[i][j];
            float r2 = 0.f;
            if (dist) {
              r2 = sq_dist(xx[r], a.yy[gm], dot);
              if (needs_exact_r2(r2, xx[r], a.yy[gm])) {  // rare: the coordinates again, from L2
                float sq = 0.f;
                r2 = 0.f;
                for (int64_t q = 0; q < a.D; ++q) {
                  const float d = a.x(0, row_base + r, q, sq) - a.yc[gm * a.D + q];
                  r2 += d * d;
                }
              }
            }
            k = phi(a.kp, r2, dot);
          }
          Ks[r][m] = k;
        }
      }
      __syncthreads();
      const int64_t c0 = p * BN;
      const int mmax = (a.M - j0) < BN ? static_cast<int>(a.M - j0) : BN;
      for (int m = 0; m < mmax; ++m) {
        float vv[TC];
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t cc = c0 + tx * TC + j;
          vv[j] = cc < a.C ? (a.v ? a.v[(j0 + m) * a.C + cc] : 1.f) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < TR; ++i) {
          const float k = Ks[ty * TR + i][m];
#pragma unroll
          for (int j = 0; j < TC; ++j) st.o[i][j] += k * vv[j];
        }
      }
      __syncthreads();
    }
    __device__ void end_problem(State& st, int64_t p, int64_t row_base, const float*) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
      const int64_t c0 = p * BN;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int64_t row = row_base + ty * TR + i;
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t cc = c0 + tx * TC + j;
          if (row < a.N && cc < a.C) a.out[row * a.C + cc] = st.o[i][j];
          st.o[i][j] = 0.f;
        }
      }
    }
    __device__ void finish(State&, int64_t) const {}
  };
};

template <typename T>
cudaError_t typed(const void* x, int64_t sx0, int64_t sx1, const float* center, const float* yc,
                  const float* yy, const float* v, float* out, int64_t N, int64_t M, int64_t D,
                  int64_t C, const Params& kp, cuda::MatMode mode, cudaStream_t stream) {
  XCLoad<T> a{static_cast<const T*>(x), sx0, sx1, center};
  YTLoad b{yc, D};
  const typename KV<T>::Args e{out, v, yy, kp, N, M, C, a, yc, D};
  const int64_t chunks = (C + 63) / 64;          // output columns per problem: 64
  const int64_t ppb = (chunks + 65534) / 65535;  // problems per block: gridDim.y stays ≤ 65535 for any C
  return cuda::launch_tile_gemm_rows_mode<float, 4, 4, KV<T>::template Epi>(mode, N, D, M, cuda::Tri::None, chunks,
                                                                            ppb, a, b, e, stream);
}

}  // namespace

cudaError_t launch_kernel_matmul(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                 const float* center, const float* yc, const float* yy,
                                 const float* v, float* out, int64_t N, int64_t M, int64_t D,
                                 int64_t C, const Params& kp, cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0 || M <= 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return typed<float>(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, stream);
    case DType::F16: return typed<__half>(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, stream);
    case DType::BF16: return typed<__nv_bfloat16>(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kernel_sum
}  // namespace distkern
