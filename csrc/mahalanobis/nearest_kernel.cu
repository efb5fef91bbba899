// CUDA schedule of nearest_cosine (pure CUDA). The tile-product kernel multiplies 64-row tiles of
// x by column blocks of the normalised references (Bᵀ read straight from rhat) and keeps a running
// argmax per row in registers, so the N×M similarity matrix never exists (ResAD's own code builds
// it and runs out of memory, REFERENCES.md). Ties keep the lowest index; a non-finite row gives NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_types.cuh"
#include "common/tile_gemm.cuh"
#include "mahalanobis/mahalanobis_math.h"
#include "mahalanobis/nearest_launch.h"

namespace distkern {
namespace nearest {
namespace {

using cuda::to_acc;
using mahalanobis::MinAcc;

template <typename T, typename acc_t>
struct XLoad {
  const T* x;
  int64_t sx0, sx1;
  __device__ acc_t operator()(int64_t, int64_t row, int64_t k, acc_t& guard) const {
    const acc_t v = to_acc<acc_t>(x[row * sx0 + k * sx1]);
    guard += v - v;
    return v;
  }
};

template <typename acc_t>
struct RefTLoad {  // B[k][m] = rhat[m][k]
  enum { kKContiguous = 1 };  // B[k][j] is contiguous along k: the tensor-core kernel loads it that way
  const acc_t* r;
  int64_t D;
  __device__ acc_t operator()(int64_t, int64_t k, int64_t m) const { return r[m * D + k]; }
};

template <typename acc_t>
struct ArgMax {
  struct Args {
    acc_t* out;
    int64_t* idx;
    const acc_t* inv_norm;
    int64_t N, M;
  };
  template <int TR, int TC>
  struct Epi {
    // 2 blocks an SM (128 registers): the FMA kernel's default 80 spills this epilogue.
    enum { kMinBlocks = 2 };
    Args a;
    struct State {
      MinAcc<acc_t> mn[TR];  // min of −dot = max of dot
    };
    __device__ void init(State& st) const {
#pragma unroll
      for (int i = 0; i < TR; ++i) st.mn[i].init();
    }
    __device__ void block(State& st, const acc_t (&c)[TR][TC], int64_t, int64_t row_base,
                          int64_t j0, acc_t*, const acc_t* guard_rows) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const acc_t g = guard_rows[ty * TR + i];
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t col = j0 + tx * TC + j;
          if (col < a.M) st.mn[i].update(-c[i][j] + g, col);
        }
      }
    }
    __device__ void end_problem(State&, int64_t, int64_t, const acc_t*) const {}
    __device__ void finish(State& st, int64_t row_base) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1) {
          MinAcc<acc_t> o;
          o.v = __shfl_xor_sync(0xffffffffu, st.mn[i].v, off);
          o.idx = __shfl_xor_sync(0xffffffffu, static_cast<long long>(st.mn[i].idx), off);
          st.mn[i].merge(o);
        }
        const int64_t row = row_base + ty * TR + i;
        if (tx != 0 || row >= a.N) continue;
        a.out[row] = -st.mn[i].v * a.inv_norm[row];
        a.idx[row] = st.mn[i].idx;
      }
    }
  };
};

template <typename T, typename acc_t>
cudaError_t nearest_typed(const void* x, int64_t sx0, int64_t sx1, const void* rhat,
                          const void* inv_norm, void* out, int64_t* idx, int64_t N, int64_t D,
                          int64_t M, cuda::MatMode mode, cudaStream_t stream) {
  XLoad<T, acc_t> a{static_cast<const T*>(x), sx0, sx1};
  RefTLoad<acc_t> b{static_cast<const acc_t*>(rhat), D};
  const typename ArgMax<acc_t>::Args e{static_cast<acc_t*>(out), idx,
                                       static_cast<const acc_t*>(inv_norm), N, M};
  return cuda::launch_tile_gemm_rows_mode<acc_t, 4, 4, ArgMax<acc_t>::template Epi>(
      mode, N, D, M, cuda::Tri::None, 1, 1, a, b, e, stream);
}

}  // namespace

cudaError_t launch_nearest(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                           const void* rhat, const void* inv_norm, void* out, int64_t* idx,
                           int64_t N, int64_t D, int64_t M, cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return nearest_typed<float, float>(x, sx0, sx1, rhat, inv_norm, out, idx, N, D, M, mode, stream);
    case DType::F16: return nearest_typed<__half, float>(x, sx0, sx1, rhat, inv_norm, out, idx, N, D, M, mode, stream);
    case DType::BF16: return nearest_typed<__nv_bfloat16, float>(x, sx0, sx1, rhat, inv_norm, out, idx, N, D, M, mode, stream);
    case DType::F64: return nearest_typed<double, double>(x, sx0, sx1, rhat, inv_norm, out, idx, N, D, M, mode, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nearest
}  // namespace distkern
