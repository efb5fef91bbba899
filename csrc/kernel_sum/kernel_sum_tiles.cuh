// CUDA schedules of kernel_matmul (pure CUDA), shared by the launcher files of each input dtype
// (kernel_sum_kernel.cu: float32 and the dispatch; kernel_sum_f16_kernel.cu, kernel_sum_bf16_kernel.cu),
// so the three sets of kernels compile in parallel.
//
// Fused (C ≤ 64): flash-style, a block owns 64 rows of x and 64 output columns of v; for each
// 64-wide block of y it forms the x·y tile with the shared tile skeleton, applies φ in the epilogue
// into shared memory, and multiplies that K tile by the matching rows of v into register
// accumulators. With C ≤ TC (4 on the default tiles) φ's values stay in the registers that hold
// them: each thread adds k·v over its own columns, and a row's 16 threads are summed once at the end.
// K never leaves the block; x's centred squared norms come for free from the first column block's
// loads (the skeleton's per-row guard).
//
// Panels (C > 64, with a workspace): the fused schedule would form every x·y tile and φ once per
// 64 columns of v — 16 times at a 1000-permutation mmd_test, 32 times in the backward at D = 2048
// (v is M×(C·D) there). Instead K is written one bounded panel at a time (kernel_panel_plan: at
// most 2048 × 8192 floats, 64 MiB) by the same tile skeleton with a storing epilogue, and the
// caller's GEMM adds panel · v[cols] to the panel's output rows: per pair, one x·y product, one φ,
// 8 bytes of panel traffic and the 2C flops of the GEMM, which a BLAS runs near its peak.
//
// Gram panels (large D, any C; see kernel_sum_launch.h): the caller's GEMM writes x·y for the panel,
// phi_panel_kernel applies φ in place, and the GEMM by v follows as above.
#pragma once

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

// φ of the pair (row of x, column gm of y) from its x·y product: r² from the centred norms, again from
// the coordinates (x from its loader, y from L2) for the rare pairs that form does not resolve.
template <typename T>
__device__ __forceinline__ float pair_phi(const Params& kp, float dot, float xx, float yy, const XCLoad<T>& x,
                                          int64_t row, const float* yc_row, int64_t D) {
  float r2 = 0.f;
  if (uses_distance(kp.kind)) {
    r2 = sq_dist(xx, yy, dot);
    if (needs_exact_r2(r2, xx, yy, kp.exact_frac)) {
      float sq = 0.f;
      r2 = 0.f;
      for (int64_t q = 0; q < D; ++q) {
        const float d = x(0, row, q, sq) - yc_row[q];
        r2 += d * d;
      }
    }
  }
  return phi(kp, r2, dot);
}

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
    // Up to 128 registers (the FMA kernel's default 80 spills this epilogue's per-bandwidth state);
    // the tensor-core kernel's 3xTF32 split operands spill it under 128.
    enum { kMinBlocks = cuda::kBlocks128 };
    enum { kTcSplitMinBlocks = 1 };
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
      // Few columns of v (MMD, KDE, the permutation test's statistic: C = 1): each thread multiplies its
      // own TR×TC values of K by v in registers, st.o[i][q] for output column q, and the 16 threads of a
      // row are summed at the end of the problem. The K tile through shared memory (C > TC) costs
      // BN·TR·TC FMAs a thread per block of y, for C of its columns: at D = 64 as many as the x·y
      // product itself. (One loop for both, so φ is inlined once: ptxas time and registers.)
      const bool in_regs = a.C <= TC;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int r = ty * TR + i;
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int m = tx * TC + j;
          const int64_t gm = j0 + m;
          float k = 0.f;
          if (row_base + r < a.N && gm < a.M)
            k = pair_phi(a.kp, c[i][j], xx[r], a.yy[gm], a.x, row_base + r, a.yc + gm * a.D, a.D);
          if (!in_regs) {
            Ks[r][m] = k;
          } else if (gm < a.M) {
#pragma unroll
            for (int q = 0; q < TC; ++q)
              if (q < a.C) st.o[i][q] += k * (a.v ? a.v[gm * a.C + q] : 1.f);
          }
        }
      }
      if (in_regs) return;
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
      if (a.C <= TC) {
        // The row's 16 partial sums sit in the 16 adjacent lanes tx = 0..15 (threadIdx.x % 16): a fixed
        // xor tree, so the order of the additions, and the result, is the same on every run.
#pragma unroll
        for (int i = 0; i < TR; ++i) {
          const int64_t row = row_base + ty * TR + i;
#pragma unroll
          for (int q = 0; q < TC; ++q) {
            float s = st.o[i][q];
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            s += __shfl_xor_sync(0xffffffffu, s, 4);
            s += __shfl_xor_sync(0xffffffffu, s, 8);
            if (tx == 0 && q < a.C && row < a.N) a.out[row * a.C + q] = s;
            st.o[i][q] = 0.f;
          }
        }
        return;
      }
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

