// CUDA kernel of the anomaly map (pure CUDA: no torch headers).
//
// float32 accumulation: the shared tile skeleton (common/tile_gemm.cuh), on FMAs (8×2 thread tiles for up to
// 32 pairs) or tensor cores; float64: a register-tiled kernel (below). The map is
// the mean over layers and prompt pairs of σ(x·d/‖x‖) per patch token, written once per token.
// Bytes: L·B·P·D·elem read + B·P·4 written; FLOPs: 2·L·B·P·D·K (half the two-cosine form).
#include <cuda_runtime.h>

#include <cstdint>

#include "align/anomaly_map_launch.h"
#include "align/anomaly_map_math.h"
#include "common/cuda_types.cuh"
#include "common/tile_gemm.cuh"

namespace distkern {
namespace align {
namespace {

using cuda::to_acc;

constexpr int kThreads = 256;
constexpr int kGroups = 8;  // pair groups: the 8 consecutive lanes that share a row group

// One block per (32·TR patch rows, image); the 256 threads are 32 row groups × 8 pair groups, each
// thread a register tile of TR rows × TP pairs (TR·TP = 32): per feature it reads TR + TP values
// from shared memory for TR·TP FMAs (2.7 per read), where one row × 8 pairs read 9 for 8.
// kPairs prompt pairs per pass: 32 when K <= 32 (Bayes-PFL's 30; TP = 4, TR = 8, 256 rows), else
// 64 (TP = 8, TR = 4, 128 rows). D streams through shared memory in chunks of kChunk features,
// stored feature-major so a thread's rows and pairs are contiguous. ‖x‖² comes from the same
// tiles: thread kg of a row group squares feature c0 + kg of every 8, and the 8 lanes sum by
// shuffles.
template <typename T, typename acc_t, int kPairs, int kChunk = (sizeof(acc_t) == 8 ? 16 : 32)>
__global__ void __launch_bounds__(kThreads) anomaly_map_kernel(const T* __restrict__ patches,
                                                               const acc_t* __restrict__ dirs, acc_t* __restrict__ out,
                                                               int64_t L, int64_t B, int64_t P, int64_t D, int64_t K,
                                                               int64_t Ld, int64_t Bd, acc_t* __restrict__ part) {
  constexpr int TP = kPairs / kGroups;   // pairs per thread: 4 or 8
  constexpr int TR = 32 / TP;            // rows per thread: 8 or 4
  constexpr int kRows = 32 * TR;         // rows per block: 256 or 128
  constexpr int kPad = 16 / sizeof(acc_t);
  static_assert(kChunk % kGroups == 0, "feature chunk must be a multiple of the pair groups");
  __shared__ __align__(16) acc_t xs[kChunk][kRows + kPad];
  __shared__ __align__(16) acc_t ds[kChunk][kPairs + kPad];
  const int64_t b = blockIdx.y;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x;
  const int rg = tid / kGroups, kg = tid % kGroups;
  acc_t total[TR];
#pragma unroll
  for (int i = 0; i < TR; ++i) total[i] = 0;
  // With `part`, block z handles layer z alone and writes its sum over pairs to part[z][b][p] (the
  // layers' blocks run side by side; layer_mean_kernel adds them in order); else all L layers here.
  const int64_t l_first = part ? int64_t(blockIdx.z) : 0, l_end = part ? l_first + 1 : L;
  for (int64_t l = l_first; l < l_end; ++l) {
    const T* xb = patches + ((l * B + b) * P) * D;
    const acc_t* db = dirs + ((Ld == 1 ? 0 : l) * Bd + (Bd == 1 ? 0 : b)) * K * D;
    acc_t rinv[TR];
    for (int64_t k0 = 0; k0 < K; k0 += kPairs) {
      acc_t acc[TR][TP], sumsq[TR];
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        sumsq[i] = 0;
#pragma unroll
        for (int j = 0; j < TP; ++j) acc[i][j] = 0;
      }
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        // a warp reads kChunk consecutive features of a row (coalesced), stored feature-major
        for (int e = tid; e < kRows * kChunk; e += kThreads) {
          const int r = e / kChunk, c = e % kChunk;
          const int64_t pr = r0 + r, dc = d0 + c;
          xs[c][r] = (pr < P && dc < D) ? to_acc<acc_t>(xb[pr * D + dc]) : acc_t(0);
        }
        for (int e = tid; e < kPairs * kChunk; e += kThreads) {
          const int k = e / kChunk, c = e % kChunk;
          const int64_t kk = k0 + k, dc = d0 + c;
          ds[c][k] = (kk < K && dc < D) ? db[kk * D + dc] : acc_t(0);
        }
        __syncthreads();
#pragma unroll 2
        for (int c0 = 0; c0 < kChunk; c0 += kGroups) {
          if (k0 == 0) {
#pragma unroll
            for (int i = 0; i < TR; ++i) {
              const acc_t v = xs[c0 + kg][rg * TR + i];
              sumsq[i] += v * v;
            }
          }
#pragma unroll
          for (int c = c0; c < c0 + kGroups; ++c) {
            acc_t xv[TR], dv[TP];
#pragma unroll
            for (int i = 0; i < TR; ++i) xv[i] = xs[c][rg * TR + i];
#pragma unroll
            for (int j = 0; j < TP; ++j) dv[j] = ds[c][kg * TP + j];
#pragma unroll
            for (int i = 0; i < TR; ++i)
#pragma unroll
              for (int j = 0; j < TP; ++j) acc[i][j] += xv[i] * dv[j];
          }
        }
        __syncthreads();
      }
      if (k0 == 0) {
#pragma unroll
        for (int i = 0; i < TR; ++i) {
          acc_t v = sumsq[i];
#pragma unroll
          for (int off = kGroups / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
          rinv[i] = inv_norm(v);
        }
      }
#pragma unroll
      for (int j = 0; j < TP; ++j) {
        if (k0 + kg * TP + j >= K) continue;
#pragma unroll
        for (int i = 0; i < TR; ++i) total[i] += sigmoid(acc[i][j] * rinv[i]);
      }
    }
  }
  // the 8 pair groups of a row group are consecutive lanes of one warp
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    acc_t v = total[i];
#pragma unroll
    for (int off = kGroups / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t pr = r0 + rg * TR + i;
    if (kg == 0 && pr < P) {
      if (part)
        part[(l_first * B + b) * P + pr] = v;
      else
        out[b * P + pr] = v / static_cast<acc_t>(L * K);
    }
  }
}

// out[i] = (part[0][i] + … + part[L−1][i]) / (L·K), i over the B·P tokens: the layers in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) layer_mean_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out,
                                                              int64_t L, int64_t n, int64_t K) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t l = 0; l < L; ++l) s += part[l * n + i];
    out[i] = s / static_cast<acc_t>(L * K);
  }
}

