// CUDA schedule of the Mahalanobis ops (pure CUDA: no torch headers; built standalone by
// CMakeLists.txt for sm_80 / sm_90 and into distkern._C by setup.py).
//
// Single Gaussian, forward: one tile-product kernel. Each block centres 64 rows of x as it loads
// them (any strides, fp32/fp16/bf16/fp64 → fp32/fp64), multiplies by the factor tile by tile
// (skipping the zero blocks of a triangular factor), and squares-and-sums z = Wᵀ(x − μ) in
// registers: no N×D or N×R intermediate, x read once from DRAM (re-reads of a 64-row tile hit
// L1/L2).
// Backward: z' = 2g·z into an N×R scratch, then gx = z'·Wᵀ with per-block column sums for ∂μ
// (deterministic: reduced later in a fixed order).
// K Gaussians: per-component factors loop the components inside a block (reductions over K stay
// in registers) or spread them over blockIdx.y (N×K output); a shared factor adds one
// N×D·D×K product to the single-Gaussian pass (see mahalanobis_math.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "common/cuda_types.cuh"
#include "common/tile_gemm.cuh"
#include "mahalanobis/mahalanobis_launch.h"
#include "mahalanobis/mahalanobis_math.h"

namespace distkern {
namespace mahalanobis {
namespace {

using cuda::from_acc;
using cuda::row_lanes_sum;
using cuda::Tri;
using cuda::to_acc;

static_assert(kRowsPerBlock == 64, "the backward runs 4×4 thread tiles: 64 rows per block");

// ---- loaders ---------------------------------------------------------------------------------------

// x centred on mean + p·mean_stride (one mean, or the K means of the components).
template <typename T, typename acc_t>
struct XLoad {
  const T* x;
  int64_t sx0, sx1;
  const acc_t* mean;
  int64_t mean_stride;
  __device__ acc_t operator()(int64_t p, int64_t row, int64_t k, acc_t& guard) const {
    return center(to_acc<acc_t>(x[row * sx0 + k * sx1]), mean[p * mean_stride + k], guard);
  }
};

template <typename acc_t>
struct ZLoad {  // the N×R scratch, row-major
  const acc_t* z;
  int64_t R;
  __device__ acc_t operator()(int64_t, int64_t row, int64_t k, acc_t&) const { return z[row * R + k]; }
};

template <typename acc_t>
struct FactorLoad {  // B = W_p (D×R), W_p at w + p·stride
  const acc_t* w;
  int64_t R, stride;
  __device__ acc_t operator()(int64_t p, int64_t k, int64_t j) const { return w[p * stride + k * R + j]; }
};

template <typename acc_t>
struct FactorTLoad {  // B = Wᵀ (R×D): B[k][j] = W[j][k]
  enum { kKContiguous = 1 };  // B[k][j] is contiguous along k: the tensor-core kernel loads it that way
  const acc_t* w;
  int64_t R;
  __device__ acc_t operator()(int64_t, int64_t k, int64_t j) const { return w[j * R + k]; }
};

// Per-position rows: x[b, p, :] centred on means[p].
template <typename T, typename acc_t>
struct XPosLoad {
  const T* x;
  int64_t sb, sp, sd;
  const acc_t* means;
  int64_t D;
  __device__ acc_t operator()(int64_t p, int64_t b, int64_t k, acc_t& guard) const {
    return center(to_acc<acc_t>(x[b * sb + p * sp + k * sd]), means[p * D + k], guard);
  }
};

// A factor of its own dtype (fp32/fp16/bf16/fp64), converted on load; with lower, the strict
// upper triangle reads as 0 without being read.
template <typename F, typename acc_t>
struct FactorCvtLoad {
  const F* w;
  int64_t R, stride;
  bool lower;
  __device__ acc_t operator()(int64_t p, int64_t k, int64_t j) const {
    return (lower && k < j) ? acc_t(0) : to_acc<acc_t>(w[p * stride + k * R + j]);
  }
};

// ---- epilogues -------------------------------------------------------------------------------------
// Each is Name<acc_t, ...>::Epi<TR, TC>, holding its arguments in `a`, so one launcher can run it
// with either thread-tile shape.

// Blocks an SM for the FMA kernel with a min / logsumexp epilogue: their state and the kernel's prefetch
// registers spill under 80 (3 blocks) at float32 4×4, so 128 registers (2 blocks); float64 kBlocks128 (it
// spills under 128 on sm_80). 0: the kernel's default (no reduction over K, or 8×8 tiles).
template <typename acc_t, KReduce RED, int TR, int TC>
constexpr int reduce_min_blocks() {
  return (RED == KReduce::None || TR * TC > 16) ? 0 : (sizeof(acc_t) > 4 ? cuda::kBlocks128 : 2);
}

// Per-row sums of squares over a problem's columns, reduced over the 16 column threads at the
// end of each problem; what happens to the finished distance is the reduction's business:
//   KReduce::None       out[row·ldo + p] = d²        (single Gaussian: ldo = 1, P = 1)
//   KReduce::Min        running min / argmin over p
//   KReduce::LogSumExp  running logsumexp of bias[p] − d²/2
template <typename acc_t, KReduce RED>
struct SumSq {
  struct Args {
    acc_t* out;
    int64_t* idx;
    const acc_t* bias;
    int64_t M, ldo;
  };
  template <int TR, int TC>
  struct Epi {
    // under 128 registers the tensor-core kernel spills logsumexp, and min with 3xTF32's split operands
    enum { kTcMinBlocks = RED == KReduce::LogSumExp ? 1 : cuda::kBlocks128 };
    enum { kTcSplitMinBlocks = RED == KReduce::None ? cuda::kBlocks128 : 1 };
    enum { kMinBlocks = reduce_min_blocks<acc_t, RED, TR, TC>() };
    Args a;
    struct State {
      acc_t s[TR];
      MinAcc<acc_t> mn[TR];
      LseAcc<acc_t> lse[TR];
    };
    __device__ void init(State& st) const {
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        st.s[i] = 0;
        st.mn[i].init();
        st.lse[i].init();
      }
    }
    __device__ void block(State& st, const acc_t (&c)[TR][TC], int64_t, int64_t, int64_t, acc_t*,
                          const acc_t*) const {
#pragma unroll
      for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TC; ++j) st.s[i] += c[i][j] * c[i][j];
    }
    __device__ void end_problem(State& st, int64_t p, int64_t row_base, const acc_t* guard_rows) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const acc_t v = row_lanes_sum(st.s[i]);
        st.s[i] = 0;
        const int r = ty * TR + i;
        if (tx != 0 || row_base + r >= a.M) continue;
        const acc_t d = mahalanobis::finish(v, guard_rows[r]);
        if (RED == KReduce::None) a.out[(row_base + r) * a.ldo + p] = d;
        if (RED == KReduce::Min) st.mn[i].update(d, p);
        if (RED == KReduce::LogSumExp) st.lse[i].update(a.bias[p] - acc_t(0.5) * d);
      }
    }
    __device__ void finish(State& st, int64_t row_base) const {
      if (RED == KReduce::None) return;
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int64_t row = row_base + ty * TR + i;
        if (tx != 0 || row >= a.M) continue;
        if (RED == KReduce::Min) {
          a.out[row] = st.mn[i].v;
          a.idx[row] = st.mn[i].idx;
        } else {
          a.out[row] = st.lse[i].result();
        }
      }
    }
  };
};