struct PanelYT {  // B[k][j] = yc[j][k] for column slab p of width W, clamped to the panel's cols
  enum { kKContiguous = 1 };
  const float* yc;
  int64_t D, W, cols;
  __device__ float operator()(int64_t p, int64_t k, int64_t j) const {
    const int64_t m = p * W + j;
    return yc[(m < cols ? m : cols - 1) * D + k];
  }
};

// K panel: problem p is the column slab [p·W, (p + 1)·W) of the panel (W a multiple of the block's
// 64 columns, so a thread's columns never straddle two slabs); φ goes straight from the accumulators
// to out[row · ld + column] (16-byte stores where the row allows).
static_assert(kPanelSlab % 64 == 0, "panel slabs are whole 64-column blocks");
template <typename T>
struct KPanel {
  struct Args {
    float* out;
    int64_t ld;
    const float* yy;
    Params kp;
    int64_t N, M, W;  // panel rows, panel columns, slab width
    XCLoad<T> x;      // for the exact r² of near-coincident pairs (needs_exact_r2)
    const float* yc;
    int64_t D;
  };
  template <int TR, int TC>
  struct Epi {
    enum { kMinBlocks = cuda::kBlocks128 };  // 80 registers spill φ's per-bandwidth loop, as in KV
    Args a;
    struct State {};
    __device__ void init(State&) const {}
    __device__ void block(State&, const float (&c)[TR][TC], int64_t p, int64_t row_base, int64_t j0, float*,
                          const float* xx) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
      const int64_t col0 = p * a.W + j0 + tx * TC;  // this thread's first column in the panel
      const bool whole = col0 + TC <= a.M;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int r = ty * TR + i;
        const int64_t row = row_base + r;
        if (row >= a.N) continue;
        float k[TC];
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t gm = col0 + j;
          k[j] = gm < a.M ? pair_phi(a.kp, c[i][j], xx[r], a.yy[gm], a.x, row, a.yc + gm * a.D, a.D) : 0.f;
        }
        float* dst = a.out + row * a.ld + col0;
        if constexpr (TC == 4) {
          if (whole && a.ld % 4 == 0 && col0 % 4 == 0) {
            *reinterpret_cast<float4*>(dst) = make_float4(k[0], k[1], k[2], k[3]);
            continue;
          }
        }
#pragma unroll
        for (int j = 0; j < TC; ++j)
          if (col0 + j < a.M) dst[j] = k[j];
      }
    }
    __device__ void end_problem(State&, int64_t, int64_t, const float*) const {}
    __device__ void finish(State&, int64_t) const {}
  };
};

// Gram panel: K = φ(G) in place, where the caller's GEMM wrote G = (x − center)·ycᵀ over the panel and
// xx the rows' centred squared norms. Block (x, y) = 256 threads over 1024 columns of row y, 4 consecutive
// columns a thread (one 16-byte load and store where the row allows); near-coincident pairs take r² from
// the coordinates as in the tile schedules (pair_phi). Memory-bound: 8 bytes a pair, and φ.
constexpr int kPhiThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kPhiThreads) phi_panel_kernel(float* __restrict__ K, int64_t ld,
                                                                const float* __restrict__ xx,
                                                                const float* __restrict__ yy, Params kp,
                                                                int64_t cols, XCLoad<T> x, const float* yc,
                                                                int64_t D) {
  const int64_t r = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kPhiThreads + threadIdx.x) * 4;
  if (c0 >= cols) return;
  float* row = K + r * ld;
  const float xr = xx[r];
  if (c0 + 4 <= cols && ld % 4 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    float4 g = *reinterpret_cast<const float4*>(row + c0);
    g.x = pair_phi(kp, g.x, xr, yy[c0], x, r, yc + c0 * D, D);
    g.y = pair_phi(kp, g.y, xr, yy[c0 + 1], x, r, yc + (c0 + 1) * D, D);
    g.z = pair_phi(kp, g.z, xr, yy[c0 + 2], x, r, yc + (c0 + 2) * D, D);
    g.w = pair_phi(kp, g.w, xr, yy[c0 + 3], x, r, yc + (c0 + 3) * D, D);
    *reinterpret_cast<float4*>(row + c0) = g;
    return;
  }
  for (int64_t c = c0; c < c0 + 4 && c < cols; ++c) row[c] = pair_phi(kp, row[c], xr, yy[c], x, r, yc + c * D, D);
}

