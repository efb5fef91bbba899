// A small SIMT tile-product skeleton shared by the kernels that need C = A·B on row tiles with a
// custom load of A (centring, dtype conversion), of B (a factor, transposed or not) and a custom
// epilogue (row sums of squares, scaled stores, column partial sums, reductions over problems) —
// so no product goes through global memory as an intermediate when the epilogue can consume it.
//
// One thread block owns BM = 64 rows of the output and walks, for each of its problems p (e.g.
// the K components of a mixture), all column blocks of BN = 64, each over K in steps of BK = 16,
// with 256 threads each holding a 4×4 accumulator. Accumulation is in acc_t (float or double).
// B may be declared triangular so the zero blocks are skipped:
//   Tri::Lower  B[k][j] = 0 for k < j   (a lower-triangular factor L:  C = A·L)
//   Tri::Upper  B[k][j] = 0 for k > j   (its transpose:                 C = A·Lᵀ)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace distkern {
namespace cuda {

enum class Tri : int { None = 0, Lower = 1, Upper = 2 };

constexpr int kTileK = 16;
constexpr int kTileThreads = 256;

// Thread-tile shapes: each of the 16×16 threads holds TR rows × TC columns of C, so a block
// covers (16·TR) × (16·TC). 4×4 (64×64 tiles) suits small M and float64; 8×8 (128×128 tiles)
// halves the shared-memory traffic per FMA for large float32 problems.
template <int TR, int TC>
struct TileShape {
  static constexpr int kRows = TR, kCols = TC;
  static constexpr int kM = 16 * TR, kN = 16 * TC;
  static_assert(16 % TR == 0, "TR must divide 16");
};

// ALoad:  __device__ acc_t operator()(int64_t p, int64_t row, int64_t k, acc_t& guard) const
//         (row < M and k < K guaranteed; may fold a per-row non-finite guard)
// BLoad:  __device__ acc_t operator()(int64_t p, int64_t k, int64_t j) const  (k < K, j < Ncols)
// Epi:    template <int TR, int TC> struct with
//           using State = ...;                         per-thread state
//           __device__ void init(State&) const;
//           __device__ void block(State&, const acc_t (&c)[TR][TC], int64_t p, int64_t row_base,
//                                 int64_t j0, acc_t* scratch /*16×(16·TC)*/,
//                                 const acc_t* guard_rows) const;
//           __device__ void end_problem(State&, int64_t p, int64_t row_base,
//                                       const acc_t* guard_rows) const;
//           __device__ void finish(State&, int64_t row_base) const;
//         All are called by all threads of the block (they may __syncthreads); thread
//         (tx, ty) = (tid % 16, tid / 16) holds c[i][j] for row row_base + TR·ty + i and column
//         j0 + TC·tx + j.
// Problems: block (bx, by) runs problems [by·ppb, min((by+1)·ppb, P)).
// When the first column block covers all of K (Tri::None or Tri::Lower), guard_rows[r] holds the
// sum of the guards of row (row_base + r) over all k for the current problem, from its first
// call of block() on.
template <typename acc_t, int TR, int TC, typename ALoad, typename BLoad, typename Epi>
__global__ void __launch_bounds__(kTileThreads)
tile_gemm_rows_kernel(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P, int64_t ppb,
                      ALoad A, BLoad B, Epi epi) {
  constexpr int BM = 16 * TR, BN = 16 * TC;
  constexpr int A_LANES = 16 / TR;  // loader threads per row of the A tile
  __shared__ acc_t As[kTileK][BM + 4];
  __shared__ acc_t Bs[kTileK][BN];
  __shared__ acc_t guard_rows[BM];
  __shared__ acc_t scratch[16][BN];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  // Loader mapping: A tile BM×16, each thread TR consecutive k of one row; B tile 16×BN, each
  // thread TC consecutive columns of one k.
  const int a_r = tid / A_LANES, a_k = (tid % A_LANES) * TR;
  const int b_k = tid / 16, b_j = (tid % 16) * TC;
  const int64_t a_row = row0 + a_r;

  typename Epi::State st;
  epi.init(st);

  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * ppb;
  const int64_t p_end = (p_begin + ppb) < P ? (p_begin + ppb) : P;
  for (int64_t p = p_begin; p < p_end; ++p) {
    acc_t guard = 0;
    for (int64_t j0 = 0; j0 < Ncols; j0 += BN) {
      acc_t c[TR][TC];
#pragma unroll
      for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TC; ++j) c[i][j] = 0;

      int64_t kbeg = 0, kend = K;
      if (tri == Tri::Lower) kbeg = j0 < K ? j0 : K;
      if (tri == Tri::Upper) kend = (j0 + BN) < K ? (j0 + BN) : K;
      const bool first = (j0 == 0);

      for (int64_t k0 = kbeg; k0 < kend; k0 += kTileK) {
#pragma unroll
        for (int q = 0; q < TR; ++q) {
          const int64_t k = k0 + a_k + q;
          acc_t v = 0;
          if (a_row < M && k < kend) {
            acc_t g = 0;
            v = A(p, a_row, k, g);
            if (first) guard += g;
          }
          As[a_k + q][a_r] = v;
        }
#pragma unroll
        for (int q = 0; q < TC; ++q) {
          const int64_t k = k0 + b_k, j = j0 + b_j + q;
          Bs[b_k][b_j + q] = (k < kend && j < Ncols) ? B(p, k, j) : acc_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
          acc_t a[TR], b[TC];
#pragma unroll
          for (int i = 0; i < TR; ++i) a[i] = As[kk][ty * TR + i];
#pragma unroll
          for (int j = 0; j < TC; ++j) b[j] = Bs[kk][tx * TC + j];
#pragma unroll
          for (int i = 0; i < TR; ++i)
#pragma unroll
            for (int j = 0; j < TC; ++j) c[i][j] += a[i] * b[j];
        }
        __syncthreads();
      }
      if (first) {
        // The loader threads of a row are adjacent lanes: combine their guards.
#pragma unroll
        for (int off = 1; off < A_LANES; off <<= 1) guard += __shfl_xor_sync(0xffffffffu, guard, off);
        if ((tid % A_LANES) == 0) guard_rows[a_r] = guard;
        __syncthreads();
      }
      epi.block(st, c, p, row0, j0, &scratch[0][0], guard_rows);
    }
    epi.end_problem(st, p, row0, guard_rows);
    __syncthreads();  // guard_rows is rewritten by the next problem
  }
  epi.finish(st, row0);
}

// Sum over the 16 threads that share a row (lanes 0–15 or 16–31 of one warp).
template <typename acc_t>
__device__ __forceinline__ acc_t row_lanes_sum(acc_t v) {
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

// Launch helper: grid (ceil(M / (16·TR)), ceil(P / ppb)); Epi is a template <int TR, int TC>.
template <typename acc_t, int TR, int TC, template <int, int> class Epi, typename A, typename B,
          typename EArgs>
cudaError_t launch_tile_gemm_rows(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P,
                                  int64_t ppb, A a, B b, const EArgs& eargs, cudaStream_t stream) {
  if (M <= 0 || P <= 0) return cudaSuccess;
  const int64_t bx = (M + 16 * TR - 1) / (16 * TR);
  const int64_t by = (P + ppb - 1) / ppb;
  if (bx > 0x7fffffffLL || by > 65535) return cudaErrorInvalidValue;
  using E = Epi<TR, TC>;
  const E e{eargs};
  tile_gemm_rows_kernel<acc_t, TR, TC, A, B, E>
      <<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)), kTileThreads, 0, stream>>>(
          M, K, Ncols, tri, P, ppb, a, b, e);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace distkern