// Shared factor: the cross term (x − center)·B[:, col] combined with ‖z‖² and ‖v_col‖².
template <typename acc_t, KReduce RED>
struct Shared {
  struct Args {
    acc_t* out;
    int64_t* idx;
    const acc_t* zz;
    const acc_t* vv;
    const acc_t* bias;
    int64_t M, K;
  };
  template <int TR, int TC>
  struct Epi {
    enum { kMinBlocks = reduce_min_blocks<acc_t, RED, TR, TC>() };
    Args a;
    struct State {
      MinAcc<acc_t> mn[TR];
      LseAcc<acc_t> lse[TR];
    };
    __device__ void init(State& st) const {
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        st.mn[i].init();
        st.lse[i].init();
      }
    }
    __device__ void block(State& st, const acc_t (&c)[TR][TC], int64_t, int64_t row_base,
                          int64_t j0, acc_t*, const acc_t*) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int64_t row = row_base + ty * TR + i;
        if (row >= a.M) continue;
        const acc_t z2 = a.zz[row];
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t col = j0 + tx * TC + j;
          if (col >= a.K) continue;
          const acc_t d = combine_shared(z2, c[i][j], a.vv[col]);
          if (RED == KReduce::None) a.out[row * a.K + col] = d;
          if (RED == KReduce::Min) st.mn[i].update(d, col);
          if (RED == KReduce::LogSumExp) st.lse[i].update(a.bias[col] - acc_t(0.5) * d);
        }
      }
    }
    __device__ void end_problem(State&, int64_t, int64_t, const acc_t*) const {}
    __device__ void finish(State& st, int64_t row_base) const {
      if (RED == KReduce::None) return;
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        // Combine the 16 column threads of the row (all lanes take part in the shuffles).
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1) {
          if (RED == KReduce::Min) {
            MinAcc<acc_t> o;
            o.v = __shfl_xor_sync(0xffffffffu, st.mn[i].v, off);
            o.idx = __shfl_xor_sync(0xffffffffu, static_cast<long long>(st.mn[i].idx), off);
            st.mn[i].merge(o);
          } else {
            LseAcc<acc_t> o;
            o.m = __shfl_xor_sync(0xffffffffu, st.lse[i].m, off);
            o.s = __shfl_xor_sync(0xffffffffu, st.lse[i].s, off);
            st.lse[i].merge(o);
          }
        }
        const int64_t row = row_base + ty * TR + i;
        if (tx != 0 || row >= a.M) continue;
        if (RED == KReduce::Min) {
          a.out[row] = st.mn[i].v;
          a.idx[row] = st.mn[i].idx;
        } else {
          a.out[row] = st.lse[i].result();
        }
      }
    }
  };
};