template <typename T>
cudaError_t typed_panels(const void* x, int64_t sx0, int64_t sx1, const float* center, const float* yc,
                         const float* yy, int64_t N, int64_t M, int64_t D, const Params& kp, cuda::MatMode mode,
                         const PanelGemm& gemm, cudaStream_t stream) {
  const PanelPlan plan = gemm.plan;
  const T* xt = static_cast<const T*>(x);
  for (int64_t r0 = 0; r0 < N; r0 += plan.rows) {
    const int64_t rows = N - r0 < plan.rows ? N - r0 : plan.rows;
    const XCLoad<T> a{xt + r0 * sx0, sx0, sx1, center};
    for (int64_t j0 = 0; j0 < M; j0 += plan.cols) {
      const int64_t cols = M - j0 < plan.cols ? M - j0 : plan.cols;
      const float* ycp = yc + j0 * D;
      if (plan.gram) {
        if (gemm.gram(gemm.ctx, gemm.workspace, plan.ld, j0 == 0 ? gemm.xx : nullptr, r0, rows, j0, cols) != 0)
          return cudaErrorUnknown;
        const dim3 grid(static_cast<unsigned>((cols + 4 * kPhiThreads - 1) / (4 * kPhiThreads)),
                        static_cast<unsigned>(rows));
        phi_panel_kernel<T><<<grid, kPhiThreads, 0, stream>>>(gemm.workspace, plan.ld, gemm.xx, yy + j0, kp, cols,
                                                               a, ycp, D);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
      } else {
        const PanelYT b{ycp, D, kPanelSlab, cols};
        const typename KPanel<T>::Args e{gemm.workspace, plan.ld, yy + j0, kp, rows, cols, kPanelSlab, a, ycp, D};
        const int64_t slabs = (cols + kPanelSlab - 1) / kPanelSlab;
        const cudaError_t err = cuda::launch_tile_gemm_rows_mode<float, 4, 4, KPanel<T>::template Epi>(
            mode, rows, D, kPanelSlab, cuda::Tri::None, slabs, 1, a, b, e, stream);
        if (err != cudaSuccess) return err;
      }
      if (gemm.fn(gemm.ctx, gemm.workspace, plan.ld, r0, rows, j0, cols, j0 > 0) != 0) return cudaErrorUnknown;
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t typed(const void* x, int64_t sx0, int64_t sx1, const float* center, const float* yc,
                  const float* yy, const float* v, float* out, int64_t N, int64_t M, int64_t D,
                  int64_t C, const Params& kp, cuda::MatMode mode, const PanelGemm* gemm, cudaStream_t stream) {
  if (gemm != nullptr) return typed_panels<T>(x, sx0, sx1, center, yc, yy, N, M, D, kp, mode, *gemm, stream);
  XCLoad<T> a{static_cast<const T*>(x), sx0, sx1, center};
  YTLoad b{yc, D};
  const typename KV<T>::Args e{out, v, yy, kp, N, M, C, a, yc, D};
  static_assert(KV<T>::template Epi<4, 4>::BN == 64, "a problem is 64 output columns: the launch below is <4, 4>");
  const int64_t chunks = (C + 63) / 64;          // output columns per problem: 64
  const int64_t ppb = (chunks + 65534) / 65535;  // problems per block: gridDim.y stays ≤ 65535 for any C
  return cuda::launch_tile_gemm_rows_mode<float, 4, 4, KV<T>::template Epi>(mode, N, D, M, cuda::Tri::None, chunks,
                                                                            ppb, a, b, e, stream);
}

}  // namespace

// The fused or panel schedule for inputs of type T (kernel_sum_kernel.cu's dispatch calls the
// 16-bit ones through these, each defined in its own file).
#define DISTKERN_KSUM_TYPED_ARGS                                                                              \
  const void *x, int64_t sx0, int64_t sx1, const float *center, const float *yc, const float *yy,             \
      const float *v, float *out, int64_t N, int64_t M, int64_t D, int64_t C, const Params &kp,               \
      cuda::MatMode mode, const PanelGemm *gemm, cudaStream_t stream
cudaError_t kernel_matmul_f16(DISTKERN_KSUM_TYPED_ARGS);
cudaError_t kernel_matmul_bf16(DISTKERN_KSUM_TYPED_ARGS);

}  // namespace kernel_sum
}  // namespace distkern
