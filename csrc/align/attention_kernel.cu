// Fused attention with shared keys and values (K = V = x), forward, flash-attention style (pure
// CUDA: no torch headers). The token-space form of prompt_align's cross-modal attention: H·T queries
// of width D over the P tokens of one image.
//
// One block of 256 threads per (8 queries, image). Per tile of 32 tokens: warp w owns query w and
// lane j token j — the 8×32 scores are dot products over D streamed through shared memory in
// 64-wide chunks (query rows resident in shared memory), the online-softmax update is a warp
// reduction, and the output update O = α·O + P·X_tile has each thread own columns d = tid + 256·k of
// all 8 queries in registers, reading the token tile coalesced. Nothing of size P is stored; the
// row log-sum-exp is written for the flash-style backward (python/distkern/ops/align.py).
// FLOPs 4·B·M·P·D; each token tile is read twice per 8 queries (from L2 after the first block).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "align/attention_launch.h"
#include "common/cuda_types.cuh"

namespace distkern {
namespace align {
namespace {

using cuda::from_acc;
using cuda::to_acc;

constexpr int kThreads = 256;
constexpr int kQB = 8;       // queries per block (one per warp)
constexpr int kKT = 32;      // tokens per tile (one per lane)
constexpr int kDC = 64;      // feature chunk of the score products
constexpr int kNJ = static_cast<int>(kFusedAttentionMaxD / kThreads);  // output columns per thread

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ x,
                                                                 const bool* __restrict__ mask, T* __restrict__ out,
                                                                 float* __restrict__ lse, int64_t M, int64_t P,
                                                                 int64_t D, int64_t Dpad) {
  extern __shared__ float smem[];
  float* q_s = smem;                              // kQB × Dpad
  float* x_s = q_s + kQB * Dpad;                  // kKT × (kDC + 1)
  float* p_s = x_s + kKT * (kDC + 1);             // kQB × kKT
  float* a_s = p_s + kQB * kKT;                   // kQB: rescale factors, then final sums
  float* m_s = a_s + kQB;                         // kQB: final maxima
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.y, q0 = int64_t(blockIdx.x) * kQB;
  const T* xb = x + b * P * D;
  const bool* mb = mask ? mask + b * P : nullptr;

  for (int64_t e = tid; e < kQB * Dpad; e += kThreads) {
    const int64_t r = e / Dpad, c = e % Dpad;
    q_s[e] = (q0 + r < M && c < D) ? to_acc<float>(q[(b * M + q0 + r) * D + c]) : 0.0f;
  }
  float o[kQB][kNJ];
#pragma unroll
  for (int i = 0; i < kQB; ++i)
#pragma unroll
    for (int j = 0; j < kNJ; ++j) o[i][j] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;  // of query `warp`, the same in every lane
  __syncthreads();

  for (int64_t p0 = 0; p0 < P; p0 += kKT) {
    // scores of query `warp` with token p0 + lane
    float s = 0.0f;
    for (int64_t d0 = 0; d0 < D; d0 += kDC) {
      for (int e = tid; e < kKT * kDC; e += kThreads) {
        const int r = e / kDC, c = e % kDC;
        const int64_t p = p0 + r, d = d0 + c;
        x_s[r * (kDC + 1) + c] = (p < P && d < D) ? to_acc<float>(xb[p * D + d]) : 0.0f;
      }
      __syncthreads();
      const float* qrow = q_s + warp * Dpad + d0;
      const float* xrow = x_s + lane * (kDC + 1);
#pragma unroll 16
      for (int c = 0; c < kDC; ++c) s += qrow[c] * xrow[c];
      __syncthreads();
    }
    const int64_t p = p0 + lane;
    const bool valid = p < P && (mb == nullptr || mb[p]);
    s = valid ? s : -INFINITY;
    const float m_new = fmaxf(m_run, warp_max(s));
    const float safe = m_new == -INFINITY ? 0.0f : m_new;  // nothing to attend to yet: keep the sums at 0
    const float pj = valid ? expf(s - safe) : 0.0f;
    const float alpha = expf(m_run - safe);
    l_run = l_run * alpha + cuda::warp_sum(pj);
    m_run = m_new;
    p_s[warp * kKT + lane] = pj;
    if (lane == 0) a_s[warp] = alpha;
    __syncthreads();
    const int64_t nk = P - p0 < kKT ? P - p0 : kKT;
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int64_t d = tid + int64_t(j) * kThreads;
      if (d < D) {
#pragma unroll
        for (int i = 0; i < kQB; ++i) o[i][j] *= a_s[i];
        for (int64_t k = 0; k < nk; ++k) {
          const float xv = to_acc<float>(xb[(p0 + k) * D + d]);
#pragma unroll
          for (int i = 0; i < kQB; ++i) o[i][j] += p_s[i * kKT + k] * xv;
        }
      }
    }
    __syncthreads();
  }
  if (lane == 0) {
    a_s[warp] = l_run;
    m_s[warp] = m_run;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kQB; ++i) {
    const int64_t row = q0 + i;
    if (row >= M) continue;
    const float l = a_s[i];
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int64_t d = tid + int64_t(j) * kThreads;
      // l = 0: every token masked out — 0, as torch's scaled_dot_product_attention (and the composite)
      if (d < D) out[(b * M + row) * D + d] = from_acc<T>(l > 0.f ? o[i][j] / l : 0.f);
    }
    if (tid == 0) lse[b * M + row] = m_s[i] + logf(l);
  }
}

template <typename T>
cudaError_t launch(const void* q, const void* x, const bool* mask, void* out, float* lse, int64_t B, int64_t M,
                   int64_t P, int64_t D, cudaStream_t stream) {
  if (D > kFusedAttentionMaxD || B > 65535) return cudaErrorInvalidValue;
  const int64_t Dpad = (D + kDC - 1) / kDC * kDC;
  const size_t smem = sizeof(float) * (kQB * Dpad + kKT * (kDC + 1) + kQB * kKT + 2 * kQB);
  const dim3 grid(static_cast<unsigned>((M + kQB - 1) / kQB), static_cast<unsigned>(B));
  attention_fwd_kernel<T><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(x), mask,
                                                            static_cast<T*>(out), lse, M, P, D, Dpad);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_shared_kv_attention(DType t, const void* q, const void* x, const bool* mask, void* out, float* lse,
                                       int64_t B, int64_t M, int64_t P, int64_t D, cudaStream_t stream) {
  if (B == 0 || M == 0) return cudaSuccess;
  switch (t) {
    case DType::F32: return launch<float>(q, x, mask, out, lse, B, M, P, D, stream);
    case DType::F16: return launch<__half>(q, x, mask, out, lse, B, M, P, D, stream);
    case DType::BF16: return launch<__nv_bfloat16>(q, x, mask, out, lse, B, M, P, D, stream);
    case DType::F64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace align
}  // namespace distkern