// Backward, first product: z' = grad_coef(g)·z (+ guard: NaN for a non-finite row).
template <typename acc_t>
struct ScaleStore {
  struct Args {
    acc_t* z;
    const acc_t* grad;
    int64_t M, R;
  };
  template <int TR, int TC>
  struct Epi {
    Args a;
    struct State {};
    __device__ void init(State&) const {}
    __device__ void block(State&, const acc_t (&c)[TR][TC], int64_t, int64_t row_base, int64_t j0,
                          acc_t*, const acc_t* guard_rows) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int r = ty * TR + i;
        const int64_t row = row_base + r;
        if (row >= a.M) continue;
        const acc_t coef = grad_coef(a.grad[row]) + guard_rows[r];
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t col = j0 + tx * TC + j;
          if (col < a.R) a.z[row * a.R + col] = coef * c[i][j];
        }
      }
    }
    __device__ void end_problem(State&, int64_t, int64_t, const acc_t*) const {}
    __device__ void finish(State&, int64_t) const {}
  };
};

// Backward, second product: gx = z'·Wᵀ stored in x's dtype, and −Σ_rows gx per column block
// into partial[blockIdx.x].
template <typename T, typename acc_t>
struct GradStore {
  struct Args {
    T* gx;
    acc_t* partial;
    int64_t M, D;
  };
  template <int TR, int TC>
  struct Epi {
    Args a;
    struct State {};
    __device__ void init(State&) const {}
    __device__ void block(State&, const acc_t (&c)[TR][TC], int64_t, int64_t row_base, int64_t j0,
                          acc_t* scratch, const acc_t*) const {
      constexpr int BN = 16 * TC;
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int64_t row = row_base + ty * TR + i;
        if (row >= a.M) continue;
#pragma unroll
        for (int j = 0; j < TC; ++j) {
          const int64_t col = j0 + tx * TC + j;
          if (col < a.D) a.gx[row * a.D + col] = from_acc<T>(c[i][j]);
        }
      }
      // Rows past M hold zeros (their A loads were 0), so they add nothing to the column sums.
#pragma unroll
      for (int j = 0; j < TC; ++j) {
        acc_t s = 0;
#pragma unroll
        for (int i = 0; i < TR; ++i) s += c[i][j];
        scratch[ty * BN + tx * TC + j] = s;
      }
      __syncthreads();
      if (threadIdx.x < BN) {
        acc_t s = 0;
#pragma unroll
        for (int t = 0; t < 16; ++t) s += scratch[t * BN + threadIdx.x];
        const int64_t col = j0 + threadIdx.x;
        if (col < a.D) a.partial[static_cast<int64_t>(blockIdx.x) * a.D + col] = -s;
      }
      __syncthreads();
    }
    __device__ void end_problem(State&, int64_t, int64_t, const acc_t*) const {}
    __device__ void finish(State&, int64_t) const {}
  };
};

