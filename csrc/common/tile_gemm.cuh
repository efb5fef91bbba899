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
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/matmul_mode.h"

namespace distkern {
namespace cuda {

enum class Tri : int { None = 0, Lower = 1, Upper = 2 };

constexpr int kTileK = 16;
constexpr int kTileThreads = 256;

// Blocks an SM for a 256-thread kernel that may take up to 128 registers a thread: 2 on sm_90; 1 on
// sm_80, where ptxas spills the heavier epilogues under 128 (seen with -Xptxas -v).
// kBlocks80: blocks an SM for float32 4×4 FMA tiles, 3 (80 registers) on sm_90, 2 on sm_80 (see
// fma_min_blocks).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kBlocks128 = 1;
constexpr int kBlocks80 = 2;
#else
constexpr int kBlocks128 = 2;
constexpr int kBlocks80 = 3;
#endif

// Thread-tile shapes: each of the 16×16 threads holds TR rows × TC columns of C, so a block
// covers (16·TR) × (16·TC). 4×4 (64×64 tiles) suits small M and float64; 8×8 (128×128 tiles)
// halves the shared-memory traffic per FMA for large float32 problems.
template <int TR, int TC>
struct TileShape {
  static constexpr int kRows = TR, kCols = TC;
  static constexpr int kM = 16 * TR, kN = 16 * TC;
  static_assert(16 % TR == 0, "TR must divide 16");
};

// The problems of block row blockIdx.y: [by·ppb, min((by+1)·ppb, P)).
__device__ __forceinline__ void block_problems(int64_t P, int64_t ppb, int64_t& begin, int64_t& end) {
  begin = static_cast<int64_t>(blockIdx.y) * ppb;
  end = (begin + ppb) < P ? (begin + ppb) : P;
}

// The k range a column block [j0, j0 + BN) needs: the rows of B that are not zero by its triangle.
__device__ __forceinline__ void k_range(Tri tri, int64_t K, int64_t j0, int64_t BN, int64_t& kbeg, int64_t& kend) {
  kbeg = 0;
  kend = K;
  if (tri == Tri::Lower) kbeg = j0 < K ? j0 : K;
  if (tri == Tri::Upper) kend = (j0 + BN) < K ? (j0 + BN) : K;
}

template <typename B, typename = void>
struct b_k_contiguous : std::false_type {};
template <typename B>
struct b_k_contiguous<B, std::void_t<decltype(B::kKContiguous)>> : std::integral_constant<bool, bool(B::kKContiguous)> {};

// N consecutive values from shared memory at p (16-byte aligned when N·sizeof(T) is a multiple of
// 16) in 128-bit loads where the size allows: the fragment reads of the FMA kernel's inner loop,
// which scalar loads would make shared-memory-bound (8 LDS.32 per 16 FMAs for a 4×4 thread tile,
// with 2-way bank conflicts on B; as 128-bit loads, 2 per 16 FMAs).
template <int N, typename T>
__device__ __forceinline__ void lds_vec(const T* p, T (&out)[N]) {
  if constexpr (std::is_same<T, float>::value && N % 4 == 0) {
#pragma unroll
    for (int v = 0; v < N / 4; ++v) {
      const float4 t = reinterpret_cast<const float4*>(p)[v];
      out[4 * v] = t.x;
      out[4 * v + 1] = t.y;
      out[4 * v + 2] = t.z;
      out[4 * v + 3] = t.w;
    }
  } else if constexpr ((std::is_same<T, float>::value || std::is_same<T, double>::value) && N % 2 == 0) {
    using T2 = typename std::conditional<std::is_same<T, float>::value, float2, double2>::type;
#pragma unroll
    for (int v = 0; v < N / 2; ++v) {
      const T2 t = reinterpret_cast<const T2*>(p)[v];
      out[2 * v] = t.x;
      out[2 * v + 1] = t.y;
    }
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = p[v];
  }
}

// Blocks per SM the FMA kernel is compiled for (__launch_bounds__). Unbounded, the compiler hoists
// the 128-bit fragment reads of several k steps and takes 80-100 registers a thread for float32 4×4
// tiles, 160-240 for 8×8. Default: float32 4×4 tiles at most 80 registers on sm_90 (3 blocks, 24
// warps an SM; on sm_80, whose ptxas spills the prefetch registers of some loaders under 80, 128:
// 2 blocks), float64 128 (kBlocks128), 8×8 unbounded (their 64 accumulators and the heavier
// epilogues spill under 128). An epilogue whose state needs more declares `enum { kMinBlocks = n };`.
template <typename E, typename = void>
struct epi_min_blocks : std::integral_constant<int, 0> {};
template <typename E>
struct epi_min_blocks<E, std::void_t<decltype(E::kMinBlocks)>> : std::integral_constant<int, int(E::kMinBlocks)> {};

template <typename acc_t, int TR, int TC, typename Epi>
constexpr int fma_min_blocks() {
  return epi_min_blocks<Epi>::value > 0 ? epi_min_blocks<Epi>::value
                                        : (sizeof(acc_t) > 4 ? kBlocks128 : (TR * TC > 16 ? 1 : kBlocks80));
}

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
//
// Loader mappings of the FMA kernel (256 threads; tiles of 16 k by BM rows / BN columns), chosen
// so that a warp's global loads are whole 32-byte sectors and its shared stores hit 32 distinct
// banks (row strides BM + 4 and BN + 4, ≡ 4 mod 32 floats, keep the rows 16-byte aligned for the
// 128-bit fragment reads):
//   along k (A, and B when BLoad declares kKContiguous): lane l of warp w takes k = l % 8 + 8·(w % 2)
//     of the rows / columns (l / 8) % 4 + 4·(w / 2) + 16·q, q < TR (TC): a warp reads 8 consecutive k
//     (one sector in float32) of 4 rows, and stores them to banks 4·k + row, all distinct;
//   along j (B stored [k][j]): thread t takes j = t % BN of the rows k = t / BN + (256 / BN)·q: a
//     warp reads and stores 32 consecutive columns.
// The k-major mapping splits a row's 16 k over two warps: the non-finite guards of a row are summed
// over 8 lanes by shuffles, then over the two warps in shared memory.
template <typename acc_t, int TR, int TC, typename ALoad, typename BLoad, typename Epi>
__global__ void __launch_bounds__(kTileThreads, (fma_min_blocks<acc_t, TR, TC, Epi>()))
tile_gemm_rows_kernel(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P, int64_t ppb,
                      ALoad A, BLoad B, Epi epi) {
  constexpr int BM = 16 * TR, BN = 16 * TC;
  constexpr bool kKMajorB = b_k_contiguous<BLoad>::value;
  static_assert(kTileK == 16 && kTileThreads == 256, "the loader mappings assume 16 k and 256 threads");
  __shared__ __align__(16) acc_t As[2][kTileK][BM + 4];  // double-buffered operand tiles
  __shared__ __align__(16) acc_t Bs[2][kTileK][BN + 4];
  __shared__ acc_t guard_rows[BM];
  __shared__ acc_t guard_half[2][BM];
  __shared__ acc_t scratch[16][BN];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int lane = tid % 32, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  // k-major loaders: k offset and the first row (column) of this thread; rows (columns) step by 16.
  const int km_k = lane % 8 + 8 * (warp % 2);
  const int km_r = (lane / 8) % 4 + 4 * (warp / 2);
  // j-major B loader.
  constexpr int kJRows = 256 / BN;
  const int jm_j = tid % BN, jm_k = tid / BN;

  typename Epi::State st;
  epi.init(st);

  int64_t p_begin, p_end;
  block_problems(P, ppb, p_begin, p_end);
  for (int64_t p = p_begin; p < p_end; ++p) {
    acc_t guard[TR];
#pragma unroll
    for (int q = 0; q < TR; ++q) guard[q] = 0;
    for (int64_t j0 = 0; j0 < Ncols; j0 += BN) {
      acc_t c[TR][TC];
#pragma unroll
      for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TC; ++j) c[i][j] = 0;

      int64_t kbeg, kend;
      k_range(tri, K, j0, BN, kbeg, kend);
      const bool first = (j0 == 0);
      // Software pipeline: within a column block, each k tile's global loads are issued into registers
      // (ra, rb) before the FMAs of the tile before it and stored into the other shared buffer after
      // them, so their latency hides behind the math (at 1–3 blocks an SM no other block covers it), and
      // one barrier a tile suffices: buffer b is rewritten only after the barrier that ends every
      // thread's reads of it. (Prefetching a column block's first tile across the previous block's
      // epilogue keeps ra, rb live through it: ptxas spills most epilogues then, under 80 and 128.)
      acc_t ra[TR], rb[TC];
      auto load = [&](int64_t k0) {
        const int64_t k = k0 + km_k;
#pragma unroll
        for (int q = 0; q < TR; ++q) {
          const int64_t row = row0 + km_r + 16 * q;
          acc_t v = 0;
          if (row < M && k < kend) {
            acc_t g = 0;
            v = A(p, row, k, g);
            if (first) guard[q] += g;
          }
          ra[q] = v;
        }
        if constexpr (kKMajorB) {
#pragma unroll
          for (int q = 0; q < TC; ++q) {
            const int64_t j = j0 + km_r + 16 * q;
            rb[q] = (k < kend && j < Ncols) ? B(p, k, j) : acc_t(0);
          }
        } else {
#pragma unroll
          for (int q = 0; q < TC; ++q) {
            const int64_t kq = k0 + jm_k + kJRows * q, j = j0 + jm_j;
            rb[q] = (kq < kend && j < Ncols) ? B(p, kq, j) : acc_t(0);
          }
        }
      };
      auto store = [&](int b) {
#pragma unroll
        for (int q = 0; q < TR; ++q) As[b][km_k][km_r + 16 * q] = ra[q];
        if constexpr (kKMajorB) {
#pragma unroll
          for (int q = 0; q < TC; ++q) Bs[b][km_k][km_r + 16 * q] = rb[q];
        } else {
#pragma unroll
          for (int q = 0; q < TC; ++q) Bs[b][jm_k + kJRows * q][jm_j] = rb[q];
        }
      };
      int buf = 0;
      if (kbeg < kend) {
        load(kbeg);
        store(0);
      }
      __syncthreads();
      for (int64_t k0 = kbeg; k0 < kend; k0 += kTileK) {
        const bool more = k0 + kTileK < kend;
        if (more) load(k0 + kTileK);
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
          acc_t a[TR], b[TC];
          lds_vec<TR>(&As[buf][kk][ty * TR], a);
          lds_vec<TC>(&Bs[buf][kk][tx * TC], b);
#pragma unroll
          for (int i = 0; i < TR; ++i)
#pragma unroll
            for (int j = 0; j < TC; ++j) c[i][j] += a[i] * b[j];
        }
        if (more) store(buf ^ 1);
        __syncthreads();
        buf ^= 1;
      }
      if (first) {
        // A row's guards: 8 adjacent lanes (xor 1, 2, 4) in each of two warps.
#pragma unroll
        for (int q = 0; q < TR; ++q) {
          acc_t g = guard[q];
          g += __shfl_xor_sync(0xffffffffu, g, 1);
          g += __shfl_xor_sync(0xffffffffu, g, 2);
          g += __shfl_xor_sync(0xffffffffu, g, 4);
          if (lane % 8 == 0) guard_half[warp % 2][km_r + 16 * q] = g;
        }
        __syncthreads();
        if (tid < BM) guard_rows[tid] = guard_half[0][tid] + guard_half[1][tid];
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

// ---- tensor-core variant ----------------------------------------------------------------------
//
// The same contract (ALoad, BLoad, Epi<4, 4>, problems, guards) with the products on tensor cores
// (WMMA m16n16k8, TF32 inputs, float32 accumulation): float32 only, 64×64 output blocks, K in
// steps of 32. The 8 warps each own a 16×32 strip of the block (two accumulator fragments); after
// a column block's K loop the accumulators go through shared memory (aliasing the operand tiles)
// so that each thread hands the epilogue the same c[4][4] (rows 4·ty + i, columns 4·tx + j) as the
// FMA kernel — every epilogue runs unchanged on either kernel.
//
// Loads are coalesced along the contiguous axis of each operand: A tiles row by row (k fastest);
// B tiles along k when BLoad declares `enum { kKContiguous = 1 };` (B[k][j] stored
// as rows j: a transposed factor, y or a reference set), else along j. The next K tile's loads are
// issued into registers before the current tile's mma, so global latency overlaps the math.
//
// Split (Tf32x3): each operand a = big + small with big = tf32(a), small = tf32(a − big), and the
// product accumulated as small·big + big·small + big·big (float32-level accuracy, 3 mma), each
// k-step's partial added to the running sum outside the tensor cores (they truncate).

constexpr int kTcK = 32;         // K per shared-memory tile
constexpr int kTcPad = 4;        // floats of row padding (conflict-free fragment loads, 32-byte aligned rows)
constexpr int kTcLd = kTcK + kTcPad;

template <bool kKMajorB>
struct TcSmem {
  static constexpr int kA = 64 * kTcLd;                           // A[r][k]
  static constexpr int kB = kKMajorB ? 64 * kTcLd : kTcK * (64 + kTcPad);  // B[j][k] or B[k][j]
  static constexpr int kC = 64 * (64 + kTcPad);                   // C[r][j] (after the K loop)
  static constexpr int kFloats = (kA + kB) > kC ? (kA + kB) : kC;
};

// Blocks per SM the tensor-core kernel is compiled for: kBlocks128 (16 warps an SM on sm_90 to hide
// the MMA and load latencies) unless the epilogue declares `enum { kTcMinBlocks = 1 };` (its state
// would spill under 128). (Unbounded, the kernel took 150–172 registers: one block an SM.)
template <typename E, typename = void>
struct epi_tc_min_blocks : std::integral_constant<int, kBlocks128> {};
template <typename E>
struct epi_tc_min_blocks<E, std::void_t<decltype(E::kTcMinBlocks)>> : std::integral_constant<int, int(E::kTcMinBlocks)> {};

template <int TR, int TC, typename ALoad, typename BLoad, typename Epi, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, (epi_tc_min_blocks<Epi>::value))
tile_gemm_rows_tc_kernel(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P, int64_t ppb,
                         ALoad A, BLoad B, Epi epi) {
  static_assert(TR == 4 && TC == 4, "the tensor-core kernel runs 64×64 blocks (Epi<4, 4>)");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int BM = 64, BN = 64, BK = kTcK, LD = kTcLd, LDC = 64 + kTcPad;
  constexpr bool kKMajorB = b_k_contiguous<BLoad>::value;
  constexpr int LDB = kKMajorB ? kTcLd : 64 + kTcPad;
  using Smem = TcSmem<kKMajorB>;
  __shared__ __align__(128) float tiles[Smem::kFloats];
  __shared__ float guard_rows[BM];
  __shared__ float scratch[16][BN];
  float* As = tiles;             // As[r * LD + k]
  float* Bs = tiles + Smem::kA;  // kKMajorB: Bs[j * LDB + k]; else Bs[k * LDB + j]
  float* Cs = tiles;             // Cs[r * LDC + j], after the K loop

  const int tid = threadIdx.x, warp = tid / 32;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  // Warp tile: rows 16·(warp / 2), columns 32·(warp % 2) + {0, 16}.
  const int wr = 16 * (warp / 2), wc = 32 * (warp % 2);
  // Loader mapping: each thread 8 consecutive elements along the contiguous axis of one row —
  // A: row tid / 4, k 8·(tid % 4) + q; B along k: column tid / 4, k 8·(tid % 4) + q; B along j:
  // k tid / 8, j 8·(tid % 8) + q — so a warp reads 8 (or 4) rows of 128 (256) contiguous bytes.
  constexpr int kLoads = 8;
  static_assert(BM * BK == kTileThreads * kLoads && BK * BN == kTileThreads * kLoads, "loader mapping");
  const int a_r = tid / 4, a_k = 8 * (tid % 4);
  const int b_r = kKMajorB ? tid / 4 : tid / 8;        // j (k-major) or k
  const int b_c = kKMajorB ? 8 * (tid % 4) : 8 * (tid % 8);  // k (k-major) or j
  const int64_t a_row = row0 + a_r;

  typename Epi::State st;
  epi.init(st);

  int64_t p_begin, p_end;
  block_problems(P, ppb, p_begin, p_end);
  for (int64_t p = p_begin; p < p_end; ++p) {
    float guard = 0.f;
    for (int64_t j0 = 0; j0 < Ncols; j0 += BN) {
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2];
      wmma::fill_fragment(acc[0], 0.f);
      wmma::fill_fragment(acc[1], 0.f);

      int64_t kbeg, kend;
      k_range(tri, K, j0, BN, kbeg, kend);
      const bool first = (j0 == 0);

      float ra[kLoads], rb[kLoads];
      auto fetch = [&](int64_t k0) {
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int64_t k = k0 + a_k + q;
          float v = 0.f;
          if (a_row < M && k < kend) {
            float g = 0.f;
            v = A(p, a_row, k, g);
            if (first) guard += g;
          }
          ra[q] = v;
        }
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int64_t k = k0 + (kKMajorB ? b_c + q : b_r), j = j0 + (kKMajorB ? b_r : b_c + q);
          rb[q] = (k < kend && j < Ncols) ? B(p, k, j) : 0.f;
        }
      };

      if (kbeg < kend) fetch(kbeg);
      for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
        __syncthreads();  // the previous tile's fragments (or the previous epilogue's Cs) are read
        {
          float4* as = reinterpret_cast<float4*>(As + a_r * LD + a_k);
          as[0] = make_float4(ra[0], ra[1], ra[2], ra[3]);
          as[1] = make_float4(ra[4], ra[5], ra[6], ra[7]);
          float4* bs = reinterpret_cast<float4*>(Bs + b_r * LDB + b_c);
          bs[0] = make_float4(rb[0], rb[1], rb[2], rb[3]);
          bs[1] = make_float4(rb[4], rb[5], rb[6], rb[7]);
        }
        __syncthreads();
        if (k0 + BK < kend) fetch(k0 + BK);  // in flight during the mma below
#pragma unroll 1  // unrolled, the fragment loads of all k-steps are hoisted and spill (3xTF32)
        for (int ks = 0; ks < BK; ks += 8) {
          wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a_big, a_small;
          wmma::load_matrix_sync(a_big, As + wr * LD + ks, LD);
#pragma unroll
          for (int t = 0; t < a_big.num_elements; ++t) {
            const float v = a_big.x[t];
            a_big.x[t] = wmma::__float_to_tf32(v);
            if (kSplit) a_small.x[t] = wmma::__float_to_tf32(v - a_big.x[t]);
          }
#pragma unroll
          for (int f = 0; f < 2; ++f) {
            using BLayout = typename std::conditional<kKMajorB, wmma::col_major, wmma::row_major>::type;
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BLayout> b_big, b_small;
            const float* bp = kKMajorB ? Bs + (wc + 16 * f) * LDB + ks : Bs + ks * LDB + wc + 16 * f;
            wmma::load_matrix_sync(b_big, bp, LDB);
#pragma unroll
            for (int t = 0; t < b_big.num_elements; ++t) {
              const float v = b_big.x[t];
              b_big.x[t] = wmma::__float_to_tf32(v);
              if (kSplit) b_small.x[t] = wmma::__float_to_tf32(v - b_big.x[t]);
            }
            if (kSplit) {
              // The tensor cores add with truncation (round toward zero): accumulated over the whole
              // K loop inside them, that bias made 3xTF32 ~75x less accurate than FP32 FMAs on an
              // H200 (6.1e-6 vs 8.2e-8 at D = 256). So each k-step's three products go to a fresh
              // fragment, which is added to the running sum by FP32 adds (round to nearest): the
              // truncation stays within one step's partial sum (Ootomo & Yokota, 2022).
              wmma::fragment<wmma::accumulator, 16, 16, 8, float> part;
              wmma::fill_fragment(part, 0.f);
              wmma::mma_sync(part, a_small, b_big, part);
              wmma::mma_sync(part, a_big, b_small, part);
              wmma::mma_sync(part, a_big, b_big, part);
#pragma unroll
              for (int t = 0; t < part.num_elements; ++t) acc[f].x[t] += part.x[t];
            } else {
              wmma::mma_sync(acc[f], a_big, b_big, acc[f]);
            }
          }
        }
      }
      __syncthreads();  // every warp is done with As / Bs: Cs aliases them
      wmma::store_matrix_sync(Cs + wr * LDC + wc, acc[0], LDC, wmma::mem_row_major);
      wmma::store_matrix_sync(Cs + wr * LDC + wc + 16, acc[1], LDC, wmma::mem_row_major);
      if (first) {
        // The 4 loader threads of a row are adjacent lanes: combine their guards.
        float g = guard;
        g += __shfl_xor_sync(0xffffffffu, g, 1);
        g += __shfl_xor_sync(0xffffffffu, g, 2);
        if ((tid % 4) == 0) guard_rows[a_r] = g;
      }
      __syncthreads();
      float c[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 v = *reinterpret_cast<const float4*>(Cs + (4 * ty + i) * LDC + 4 * tx);
        c[i][0] = v.x;
        c[i][1] = v.y;
        c[i][2] = v.z;
        c[i][3] = v.w;
      }
      epi.block(st, c, p, row0, j0, &scratch[0][0], guard_rows);
    }
    epi.end_problem(st, p, row0, guard_rows);
    __syncthreads();  // guard_rows is rewritten by the next problem
  }
  epi.finish(st, row0);