template <typename acc_t>
cudaError_t launch_layer_mean(const acc_t* part, acc_t* out, int64_t L, int64_t n, int64_t K, cudaStream_t stream) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  layer_mean_kernel<acc_t><<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(part, out, L,
                                                                                                          n, K);
  return cudaGetLastError();
}

// ---- the same map as a tile product on tensor cores (matmul modes tf32 / 3xtf32) -----------------
// Rows: the P tokens of an image; the product's K axis: D; columns: the prompt pairs; problems:
// (image b, layer l) with the L layers of one image in one block row (ppb = L), so the sum over
// layers stays in registers. ‖x‖² is the row guard of the loads; σ(x·d/‖x‖) is summed in the
// epilogue, reduced over the 16 column threads of a row and written once per image.

template <typename T>
struct MapRows {  // A(p = b·L + l, row = token, k = feature)
  const T* x;
  int64_t L, B, P, D;
  __device__ float operator()(int64_t p, int64_t row, int64_t k, float& guard) const {
    const int64_t b = p / L, l = p % L;
    const float v = to_acc<float>(x[((l * B + b) * P + row) * D + k]);
    guard += v * v;
    return v;
  }
};

struct MapDirs {  // B(p, k = feature, j = pair) = dirs[l or 0, b or 0, j, k]
  enum { kKContiguous = 1 };
  const float* d;
  int64_t L, K, D, Ld, Bd;
  __device__ float operator()(int64_t p, int64_t k, int64_t j) const {
    const int64_t b = p / L, l = p % L;
    return d[(((Ld == 1 ? 0 : l) * Bd + (Bd == 1 ? 0 : b)) * K + j) * D + k];
  }
};