// ---- typed launchers ---------------------------------------------------------------------------

// Thread-tile choice: 4×4 (64×64 tiles) unless set_tile_config forces 8×8 (128×128; tests run
// both). Measured on an H100 (benchmarks/results, 2026-11-27) with scalar fragment reads, 8×8 was
// 10% faster at D = 1024 but 11% slower at D = 256 (a triangular factor wastes more of a 128-wide
// diagonal block) and slower for the N×K cross product at K = 100. Since the fragment reads are
// 128-bit, the 4×4 tile no longer pays twice the shared-memory traffic per FMA, and the 8×8 kernel
// takes 160-210 registers (one block an SM), so Auto stays on 4×4 until a GPU run says otherwise.
// mahalanobis_pos with B ≤ 32 rows runs 2×4 tiles (32×64): a 64-row tile would spend half its
// FMAs on padding rows.
int g_tile_config = 0;  // 0 auto, 1 small, 2 large

template <typename acc_t, template <int, int> class Epi, typename A, typename B, typename EArgs>
cudaError_t launch(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P, int64_t ppb, A a, B b,
                   const EArgs& e, cuda::MatMode mode, cudaStream_t stream, bool allow_large = true) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mode != cuda::MatMode::Fma)  // tensor cores: 64×64 blocks only
      return cuda::launch_tile_gemm_rows_mode<acc_t, 4, 4, Epi>(mode, M, K, Ncols, tri, P, ppb, a, b, e, stream);
    const bool large = allow_large && g_tile_config == 2;
    if (large) return cuda::launch_tile_gemm_rows<acc_t, 8, 8, Epi>(M, K, Ncols, tri, P, ppb, a, b, e, stream);
  }
  return cuda::launch_tile_gemm_rows<acc_t, 4, 4, Epi>(M, K, Ncols, tri, P, ppb, a, b, e, stream);
}

template <typename T, typename acc_t>
cudaError_t forward_typed(const void* x, int64_t sx0, int64_t sx1, const void* mean,
                          const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                          bool lower, cuda::MatMode mode, cudaStream_t stream) {
  XLoad<T, acc_t> a{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(mean), 0};
  FactorLoad<acc_t> b{static_cast<const acc_t*>(factor), R, 0};
  using S = SumSq<acc_t, KReduce::None>;
  const typename S::Args e{static_cast<acc_t*>(out), nullptr, nullptr, N, 1};
  return launch<acc_t, S::template Epi>(N, D, R, lower ? Tri::Lower : Tri::None, 1, 1, a, b, e, mode, stream);
}

template <typename T, typename acc_t>
cudaError_t backward_typed(const void* x, int64_t sx0, int64_t sx1, const void* grad,
                           const void* mean, const void* factor, void* z, void* gx, void* partial,
                           int64_t N, int64_t D, int64_t R, bool lower, cuda::MatMode mode, cudaStream_t stream) {
  const acc_t* w = static_cast<const acc_t*>(factor);
  XLoad<T, acc_t> a1{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(mean), 0};
  FactorLoad<acc_t> b1{w, R, 0};
  const typename ScaleStore<acc_t>::Args e1{static_cast<acc_t*>(z), static_cast<const acc_t*>(grad), N, R};
  cudaError_t err = launch<acc_t, ScaleStore<acc_t>::template Epi>(N, D, R, lower ? Tri::Lower : Tri::None, 1,
                                                                   1, a1, b1, e1, mode, stream, false);
  if (err != cudaSuccess) return err;
  ZLoad<acc_t> a2{static_cast<const acc_t*>(z), R};
  FactorTLoad<acc_t> b2{w, R};
  const typename GradStore<T, acc_t>::Args e2{static_cast<T*>(gx), static_cast<acc_t*>(partial), N, D};
  return launch<acc_t, GradStore<T, acc_t>::template Epi>(N, R, D, lower ? Tri::Upper : Tri::None, 1, 1, a2,
                                                           b2, e2, mode, stream, false);
}

