// Launchers of the Mahalanobis CUDA kernels on raw pointers and a stream. No torch types: the .cu
// file that defines them compiles with nvcc alone (CMakeLists.txt), the _cuda.cpp file calls them.
//
// Pointer types: x is `xtype` with strides (sx0, sx1); every other floating pointer is the
// accumulation type (double for F64, float otherwise), contiguous. Factors are D×R row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"
#include "common/matmul_mode.h"

namespace distkern {
namespace mahalanobis {

// Thread-tile configuration of the forward kernels: 0 auto (4×4 thread tiles, 64×64 blocks; 2×4
// and 32×64 for mahalanobis_pos with ≤ 32 rows), 1 always 4×4, 2 always 8×8 and 128×128 (float32 only).
// Host state, for tests and benchmarks.
void set_tile_config(int config);
int tile_config();

// Rows per thread block of the backward kernels (the partial-sum buffer has ceil(N / kRowsPerBlock) rows).
constexpr int64_t kRowsPerBlock = 64;

// out[n] = ‖Wᵀ(x[n] − mean)‖²  (N ≥ 1)
cudaError_t launch_forward(DType xtype, const void* x, int64_t sx0, int64_t sx1, const void* mean,
                           const void* factor, void* out, int64_t N, int64_t D, int64_t R,
                           bool lower, cuda::MatMode mode, cudaStream_t stream);

// Gram panels for the forward at large D (float32 accumulation only): per row panel, a centring kernel
// writes xc = x − mean (float32, rows × D, contiguous) and the rows' guards; the caller's GEMMs (cuBLAS
// through ATen; a CPU loop in the emulation tests) write z = xc·W into a rows × R panel — for a
// lower-triangular W column block by column block, each over the rows of W below its diagonal block:
// Z[:, c0 : c0 + w] = xc[:, c0 :]·W[c0 :, c0 : c0 + w], (1 + w/D)/2 of the full product's flops — and a
// row kernel writes out = Σ z² + guard (mahalanobis_math.h's finish). The products run at cuBLAS's rate;
// the tile kernel reached ~40 % of the FP32 rate on the H200. The price: xc and z written and read once,
// 16 bytes an element of x beside its own read.
struct FwdPanels {
  // Z[0 : rows, c0 : c0 + cols] = XC[0 : rows, k0 : D] · W[k0 : D, c0 : c0 + cols] into the buffers below
  // (XC rows × D, Z rows × R, both row-major); returns 0 on success.
  int (*gemm)(void* ctx, int64_t rows, int64_t k0, int64_t c0, int64_t cols);
  void* ctx;
  float* xc;      // rows × D
  float* z;       // rows × R
  float* guard;   // rows
  int64_t rows;   // rows of a panel
  int64_t block;  // columns of a block of a lower-triangular factor
};
constexpr int64_t kPanelFloats = int64_t(1) << 23;  // 32 MiB a buffer: a panel's xc stays in the L2 of an H100 / H200
constexpr int64_t kPanelMinD = 512;  // the automatic schedule's switch (the tile kernel: 1.51× eager at D = 256,
                                     // 1.26× at 512 on the H200; not yet measured against the panels)

// The single-Gaussian forward's CUDA schedule: automatic (Gram panels for float32 accumulation from
// D ≥ kPanelMinD with R ≥ 128 and N ≥ 4096, else the tile kernel), or one forced where it applies.
enum class Schedule : int { Auto = 0, Tiles = 1, Gram = 2 };
inline bool use_panels(DType xtype, int64_t N, int64_t D, int64_t R, Schedule s) {
  if (xtype == DType::F64 || s == Schedule::Tiles) return false;
  return s == Schedule::Gram || (D >= kPanelMinD && R >= 128 && N >= 4096);
}
struct PanelPlan {
  int64_t rows, block;
};
inline PanelPlan panel_plan(int64_t N, int64_t D, int64_t R, bool lower) {
  const int64_t width = D > R ? D : R;
  int64_t rows = kPanelFloats / width;
  rows = rows < 64 ? 64 : rows;
  rows = rows > N ? N : rows;
  // column blocks of about D/4, multiples of 32, at least 64: 62.5 % of the full product's flops
  int64_t block = (D / 4 + 31) / 32 * 32;
  block = block < 64 ? 64 : block;
  return {rows, lower ? block : R};
}

// out[n] = ‖Wᵀ(x[n] − mean)‖² through the panels (mean float32 D, out float32 N; W is the caller's).
cudaError_t launch_forward_panels(DType xtype, const void* x, int64_t sx0, int64_t sx1, const float* mean,
                                  float* out, int64_t N, int64_t D, int64_t R, bool lower, const FwdPanels& p,
                                  cudaStream_t stream);

// gx[n] = W (2·grad[n]·Wᵀ(x[n] − mean))  written in xtype, contiguous N×D;
// partial[b][k] = −Σ_{n in row block b} gx[n][k] in the accumulation type, (ceil(N/64))×D;
// z is an N×R scratch buffer in the accumulation type.
cudaError_t launch_backward(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* grad, const void* mean, const void* factor, void* z,
                            void* gx, void* partial, int64_t N, int64_t D, int64_t R, bool lower,
                            cuda::MatMode mode, cudaStream_t stream);

// Reductions over the K components, fused into the kernels.
enum class KReduce : int {
  None = 0,       // out: N×K squared distances
  Min = 1,        // out: N minimum, idx: N argmin (int64)
  LogSumExp = 2,  // out: N, logsumexp_k(bias[k] − d²_k / 2)
};

// Per-component factors: means K×D, factors K×D×R (lower-triangular when lower).
cudaError_t launch_k_components(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                const void* means, const void* factors, const void* bias,
                                void* out, int64_t* idx, int64_t N, int64_t D, int64_t R,
                                int64_t K, bool lower, KReduce reduce, cuda::MatMode mode, cudaStream_t stream);

// Shared factor W: d²_k = ‖z‖² − 2 (x − center)·B[:, k] + vv[k] (clamped at 0), with
// zz[n] = ‖Wᵀ(x[n] − center)‖² from launch_forward, B = W Wᵀ (μ − center)ᵀ (D×K row-major) and
// vv[k] = ‖Wᵀ(μ_k − center)‖².
cudaError_t launch_k_shared(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                            const void* center, const void* bmat, const void* zz, const void* vv,
                            const void* bias, void* out, int64_t* idx, int64_t N, int64_t D,
                            int64_t K, KReduce reduce, cuda::MatMode mode, cudaStream_t stream);

// Per-position Gaussians (PaDiM): x (B, P, D) with strides (sb, sp, sd), means P×D (acc type),
// factors P×D×R in `ftype` (read as they are: no conversion copy; with lower, the strict upper
// triangle is never read), out B×P. Each factor is read once per call whatever B is.
cudaError_t launch_positions(DType xtype, DType ftype, const void* x, int64_t sb, int64_t sp,
                             int64_t sd, const void* means, const void* factors, void* out,
                             int64_t B, int64_t P, int64_t D, int64_t R, bool lower,
                             cuda::MatMode mode, cudaStream_t stream);

// Gram panels for the per-position forward (float32 factors and accumulation): per panel of `positions`
// positions, a centring kernel writes xc[p][b] = x[b, p] − means[p] (float32, positions × B × D) and the rows'
// guards, the caller's batched GEMMs (cuBLAS through ATen, one batch entry a position; a CPU loop in the
// emulation tests) write z[p] = xc[p]·W_p into positions × B × R — for lower-triangular factors column block
// by column block, each over the rows of W_p below its diagonal block, as FwdPanels — and a row kernel writes
// out[b, p] = Σ z² + guard. anomalib's way is one batched GEMM against the full inverse; this one reads the
// factors once, in place, at cuBLAS's rate, and skips their zero blocks. (The tile kernel, which reads them
// once too, ran at 13 % of the H200's copy bandwidth at P = 3136, D = 550: 0.79× anomalib.)
struct PosPanels {
  // Z[0 : n, :, c0 : c0 + cols] = XC[0 : n, :, k0 : D] · W[p0 : p0 + n, k0 : D, c0 : c0 + cols] (batched over
  // the n positions of the panel starting at p0) into the buffers below; returns 0 on success.
  int (*gemm)(void* ctx, int64_t p0, int64_t n, int64_t k0, int64_t c0, int64_t cols);
  void* ctx;
  float* xc;          // positions × B × D
  float* z;           // positions × B × R
  float* guard;       // positions × B
  int64_t positions;  // positions of a panel
  int64_t block;      // columns of a block of lower-triangular factors
};
constexpr int64_t kPosPanelMinB = 16;  // fewer rows than that per position: matrix-vector products, the tile kernel
// The per-position forward's CUDA schedule (set_mahalanobis_schedule, shared with the single-Gaussian forward):
// automatic — panels for float32 factors from D ≥ kPanelMinD with R ≥ 128 and B ≥ kPosPanelMinB, else the
// tile kernel (which also serves 16-bit factors, read as they are) — or one forced where it applies.
inline bool use_pos_panels(DType xtype, DType ftype, int64_t B, int64_t D, int64_t R, Schedule s) {
  if (xtype == DType::F64 || ftype != DType::F32 || s == Schedule::Tiles) return false;
  return s == Schedule::Gram || (D >= kPanelMinD && R >= 128 && B >= kPosPanelMinB);
}
struct PosPanelPlan {
  int64_t positions, block;
};
inline PosPanelPlan pos_panel_plan(int64_t B, int64_t P, int64_t D, int64_t R, bool lower) {
  const int64_t width = D > R ? D : R;
  int64_t n = kPanelFloats / (B * width);  // a buffer of kPanelFloats at most, unless one position exceeds it
  n = n < 1 ? 1 : n;
  n = n > P ? P : n;
  return {n, panel_plan(B, D, R, lower).block};
}

// out[b·P + p] = ‖W_pᵀ(x[b, p] − means[p])‖² through the panels (means float32 P×D, out float32 B×P; the
// factors are the caller's).
cudaError_t launch_positions_panels(DType xtype, const void* x, int64_t sb, int64_t sp, int64_t sd,
                                    const float* means, float* out, int64_t B, int64_t P, int64_t D, int64_t R,
                                    bool lower, const PosPanels& p, cudaStream_t stream);

}  // namespace mahalanobis
}  // namespace distkern
