// Launcher of the kernel_matmul CUDA kernel on raw pointers and a stream (no torch types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"
#include "kernel_sum/kernel_math.h"

namespace distkern {
namespace kernel_sum {

// K in panels of at most rows × cols (float32, leading dimension ld), each followed by the caller's
// GEMM; rows = 0: the fused schedule (C ≤ 64, one pass over v's columns per x·y tile). Two ways to
// fill a panel:
// - tiles (gram = false; many columns of v, C > 64): distkern's tile kernel forms x·y and φ;
// - Gram (gram = true; large D, any C): the caller's GEMM writes G = (x − center)·ycᵀ and the row
//   norms, and a φ kernel turns G into K in place. At large D the products dominate and a BLAS runs
//   them near the GPU's peak (TF32 tensor cores when the matmul mode is TF32), where the tile
//   kernels reach a fraction of it; the price is 16 bytes of panel traffic a pair (G written, read,
//   K written, read by the GEMM after it), which the 2D flops a pair outweigh from D ≈ 128–256 on.
struct PanelPlan {
  int64_t rows, cols, ld;
  bool gram = false;
};
constexpr int64_t kPanelMinC = 65;      // from two 64-column chunks of v on, a panel + GEMM costs less
constexpr int64_t kPanelRows = 2048;    // panel bounds: 2048 × 8192 floats = 64 MiB of workspace
constexpr int64_t kPanelCols = 8192;
constexpr int64_t kPanelSlab = 256;     // columns per block of the panel kernel
constexpr int64_t kGramMinD = 256;      // the automatic schedule's switch to Gram panels (not yet measured)

// The schedule of kernel_matmul on CUDA: automatic (Gram panels from D ≥ kGramMinD, else fused for
// C ≤ 64 and tile panels above), or one forced for every D (benchmarks and tests).
enum class Schedule : int { Auto = 0, Tiles = 1, Gram = 2 };
inline bool use_gram(int64_t D, Schedule s) { return s == Schedule::Gram || (s == Schedule::Auto && D >= kGramMinD); }

inline PanelPlan kernel_panel_plan(int64_t N, int64_t M, int64_t C, bool gram = false) {
  if ((C < kPanelMinC && !gram) || N <= 0 || M <= 0) return {0, 0, 0, false};
  const int64_t rows = N < kPanelRows ? N : kPanelRows, cols = M < kPanelCols ? M : kPanelCols;
  return {rows, cols, (cols + 3) / 4 * 4, gram};  // rows of 16-byte multiples: vector stores
}

// The GEMMs around each panel, supplied by the caller (cuBLAS through ATen; plain CPU loops in the
// emulation tests):
// - fn: out[r0 : r0 + rows, :] (+)= K[0 : rows, 0 : cols] @ v[j0 : j0 + cols, :], with K at
//   `workspace` (leading dimension ld); accumulate is false for a row panel's first column panel.
// - gram (plan.gram only): G[0 : rows, 0 : cols] = (x[r0 : r0 + rows] − center) · yc[j0 : j0 + cols]ᵀ
//   into `workspace` (leading dimension ld), and, when xx is not null (a row panel's first column
//   panel), xx[0 : rows] = ‖x[r0 + i] − center‖² in float32.
// Each returns 0 on success. `workspace` holds plan.rows × plan.ld floats (plan: kernel_panel_plan, or
// smaller panels), `xx` plan.rows floats.
struct PanelGemm {
  int (*fn)(void* ctx, const float* K, int64_t ld, int64_t r0, int64_t rows, int64_t j0, int64_t cols,
            bool accumulate);
  void* ctx;
  float* workspace;
  PanelPlan plan;
  int (*gram)(void* ctx, float* G, int64_t ld, float* xx, int64_t r0, int64_t rows, int64_t j0,
              int64_t cols) = nullptr;
  float* xx = nullptr;
};

// out (N×C, float32, contiguous) = Σ_m φ(x_n, y_m) v[m, :]; x is `xtype` with strides (sx0, sx1),
// center (D), yc (M×D, y − center), yy (M, ‖yc‖²) and v (M×C, or null for ones with C = 1) are
// float32. float32 accumulation (float64 inputs are refused by the caller). With `gemm` (for
// kernel_panel_plan(...).rows > 0) the panel schedule runs and writes out through gemm.fn; v and
// out are then not touched by the launcher.
cudaError_t launch_kernel_matmul(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                 const float* center, const float* yc, const float* yy,
                                 const float* v, float* out, int64_t N, int64_t M, int64_t D,
                                 int64_t C, const Params& kp, cuda::MatMode mode, const PanelGemm* gemm,
                                 cudaStream_t stream);

}  // namespace kernel_sum
}  // namespace distkern