template <typename T, typename acc_t, KReduce RED>
cudaError_t k_components_typed(const void* x, int64_t sx0, int64_t sx1, const void* means,
                               const void* factors, const void* bias, void* out, int64_t* idx,
                               int64_t N, int64_t D, int64_t R, int64_t K, bool lower,
                               cuda::MatMode mode, cudaStream_t stream) {
  XLoad<T, acc_t> a{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(means), D};
  FactorLoad<acc_t> b{static_cast<const acc_t*>(factors), R, D * R};
  using S = SumSq<acc_t, RED>;
  const typename S::Args e{static_cast<acc_t*>(out), idx, static_cast<const acc_t*>(bias), N, K};
  // The N×K output spreads the components over blockIdx.y; a reduction keeps them in one block.
  const int64_t ppb = RED == KReduce::None ? (K + 65534) / 65535 : K;
  return launch<acc_t, S::template Epi>(N, D, R, lower ? Tri::Lower : Tri::None, K, ppb, a, b, e, mode, stream);
}

template <typename T, typename acc_t, KReduce RED>
cudaError_t k_shared_typed(const void* x, int64_t sx0, int64_t sx1, const void* center,
                           const void* bmat, const void* zz, const void* vv, const void* bias,
                           void* out, int64_t* idx, int64_t N, int64_t D, int64_t K,
                           cuda::MatMode mode, cudaStream_t stream) {
  XLoad<T, acc_t> a{static_cast<const T*>(x), sx0, sx1, static_cast<const acc_t*>(center), 0};
  FactorLoad<acc_t> b{static_cast<const acc_t*>(bmat), K, 0};
  using S = Shared<acc_t, RED>;
  const typename S::Args e{static_cast<acc_t*>(out), idx, static_cast<const acc_t*>(zz),
                           static_cast<const acc_t*>(vv), static_cast<const acc_t*>(bias), N, K};
  return launch<acc_t, S::template Epi>(N, D, K, Tri::None, 1, 1, a, b, e, mode, stream);
}

template <typename T, typename F, typename acc_t>
cudaError_t positions_typed(const void* x, int64_t sb, int64_t sp, int64_t sd, const void* means,
                            const void* factors, void* out, int64_t B, int64_t P, int64_t D,
                            int64_t R, bool lower, cuda::MatMode mode, cudaStream_t stream) {
  XPosLoad<T, acc_t> a{static_cast<const T*>(x), sb, sp, sd, static_cast<const acc_t*>(means), D};
  FactorCvtLoad<F, acc_t> b{static_cast<const F*>(factors), R, D * R, lower};
  using S = SumSq<acc_t, KReduce::None>;
  const typename S::Args e{static_cast<acc_t*>(out), nullptr, nullptr, B, P};
  const int64_t ppb = (P + 65534) / 65535;
  const Tri tri = lower ? Tri::Lower : Tri::None;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mode == cuda::MatMode::Fma && B <= 32 && g_tile_config == 0)
      return cuda::launch_tile_gemm_rows<acc_t, 2, 4, S::template Epi>(B, D, R, tri, P, ppb, a, b, e, stream);
  }
  return launch<acc_t, S::template Epi>(B, D, R, tri, P, ppb, a, b, e, mode, stream);
}

// ---- Gram panels (launch_forward_panels, launch_positions_panels) ----------------------------------------

constexpr int kPanelWarps = 8;  // warps a block of the panels' row kernels

// The panels' rows, for both forwards: (position, image) pairs, position-major — row r = p·B + b of the panel
// starting at position p0 holds x[b, p0 + p] (the single-Gaussian forward: one position, B = the panel's rows,
// x from the panel's first row, sp = 0).

// xc = x − means for a panel's rows (float32, rows × D) and each row's guard; one warp a row, lanes along the
// features (for x whose features are close in memory: a contiguous (N, D) or (B, P, D)).
template <typename T>
__global__ void __launch_bounds__(kPanelWarps * 32)
    center_rows_kernel(const T* __restrict__ x, int64_t sb, int64_t sp, int64_t sd, const float* __restrict__ means,
                       int64_t p0, int64_t B, int64_t D, float* __restrict__ xc, float* __restrict__ guard,
                       int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kPanelWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps
  const int64_t p = p0 + r / B, b = r % B;
  const T* xr = x + b * sb + p * sp;
  const float* mr = means + p * D;
  const int lane = threadIdx.x % 32;
  float g = 0;
#pragma unroll 4
  for (int64_t k = lane; k < D; k += 32) xc[r * D + k] = center(to_acc<float>(xr[k * sd]), mr[k], g);
  g = cuda::warp_sum(g);
  if (lane == 0) guard[r] = g;
}

