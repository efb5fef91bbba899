// Nearest reference by cosine similarity (ResAD's matching step): the CUDA launcher (no torch
// types; defined in nearest_kernel.cu, called by nearest_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"

namespace distkern {
namespace nearest {

// Gram panels (large D): per bounded panel of rows × cols, the caller's GEMM (cuBLAS through ATen; a CPU
// loop in the emulation tests) writes G = x[r0 : r0 + rows] · rhat[j0 : j0 + cols]ᵀ in the accumulation type
// (leading dimension ld), and a row-argmax kernel folds each panel into a running (max, index) per row:
// the N×M similarity matrix never exists beyond one panel. At large D the products dominate and a BLAS
// runs them near the GPU's peak, where the tile kernel reached a third of the H100's FP32 rate (17 against
// cuBLAS's 46 TFLOP/s at D = 512); the price is 8 bytes of panel traffic a pair (G written, then read once)
// against 2D flops a pair: at D = 128, ~2 ps a pair at 4 TB/s beside ~5.7 ps of products at 45 TFLOP/s.
struct GramPlan {
  int64_t rows, cols, ld;
};
constexpr int64_t kGramRows = 2048;  // panel bounds: 2048 × 8192 floats = 64 MiB of workspace (128 float64)
constexpr int64_t kGramCols = 8192;
constexpr int64_t kGramMinD = 128;             // the automatic schedule's switch (not yet measured)
constexpr int64_t kGramMinPairs = 1ll << 20;   // below this, one fused launch beats ~5 (not yet measured)

// The schedule of nearest_cosine on CUDA: automatic (Gram panels from D ≥ kGramMinD on problems of at least
// kGramMinPairs pairs, else the fused tile kernel), or one forced (benchmarks and tests).
enum class Schedule : int { Auto = 0, Tiles = 1, Gram = 2 };
inline bool use_gram(int64_t N, int64_t M, int64_t D, Schedule s) {
  return s == Schedule::Gram || (s == Schedule::Auto && D >= kGramMinD && N * M >= kGramMinPairs);
}

// Panels as even as the bounds allow (M = 12544 gives two of 6272, not 8192 + 4352); rows of 16-byte
// multiples, so the argmax kernel reads whole 16-byte groups.
inline GramPlan gram_plan(int64_t N, int64_t M, int64_t max_rows = kGramRows, int64_t max_cols = kGramCols) {
  if (N <= 0 || M <= 0) return {0, 0, 0};
  const int64_t rp = (N + max_rows - 1) / max_rows, cp = (M + max_cols - 1) / max_cols;
  const int64_t rows = (N + rp - 1) / rp, cols = (M + cp - 1) / cp;
  return {rows, cols, (cols + 3) / 4 * 4};
}

// What the Gram schedule needs from the caller. gram(ctx, G, ld, guard, r0, rows, j0, cols) writes the panel
// G[0 : rows, 0 : cols] (accumulation type, leading dimension ld) and, when guard is not null (a row panel's
// first column panel), guard[0 : rows] = Σ_k (x[r0 + i, k] − x[r0 + i, k]) (0, or NaN for a row with a
// non-finite value, as the tile kernel's guard); it returns 0 on success. `workspace` holds plan.rows ×
// plan.ld values of the accumulation type, `guard` plan.rows.
struct GramPanels {
  int (*gram)(void* ctx, void* G, int64_t ld, void* guard, int64_t r0, int64_t rows, int64_t j0, int64_t cols);
  void* ctx;
  void* workspace;
  void* guard;
  GramPlan plan;
};

// For each row x[n] (strides sx0, sx1; xtype), the reference m maximising x[n]·rhat[m] with
// rhat the L2-normalised references (M×D, accumulation type, contiguous):
// out[n] = x[n]·rhat[m*] · inv_norm[n] (the cosine similarity), idx[n] = m*. Ties keep the lowest index.
// With `gram` (Gram panels) the products come from gram->gram and x, rhat and mode are not read here.
cudaError_t launch_nearest(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                           const void* rhat, const void* inv_norm, void* out, int64_t* idx,
                           int64_t N, int64_t D, int64_t M, cuda::MatMode mode, const GramPanels* gram,
                           cudaStream_t stream);

}  // namespace nearest
}  // namespace distkern