#else
  __trap();  // compiled out below sm_80; matmul_mode_for never picks this kernel there
#endif
}

// One entry for both kernels: float32 with a tensor-core mode runs tile_gemm_rows_tc_kernel with
// Epi<4, 4> (whatever TR, TC say); everything else the FMA kernel with Epi<TR, TC>. The caller
// resolves the mode (sm_80+ for the tensor-core ones).
template <typename acc_t, int TR, int TC, template <int, int> class Epi, typename A, typename B,
          typename EArgs>
cudaError_t launch_tile_gemm_rows_mode(MatMode mode, int64_t M, int64_t K, int64_t Ncols, Tri tri,
                                       int64_t P, int64_t ppb, A a, B b, const EArgs& eargs,
                                       cudaStream_t stream) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mode != MatMode::Fma) {
      if (M <= 0 || P <= 0) return cudaSuccess;
      const int64_t bx = (M + 63) / 64, by = (P + ppb - 1) / ppb;
      if (bx > 0x7fffffffLL || by > 65535) return cudaErrorInvalidValue;
      using E = Epi<4, 4>;
      const E e{eargs};
      const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
      if (mode == MatMode::Tf32x3)
        tile_gemm_rows_tc_kernel<4, 4, A, B, E, true><<<grid, kTileThreads, 0, stream>>>(M, K, Ncols, tri, P, ppb, a, b, e);
      else
        tile_gemm_rows_tc_kernel<4, 4, A, B, E, false><<<grid, kTileThreads, 0, stream>>>(M, K, Ncols, tri, P, ppb, a, b, e);
      return cudaGetLastError();
    }
  }
  return launch_tile_gemm_rows<acc_t, TR, TC, Epi>(M, K, Ncols, tri, P, ppb, a, b, eargs, stream);
}

}  // namespace cuda
}  // namespace distkern