// The same through a shared-memory transpose, for x whose positions are closer in memory than its features
// (PaDiM's (B, P, D) view of a (B, D, H·W) embedding: positions contiguous, features H·W apart), where a warp
// along the features would read one element per 32-byte sector. A block takes 32 positions of one image b,
// 32 features at a time: lanes read along the positions, then write xc's rows along the features. 256 threads:
// lane l of warp w reads features k0 + w + 8j (j < 4) at position l, and writes position w + 8j at feature
// k0 + l; each row's guard is summed in registers over the k steps, then over the warp's lanes.
template <typename T>
__global__ void __launch_bounds__(256)
    center_pos_tiles_kernel(const T* __restrict__ x, int64_t sb, int64_t sp, int64_t sd,
                            const float* __restrict__ means, int64_t p0, int64_t n, int64_t B, int64_t D,
                            float* __restrict__ xc, float* __restrict__ guard) {
  __shared__ float tile[32][33];  // [feature][position], padded: the column reads hit 32 banks
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int64_t pb = static_cast<int64_t>(blockIdx.x) * 32;  // first position of the block, within the panel
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float g[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t k0 = 0; k0 < D; k0 += 32) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + w + 8 * j, p = pb + lane;
        tile[w + 8 * j][lane] = (k < D && p < n) ? to_acc<float>(x[b * sb + (p0 + p) * sp + k * sd]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t p = pb + w + 8 * j, k = k0 + lane;
        if (k < D && p < n) xc[(p * B + b) * D + k] = center(tile[lane][w + 8 * j], means[(p0 + p) * D + k], g[j]);
      }
      __syncthreads();  // the tile is rewritten by the next k step
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float gs = cuda::warp_sum(g[j]);
      const int64_t p = pb + w + 8 * j;
      if (lane == 0 && p < n) guard[p * B + b] = gs;
    }
  }
}

// out[b·P + p0 + p] = Σ z² + guard for a panel's rows (the single-Gaussian forward: P = 1, out[r]); one warp a
// row, lanes along z's row, a fixed order of sums.
__global__ void __launch_bounds__(kPanelWarps * 32)
    sumsq_rows_kernel(const float* __restrict__ z, int64_t R, const float* __restrict__ guard,
                      float* __restrict__ out, int64_t p0, int64_t B, int64_t P, int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kPanelWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  float s = 0;
#pragma unroll 4
  for (int64_t k = lane; k < R; k += 32) s += z[r * R + k] * z[r * R + k];
  s = cuda::warp_sum(s);
  if (lane == 0) out[(r % B) * P + p0 + r / B] = finish(s, guard[r]);
}