// With `part` (one problem a block row: ppb = 1), block row y = b·L + l writes image b's layer-l sum over
// pairs to part[l][b][p], and layer_mean_kernel averages the layers; without, block row y is image b with
// its L layers in one block (ppb = L) and writes the mean to out.
struct MapSum {
  struct Args {
    float* out;
    int64_t P, K, L;
    float* part;
    int64_t B;
  };
  template <int TR, int TC>
  struct Epi {
    Args a;
    struct State {
      float t[TR];
    };
    __device__ void init(State& st) const {
#pragma unroll
      for (int i = 0; i < TR; ++i) st.t[i] = 0.f;
    }
    __device__ void block(State& st, const float (&c)[TR][TC], int64_t, int64_t row_base, int64_t j0, float*,
                          const float* guard_rows) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const int r = ty * TR + i;
        if (row_base + r >= a.P) continue;
        const float iv = inv_norm(guard_rows[r]);
#pragma unroll
        for (int j = 0; j < TC; ++j)
          if (j0 + tx * TC + j < a.K) st.t[i] += sigmoid(c[i][j] * iv);
      }
    }
    __device__ void end_problem(State&, int64_t, int64_t, const float*) const {}
    __device__ void finish(State& st, int64_t row_base) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
      const int64_t y = blockIdx.y;
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const float v = cuda::row_lanes_sum(st.t[i]);
        const int64_t row = row_base + ty * TR + i;
        if (tx != 0 || row >= a.P) continue;
        if (a.part)
          a.part[((y % a.L) * a.B + y / a.L) * a.P + row] = v;
        else
          a.out[y * a.P + row] = v / static_cast<float>(a.L * a.K);
      }
    }
  };
};

template <typename T>
cudaError_t launch_tiles(const void* patches, const void* dirs, void* out, int64_t L, int64_t B, int64_t P, int64_t D,
                         int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode, cudaStream_t stream) {
  const MapRows<T> a{static_cast<const T*>(patches), L, B, P, D};
  const MapDirs d{static_cast<const float*>(dirs), L, K, D, Ld, Bd};
  const MapSum::Args e{static_cast<float*>(out), P, K, L, nullptr, B};
  return cuda::launch_tile_gemm_rows_mode<float, 4, 4, MapSum::template Epi>(mode, P, D, K, cuda::Tri::None, B * L, L,
                                                                              a, d, e, stream);
}

// float32 accumulation on FMAs: the tile skeleton's FMA kernel (its k loop pipelined: the next tile's loads in
// flight during the current tile's FMAs), with 8×2 thread tiles — 128 tokens × 32 pairs a block, so
// Bayes-PFL's K = 30 fills one column block (4×4 tiles would spend half their FMAs on 34 empty columns);
// 4×4 above 32 pairs. With a workspace each (image, layer) gets blocks of its own and layer_mean_kernel
// averages the layers (at B = 8: 11 × 32 blocks, not 11 × 8).
template <typename T>
cudaError_t launch_fma_tiles(const void* patches, const void* dirs, void* out, int64_t L, int64_t B, int64_t P,
                             int64_t D, int64_t K, int64_t Ld, int64_t Bd, float* part, cudaStream_t stream) {
  const MapRows<T> a{static_cast<const T*>(patches), L, B, P, D};
  const MapDirs d{static_cast<const float*>(dirs), L, K, D, Ld, Bd};
  const MapSum::Args e{static_cast<float*>(out), P, K, L, part, B};
  const int64_t ppb = part ? 1 : L;
  if (K <= 32)
    return cuda::launch_tile_gemm_rows<float, 8, 2, MapSum::template Epi>(P, D, K, cuda::Tri::None, B * L, ppb, a, d, e,
                                                                           stream);
  return cuda::launch_tile_gemm_rows<float, 4, 4, MapSum::template Epi>(P, D, K, cuda::Tri::None, B * L, ppb, a, d, e,
                                                                         stream);
}

