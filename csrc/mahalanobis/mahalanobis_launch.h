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

}  // namespace mahalanobis
}  // namespace distkern
