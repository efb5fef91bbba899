// CUDA schedule of nearest_cosine (pure CUDA). The tile-product kernel multiplies 64-row tiles of
// x by column blocks of the normalised references (Bᵀ read straight from rhat) and keeps a running
// argmax per row in registers, so the N×M similarity matrix never exists (ResAD's own code builds
// it and runs out of memory, REFERENCES.md). At large D the Gram schedule takes the products from the
// caller's GEMM in bounded panels instead, and argmax_panel_kernel folds each panel into a running
// (max, index) per row (nearest_launch.h). Ties keep the lowest index; a non-finite row gives NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// Gram panel → running argmax. One warp a row: lane l reads the 16-byte groups l, l + 32, ... of the row
// (coalesced; element by element where the row is not 16-byte aligned or the group is cut by `cols`), each
// lane's values in increasing column order, so a strict update keeps a lane's lowest index among ties and
// MinAcc::merge the lowest across lanes and panels. The running state lives in out / idx (the min of
// −dot, as the tile kernel's epilogue); the row panel's last column panel writes the similarity.
// Memory-bound: G is read once, 4 (8) bytes a pair.
constexpr int kArgmaxWarps = 8;
template <typename acc_t>
__global__ void __launch_bounds__(kArgmaxWarps * 32)
    argmax_panel_kernel(const acc_t* __restrict__ G, int64_t ld, int64_t rows, int64_t cols, int64_t j0,
                        const acc_t* __restrict__ guard, acc_t* __restrict__ out, int64_t* __restrict__ idx,
                        const acc_t* __restrict__ inv_norm, bool first, bool last) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kArgmaxWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps: r is the same across a warp
  const int lane = threadIdx.x % 32;
  const acc_t* row = G + r * ld;
  const acc_t g = guard[r];
  constexpr int V = 16 / sizeof(acc_t);
  const bool vec = ld % V == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  MinAcc<acc_t> mn;
  mn.init();
  const int64_t groups = (cols + V - 1) / V;
#pragma unroll 4
  for (int64_t q = lane; q < groups; q += 32) {
    const int64_t c = q * V;
    acc_t v[V];
    if (vec && c + V <= cols) {
      if constexpr (V == 4) {
        const float4 t = *reinterpret_cast<const float4*>(row + c);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
      } else {
        const double2 t = *reinterpret_cast<const double2*>(row + c);
        v[0] = t.x; v[1] = t.y;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) mn.update(-v[j] + g, j0 + c + j);
    } else {
      for (int j = 0; j < V && c + j < cols; ++j) mn.update(-row[c + j] + g, j0 + c + j);
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    MinAcc<acc_t> o;
    o.v = __shfl_xor_sync(0xffffffffu, mn.v, off);
    o.idx = __shfl_xor_sync(0xffffffffu, static_cast<long long>(mn.idx), off);
    mn.merge(o);
  }
  if (lane != 0) return;
  if (!first) {  // the earlier panels hold the lower indices: merge into them, ties keep theirs
    MinAcc<acc_t> prev;
    prev.v = out[r];
    prev.idx = idx[r];
    prev.merge(mn);
    mn = prev;
  }
  out[r] = last ? -mn.v * inv_norm[r] : mn.v;
  idx[r] = mn.idx;
}

template <typename acc_t>
cudaError_t nearest_gram(const GramPanels& gp, const acc_t* inv_norm, acc_t* out, int64_t* idx, int64_t N,
                         int64_t M, cudaStream_t stream) {
  const GramPlan plan = gp.plan;
  acc_t* ws = static_cast<acc_t*>(gp.workspace);
  const acc_t* guard = static_cast<const acc_t*>(gp.guard);
  for (int64_t r0 = 0; r0 < N; r0 += plan.rows) {
    const int64_t rows = N - r0 < plan.rows ? N - r0 : plan.rows;
    for (int64_t j0 = 0; j0 < M; j0 += plan.cols) {
      const int64_t cols = M - j0 < plan.cols ? M - j0 : plan.cols;
      if (gp.gram(gp.ctx, ws, plan.ld, j0 == 0 ? gp.guard : nullptr, r0, rows, j0, cols) != 0)
        return cudaErrorUnknown;
      const unsigned blocks = static_cast<unsigned>((rows + kArgmaxWarps - 1) / kArgmaxWarps);
      argmax_panel_kernel<acc_t><<<blocks, kArgmaxWarps * 32, 0, stream>>>(
          ws, plan.ld, rows, cols, j0, guard, out + r0, idx + r0, inv_norm + r0, j0 == 0, j0 + cols >= M);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

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
                           int64_t N, int64_t D, int64_t M, cuda::MatMode mode, const GramPanels* gram,
                           cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (gram != nullptr) {
    const GramPlan& pl = gram->plan;
    if (gram->gram == nullptr || gram->workspace == nullptr || gram->guard == nullptr || pl.rows <= 0 ||
        pl.cols <= 0 || pl.ld < pl.cols || M <= 0)
      return cudaErrorInvalidValue;
    if (xtype == DType::F64)
      return nearest_gram<double>(*gram, static_cast<const double*>(inv_norm), static_cast<double*>(out), idx, N,
                                  M, stream);
    return nearest_gram<float>(*gram, static_cast<const float*>(inv_norm), static_cast<float*>(out), idx, N, M,
                               stream);
  }
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