template <typename T>
cudaError_t forward_panels_typed(const void* xv, int64_t sx0, int64_t sx1, const float* mean, float* out, int64_t N,
                                 int64_t D, int64_t R, bool lower, const FwdPanels& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  for (int64_t r0 = 0; r0 < N; r0 += p.rows) {
    const int64_t rows = N - r0 < p.rows ? N - r0 : p.rows;
    const unsigned blocks = static_cast<unsigned>((rows + kPanelWarps - 1) / kPanelWarps);
    center_rows_kernel<T><<<blocks, kPanelWarps * 32, 0, stream>>>(x + r0 * sx0, sx0, 0, sx1, mean, 0, rows, D, p.xc,
                                                                    p.guard, rows);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (lower) {
      for (int64_t c0 = 0; c0 < D; c0 += p.block)
        if (p.gemm(p.ctx, rows, c0, c0, D - c0 < p.block ? D - c0 : p.block) != 0) return cudaErrorUnknown;
    } else if (p.gemm(p.ctx, rows, 0, 0, R) != 0) {
      return cudaErrorUnknown;
    }
    sumsq_rows_kernel<<<blocks, kPanelWarps * 32, 0, stream>>>(p.z, R, p.guard, out + r0, 0, rows, 1, rows);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t positions_panels_typed(const void* xv, int64_t sb, int64_t sp, int64_t sd, const float* means,
                                   float* out, int64_t B, int64_t P, int64_t D, int64_t R, bool lower,
                                   const PosPanels& pp, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  const bool transpose = (sp < 0 ? -sp : sp) < (sd < 0 ? -sd : sd);
  for (int64_t p0 = 0; p0 < P; p0 += pp.positions) {
    const int64_t n = P - p0 < pp.positions ? P - p0 : pp.positions, rows = n * B;
    const unsigned blocks = static_cast<unsigned>((rows + kPanelWarps - 1) / kPanelWarps);
    if (transpose) {
      const dim3 grid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(B < 65535 ? B : 65535));
      center_pos_tiles_kernel<T><<<grid, 256, 0, stream>>>(x, sb, sp, sd, means, p0, n, B, D, pp.xc, pp.guard);
    } else {
      center_rows_kernel<T><<<blocks, kPanelWarps * 32, 0, stream>>>(x, sb, sp, sd, means, p0, B, D, pp.xc, pp.guard,
                                                                      rows);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (lower) {
      for (int64_t c0 = 0; c0 < D; c0 += pp.block)
        if (pp.gemm(pp.ctx, p0, n, c0, c0, D - c0 < pp.block ? D - c0 : pp.block) != 0) return cudaErrorUnknown;
    } else if (pp.gemm(pp.ctx, p0, n, 0, 0, R) != 0) {
      return cudaErrorUnknown;
    }
    sumsq_rows_kernel<<<blocks, kPanelWarps * 32, 0, stream>>>(pp.z, R, pp.guard, out, p0, B, P, rows);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// dtype × reduction dispatch
template <template <typename, typename, KReduce> class F, typename... Args>
cudaError_t dispatch(DType xtype, KReduce red, Args... args) {
#define DK_RED(T, A)                                                          \
  switch (red) {                                                              \
    case KReduce::None: return F<T, A, KReduce::None>::run(args...);          \
    case KReduce::Min: return F<T, A, KReduce::Min>::run(args...);            \
    case KReduce::LogSumExp: return F<T, A, KReduce::LogSumExp>::run(args...); \
  }                                                                           \
  return cudaErrorInvalidValue;
  switch (xtype) {
    case DType::F32: { DK_RED(float, float) }
    case DType::F16: { DK_RED(__half, float) }
    case DType::BF16: { DK_RED(__nv_bfloat16, float) }
    case DType::F64: { DK_RED(double, double) }
  }
#undef DK_RED
  return cudaErrorInvalidValue;
}

template <typename T, typename A, KReduce R>
struct KComponents {
  template <typename... Args>
  static cudaError_t run(Args... args) { return k_components_typed<T, A, R>(args...); }
};
template <typename T, typename A, KReduce R>
struct KShared {
  template <typename... Args>
  static cudaError_t run(Args... args) { return k_shared_typed<T, A, R>(args...); }
};
template <typename T, typename A, KReduce R>
struct Forward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return forward_typed<T, A>(args...); }
};
template <typename T, typename A, KReduce R>
struct Backward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return backward_typed<T, A>(args...); }
};

}  // namespace

void set_tile_config(int config) { g_tile_config = config; }
int tile_config() { return g_tile_config; }

cudaError_t launch_forward(DType xtype, const void* x, int64_t sx0, int64_t sx1, const void* mean,
                           const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                           bool lower, cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  return dispatch<Forward>(xtype, KReduce::None, x, sx0, sx1, mean, factor, out, N, D, R, lower, mode, stream);
}

