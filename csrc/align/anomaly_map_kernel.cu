// CUDA kernel of the anomaly map (pure CUDA: no torch headers).
//
// One block per (32 patch rows, image). For each layer and each chunk of 32 prompt pairs (K <= 32)
// or 64, the block streams D in chunks of 64 (32 for float64) through shared memory: the 32×64
// patch tile and the pairs×64 direction tile; each of the 256 threads owns one row and 4 or 8 pairs
// (k = kg, kg+8, …) and accumulates their dot products in registers, the row's sum of squares on
// the side. Then σ(z / ‖x‖) is summed over
// the pairs, the 8 threads of a row reduce by shuffles, and the mean over layers and pairs is
// written. Each patch token is read once per pass of pairs (once for Bayes-PFL's 30 pairs).
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

constexpr int kRows = 32;
constexpr int kThreads = 256;

// kPairs prompt pairs per pass: 32 when K <= 32 (Bayes-PFL's 30: a 64-wide pass would spend more
// than half its FMAs and shared-memory reads on zero-padded pairs), else 64.
template <typename T, typename acc_t, int kPairs, int kChunk = (sizeof(acc_t) == 8 ? 32 : 64)>
__global__ void __launch_bounds__(kThreads, 1) anomaly_map_kernel(const T* __restrict__ patches,
                                                               const acc_t* __restrict__ dirs, acc_t* __restrict__ out,
                                                               int64_t L, int64_t B, int64_t P, int64_t D, int64_t K,
                                                               int64_t Ld, int64_t Bd) {
  constexpr int kPerThread = kPairs / (kThreads / kRows);  // pairs per thread: 4 or 8
  __shared__ acc_t xs[kRows][kChunk + 1];
  __shared__ acc_t ds[kPairs][kChunk + 1];
  __shared__ acc_t rinv[kRows];
  const int64_t b = blockIdx.y;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x;
  const int row = tid / (kThreads / kRows);  // 0..31
  const int kg = tid % (kThreads / kRows);   // 0..7
  acc_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const T* xb = patches + ((l * B + b) * P) * D;
    const acc_t* db = dirs + ((Ld == 1 ? 0 : l) * Bd + (Bd == 1 ? 0 : b)) * K * D;
    for (int64_t k0 = 0; k0 < K; k0 += kPairs) {
      acc_t acc[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[j] = 0;
      acc_t sumsq = 0;
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        for (int e = tid; e < kRows * kChunk; e += kThreads) {
          const int r = e / kChunk, c = e % kChunk;
          const int64_t pr = r0 + r, dc = d0 + c;
          xs[r][c] = (pr < P && dc < D) ? to_acc<acc_t>(xb[pr * D + dc]) : acc_t(0);
        }
        for (int e = tid; e < kPairs * kChunk; e += kThreads) {
          const int k = e / kChunk, c = e % kChunk;
          const int64_t kk = k0 + k, dc = d0 + c;
          ds[k][c] = (kk < K && dc < D) ? db[kk * D + dc] : acc_t(0);
        }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < kChunk; ++c) {
          const acc_t xv = xs[row][c];
          if (kg == 0) sumsq += xv * xv;
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) acc[j] += xv * ds[kg + j * (kThreads / kRows)][c];
        }
        __syncthreads();
      }
      if (k0 == 0) {
        if (kg == 0) rinv[row] = inv_norm(sumsq);
        __syncthreads();
      }
      const acc_t iv = rinv[row];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int64_t kk = k0 + kg + j * (kThreads / kRows);
        if (kk < K) total += sigmoid(acc[j] * iv);
      }
      __syncthreads();
    }
  }
  // the 8 threads of a row are consecutive lanes of one warp
#pragma unroll
  for (int off = (kThreads / kRows) / 2; off > 0; off /= 2) total += __shfl_down_sync(0xffffffffu, total, off, 8);
  const int64_t pr = r0 + row;
  if (kg == 0 && pr < P) out[b * P + pr] = total / static_cast<acc_t>(L * K);
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

struct MapSum {
  struct Args {
    float* out;
    int64_t P, K, L;
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
      const int64_t b = blockIdx.y;  // ppb = L: block row y holds the layers of image y
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        const float v = cuda::row_lanes_sum(st.t[i]);
        const int64_t row = row_base + ty * TR + i;
        if (tx == 0 && row < a.P) a.out[b * a.P + row] = v / static_cast<float>(a.L * a.K);
      }
    }
  };
};

template <typename T>
cudaError_t launch_tiles(const void* patches, const void* dirs, void* out, int64_t L, int64_t B, int64_t P, int64_t D,
                         int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode, cudaStream_t stream) {
  const MapRows<T> a{static_cast<const T*>(patches), L, B, P, D};
  const MapDirs d{static_cast<const float*>(dirs), L, K, D, Ld, Bd};
  const MapSum::Args e{static_cast<float*>(out), P, K, L};
  return cuda::launch_tile_gemm_rows_mode<float, 4, 4, MapSum::template Epi>(mode, P, D, K, cuda::Tri::None, B * L, L,
                                                                              a, d, e, stream);
}

template <typename T, typename acc_t>
cudaError_t launch(const void* patches, const void* dirs, void* out, int64_t L, int64_t B, int64_t P, int64_t D,
                   int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode, cudaStream_t stream) {
  if (B > 65535) return cudaErrorInvalidConfiguration;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mode != cuda::MatMode::Fma) return launch_tiles<T>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
  }
  const dim3 grid(static_cast<unsigned>((P + kRows - 1) / kRows), static_cast<unsigned>(B));
  const T* x = static_cast<const T*>(patches);
  const acc_t* d = static_cast<const acc_t*>(dirs);
  acc_t* o = static_cast<acc_t*>(out);
  if (K <= 32)
    anomaly_map_kernel<T, acc_t, 32><<<grid, kThreads, 0, stream>>>(x, d, o, L, B, P, D, K, Ld, Bd);
  else
    anomaly_map_kernel<T, acc_t, 64><<<grid, kThreads, 0, stream>>>(x, d, o, L, B, P, D, K, Ld, Bd);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_anomaly_map(DType xtype, const void* patches, const void* dirs, void* out, int64_t L, int64_t B,
                               int64_t P, int64_t D, int64_t K, int64_t Ld, int64_t Bd, cuda::MatMode mode,
                               cudaStream_t stream) {
  if (B == 0 || P == 0) return cudaSuccess;
  switch (xtype) {
    case DType::F32: return launch<float, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
    case DType::F16: return launch<__half, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
    case DType::BF16: return launch<__nv_bfloat16, float>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
    case DType::F64: return launch<double, double>(patches, dirs, out, L, B, P, D, K, Ld, Bd, mode, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace align
}  // namespace distkern