template <typename T, typename acc_t>
cudaError_t launch(const void* patches, const void* dirs, void* out, int64_t L, int64_t B, int64_t P, int64_t D,
                   int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode, void* workspace, cudaStream_t stream) {
  if (B > 65535) return cudaErrorInvalidConfiguration;
  acc_t* o = static_cast<acc_t*>(out);
  // One block per (rows, image) is 6·B blocks at P = 1369: 48 at B = 8 for 132 SMs. With a workspace the
  // L layers get blocks of their own and a second kernel adds them.
  // (anomaly_map_workspace sizes it for the FMA paths: 2..65535 layers)
  acc_t* part = (workspace != nullptr && L > 1 && L <= 65535) ? static_cast<acc_t*>(workspace) : nullptr;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mode != cuda::MatMode::Fma) return launch_tiles<T>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
    if (part && B * L > 65535) part = nullptr;  // block rows of the per-layer grid
    const cudaError_t err = launch_fma_tiles<T>(patches, dirs, out, L, B, P, D, K, Ld, Bd, part, stream);
    return (err != cudaSuccess || !part) ? err : launch_layer_mean(part, o, L, B * P, K, stream);
  } else {  // float64: the register-tiled kernel
    const T* x = static_cast<const T*>(patches);
    const acc_t* d = static_cast<const acc_t*>(dirs);
    const unsigned gz = part ? static_cast<unsigned>(L) : 1u;
    if (K <= 32) {  // 256 rows per block
      const dim3 grid(static_cast<unsigned>((P + 255) / 256), static_cast<unsigned>(B), gz);
      anomaly_map_kernel<T, acc_t, 32><<<grid, kThreads, 0, stream>>>(x, d, o, L, B, P, D, K, Ld, Bd, part);
    } else {  // 128 rows per block
      const dim3 grid(static_cast<unsigned>((P + 127) / 128), static_cast<unsigned>(B), gz);
      anomaly_map_kernel<T, acc_t, 64><<<grid, kThreads, 0, stream>>>(x, d, o, L, B, P, D, K, Ld, Bd, part);
    }
    const cudaError_t err = cudaGetLastError();
    return (err != cudaSuccess || !part) ? err : launch_layer_mean(part, o, L, B * P, K, stream);
  }
}

}  // namespace

int64_t anomaly_map_workspace(DType xtype, cuda::MatMode mode, int64_t L, int64_t B, int64_t P) {
  const bool fma = xtype == DType::F64 || mode == cuda::MatMode::Fma;  // launch(): the tile path otherwise
  return (fma && L > 1 && L <= 65535) ? L * B * P : 0;
}

cudaError_t launch_anomaly_map(DType xtype, const void* patches, const void* dirs, void* out, int64_t L, int64_t B,
                               int64_t P, int64_t D, int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode,
                               void* workspace, cudaStream_t stream) {
  if (B == 0 || P == 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return launch<float, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, workspace, stream);
    case DType::F16: return launch<__half, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, workspace, stream);
    case DType::BF16:
      return launch<__nv_bfloat16, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, workspace, stream);
    case DType::F64:
      return launch<double, double>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace align
}  // namespace distkern