cudaError_t launch_forward_panels(DType xtype, const void* x, int64_t sx0, int64_t sx1, const float* mean,
                                  float* out, int64_t N, int64_t D, int64_t R, bool lower, const FwdPanels& p,
                                  cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (p.gemm == nullptr || p.xc == nullptr || p.z == nullptr || p.guard == nullptr || p.rows <= 0 ||
      (lower && (p.block <= 0 || R != D)))
    return cudaErrorInvalidValue;
  switch (xtype) {
    case DType::F32: return forward_panels_typed<float>(x, sx0, sx1, mean, out, N, D, R, lower, p, stream);
    case DType::F16: return forward_panels_typed<__half>(x, sx0, sx1, mean, out, N, D, R, lower, p, stream);
    case DType::BF16: return forward_panels_typed<__nv_bfloat16>(x, sx0, sx1, mean, out, N, D, R, lower, p, stream);
    case DType::F64: break;  // float64 accumulates in double: the tile kernel
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_positions_panels(DType xtype, const void* x, int64_t sb, int64_t sp, int64_t sd,
                                    const float* means, float* out, int64_t B, int64_t P, int64_t D, int64_t R,
                                    bool lower, const PosPanels& p, cudaStream_t stream) {
  if (B <= 0 || P <= 0) return cudaSuccess;
  if (p.gemm == nullptr || p.xc == nullptr || p.z == nullptr || p.guard == nullptr || p.positions <= 0 ||
      (lower && (p.block <= 0 || R != D)))
    return cudaErrorInvalidValue;
  switch (xtype) {
    case DType::F32: return positions_panels_typed<float>(x, sb, sp, sd, means, out, B, P, D, R, lower, p, stream);
    case DType::F16: return positions_panels_typed<__half>(x, sb, sp, sd, means, out, B, P, D, R, lower, p, stream);
    case DType::BF16:
      return positions_panels_typed<__nv_bfloat16>(x, sb, sp, sd, means, out, B, P, D, R, lower, p, stream);
    case DType::F64: break;  // float64 accumulates in double: the tile kernel
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* grad, const void* mean, const void* factor, void* z,
                            void* gx, void* partial, int64_t N, int64_t D, int64_t R, bool lower,
                            cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  return dispatch<Backward>(xtype, KReduce::None, x, sx0, sx1, grad, mean, factor, z, gx, partial,
                            N, D, R, lower, mode, stream);
}

cudaError_t launch_k_components(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                const void* means, const void* factors, const void* bias,
                                void* out, int64_t* idx, int64_t N, int64_t D, int64_t R,
                                int64_t K, bool lower, KReduce reduce, cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0 || K <= 0) return cudaSuccess;
  return dispatch<KComponents>(xtype, reduce, x, sx0, sx1, means, factors, bias, out, idx, N, D, R,
                               K, lower, mode, stream);
}

cudaError_t launch_positions(DType xtype, DType ftype, const void* x, int64_t sb, int64_t sp,
                             int64_t sd, const void* means, const void* factors, void* out,
                             int64_t B, int64_t P, int64_t D, int64_t R, bool lower,
                             cuda::MatMode mode, cudaStream_t stream) {
  if (B <= 0 || P <= 0) return cudaSuccess;
  const auto args = [&](auto tx, auto tf) {
    using T = decltype(tx);
    using F = decltype(tf);
    return positions_typed<T, F, float>(x, sb, sp, sd, means, factors, out, B, P, D, R, lower, mode, stream);
  };
  if (xtype == DType::F64) {
    if (ftype != DType::F64) return cudaErrorInvalidValue;
    return positions_typed<double, double, double>(x, sb, sp, sd, means, factors, out, B, P, D, R, lower, mode, stream);
  }
#define DK_F(T)                                        \
  switch (ftype) {                                     \
    case DType::F32: return args(T{}, float{});        \
    case DType::F16: return args(T{}, __half{});       \
    case DType::BF16: return args(T{}, __nv_bfloat16{}); \
    default: return cudaErrorInvalidValue;             \
  }
  switch (xtype) {
    case DType::F32: DK_F(float)
    case DType::F16: DK_F(__half)
    case DType::BF16: DK_F(__nv_bfloat16)
    default: return cudaErrorInvalidValue;
  }
#undef DK_F
}

cudaError_t launch_k_shared(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* center, const void* bmat, const void* zz, const void* vv,
                            const void* bias, void* out, int64_t* idx, int64_t N, int64_t D,
                            int64_t K, KReduce reduce, cuda::MatMode mode, cudaStream_t stream) {
  if (N <= 0 || K <= 0) return cudaSuccess;
  return dispatch<KShared>(xtype, reduce, x, sx0, sx1, center, bmat, zz, vv, bias, out, idx, N, D,
                           K, mode, stream);
}

}  // namespace mahalanobis
}  // namespace distkern
