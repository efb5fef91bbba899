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
// (mma.sync m16n8k8, TF32 inputs, float32 accumulation): float32 only, 64×64 output blocks, K in
// tiles of 16. The 8 warps each own a 32×16 strip of the block (2 × 2 mma tiles, 16 accumulators a
// thread); after a column block's K loop the accumulators go through shared memory (aliasing the
// operand tiles) so that each thread hands the epilogue the same c[4][4] (rows 4·ty + i, columns
// 4·tx + j) as the FMA kernel — every epilogue runs unchanged on either kernel.
//
// Shared memory holds both operands k-contiguous, As[r][k] and Bs[j][k] (row stride 24 floats),
// double-buffered with one barrier a tile, as the FMA kernel: the next tile's global loads are issued
// into registers before the current tile's mma and stored after them. Fragments are read straight
// from shared memory, one 64-bit load a fragment row: the k order inside a tile is free as long as A
// and B agree, so lane (g, t) = (lane / 4, lane % 4) takes k = 2t + 8s and 2t + 8s + 1 as its two k
// slots (t and t + 4 in the PTX layout) of k-step s — contiguous, and with stride 24 a half warp's
// rows g < 4 fall on banks 24g + 2t + {0, 1} mod 32, all distinct. Per tile and warp: 12 LDS.64 for
// 8 mma (24 for 3xTF32).
//
// Global loads, coalesced along the contiguous axis of each operand: along k (A; B when BLoad
// declares `enum { kKContiguous = 1 };`) lane l takes k = l % 16 of the rows km_r + 16q, q < 4, with
// the two half warps on rows 2 apart — a warp reads two 16-k runs per instruction and stores them to
// 32 distinct banks; along j (B stored [k][j]) lane l takes column 32·(warp / 4) + l and
// k = 4·(warp % 4) + q — a warp reads 32 consecutive columns per instruction and stores each thread's
// 4 k as one float4.
//
// Split (Tf32x3): each operand a = big + small with big = tf32(a), small = tf32(a − big), and the
// product accumulated as small·big + big·small + big·big (float32-level accuracy, 3 mma), each
// k-step's partial added to the running sum outside the tensor cores (they truncate).

constexpr int kTcK = 16;         // K per shared-memory tile
constexpr int kTcLd = 24;        // row stride of As / Bs (floats): ≡ 24 mod 32, rows 16-byte aligned
constexpr int kTcLdc = 64 + 8;   // row stride of Cs: ≡ 8 mod 32, conflict-free float2 stores

struct TcSmem {
  static constexpr int kTile = 64 * kTcLd;    // one operand tile, [64][kTcLd]
  static constexpr int kOps = 2 * 2 * kTile;  // A and B, double-buffered
  static constexpr int kC = 64 * kTcLdc;      // C[r][j] (after the K loop)
  static constexpr int kFloats = kOps > kC ? kOps : kC;
};

// d += a·b on the tensor cores for one m16n8k8 tile (TF32 operands as float bit patterns, already
// rounded by cvt.rna; float32 accumulation). Lane (g, t) = (lane / 4, lane % 4) holds
//   a[0] = A[g][t], a[1] = A[g + 8][t], a[2] = A[g][t + 4], a[3] = A[g + 8][t + 4],
//   b[0] = B[t][g], b[1] = B[t + 4][g],
//   d[0] = D[g][2t], d[1] = D[g][2t + 1], d[2] = D[g + 8][2t], d[3] = D[g + 8][2t + 1]
// (PTX ISA, "Matrix fragments for mma.m16n8k8" with .tf32). In the CPU emulation of tests/emu the
// same layout and the hardware's arithmetic are modelled by emu::mma_tf32_16x8x8 (cuda_emulate.h).
__device__ __forceinline__ void mma_tf32_16x8x8(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#endif
#elif defined(DISTKERN_CUDA_EMULATION)
  ::emu::mma_tf32_16x8x8(d, a, b);
#endif
}

// Blocks per SM the tensor-core kernel is compiled for: kBlocks128 (at most 128 registers on sm_90;
// unbounded, TF32 took 89–120 with the Mahalanobis epilogues, 3xTF32 114–152) unless the epilogue
// declares `enum { kTcMinBlocks = n };` (its state would spill under 128), and for 3xTF32
// `enum { kTcSplitMinBlocks = n };` where the split operands make the difference.
template <typename E, typename = void>
struct epi_tc_min_blocks : std::integral_constant<int, kBlocks128> {};
template <typename E>
struct epi_tc_min_blocks<E, std::void_t<decltype(E::kTcMinBlocks)>> : std::integral_constant<int, int(E::kTcMinBlocks)> {};
template <typename E, typename = void>
struct epi_tc_split_min_blocks : epi_tc_min_blocks<E> {};
template <typename E>
struct epi_tc_split_min_blocks<E, std::void_t<decltype(E::kTcSplitMinBlocks)>>
    : std::integral_constant<int, int(E::kTcSplitMinBlocks)> {};

template <int TR, int TC, typename ALoad, typename BLoad, typename Epi, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, (kSplit ? epi_tc_split_min_blocks<Epi>::value : epi_tc_min_blocks<Epi>::value))
tile_gemm_rows_tc_kernel(int64_t M, int64_t K, int64_t Ncols, Tri tri, int64_t P, int64_t ppb,
                         ALoad A, BLoad B, Epi epi) {
  static_assert(TR == 4 && TC == 4, "the tensor-core kernel runs 64×64 blocks (Epi<4, 4>)");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = 64, BN = 64, BK = kTcK, LD = kTcLd, LDC = kTcLdc;
  constexpr bool kKMajorB = b_k_contiguous<BLoad>::value;
  static_assert(BM * BK == kTileThreads * 4 && BN * BK == kTileThreads * 4, "loader mapping: 4 values a thread");
  __shared__ __align__(128) float tiles[TcSmem::kFloats];
  __shared__ float guard_rows[BM];
  __shared__ float scratch[16][BN];
  float* const Cs = tiles;  // Cs[r * LDC + j], after the K loop

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tx = tid % 16, ty = tid / 16;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int wr = 32 * (warp / 4), wc = 16 * (warp % 4);  // this warp's 32×16 strip
  // k-major loaders: value q of a tile at k km_k of row (column) km_r + 16q.
  const int km_k = lane % 16, km_r = warp % 2 + 2 * (lane / 16) + 4 * (warp / 2);
  // j-major B loader: column jm_j, k jm_k + q.
  const int jm_j = 32 * (warp / 4) + lane, jm_k = 4 * (warp % 4);

  typename Epi::State st;
  epi.init(st);

  int64_t p_begin, p_end;
  block_problems(P, ppb, p_begin, p_end);
  for (int64_t p = p_begin; p < p_end; ++p) {
    float guard[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) guard[q] = 0.f;
    for (int64_t j0 = 0; j0 < Ncols; j0 += BN) {
      float acc[2][2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

      int64_t kbeg, kend;
      k_range(tri, K, j0, BN, kbeg, kend);
      const bool first = (j0 == 0);

      float ra[4], rb[4];
      auto load = [&](int64_t k0) {
        const int64_t k = k0 + km_k;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t row = row0 + km_r + 16 * q;
          float v = 0.f;
          if (row < M && k < kend) {
            float gd = 0.f;
            v = A(p, row, k, gd);
            if (first) guard[q] += gd;
          }
          ra[q] = v;
        }
        if constexpr (kKMajorB) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t j = j0 + km_r + 16 * q;
            rb[q] = (k < kend && j < Ncols) ? B(p, k, j) : 0.f;
          }
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t kq = k0 + jm_k + q, j = j0 + jm_j;
            rb[q] = (kq < kend && j < Ncols) ? B(p, kq, j) : 0.f;
          }
        }
      };
      // TF32 rounds each operand once, here, rather than in every warp that reads it (an A value feeds
      // 4 warps, a B value 2); 3xTF32 keeps the float32 value for its split.
      auto operand = [](float v) { return kSplit ? v : nvcuda::wmma::__float_to_tf32(v); };
      auto store = [&](int buf) {
        float* As = tiles + buf * 2 * TcSmem::kTile;
        float* Bs = As + TcSmem::kTile;
#pragma unroll
        for (int q = 0; q < 4; ++q) As[(km_r + 16 * q) * LD + km_k] = operand(ra[q]);
        if constexpr (kKMajorB) {
#pragma unroll
          for (int q = 0; q < 4; ++q) Bs[(km_r + 16 * q) * LD + km_k] = operand(rb[q]);
        } else {
          *reinterpret_cast<float4*>(Bs + jm_j * LD + jm_k) =
              make_float4(operand(rb[0]), operand(rb[1]), operand(rb[2]), operand(rb[3]));
        }
      };
      // One 16-wide k tile of mma from buffer buf, k-step by k-step: lane (g, t)'s two k slots of step
      // s are k = 2t + 8s and 2t + 8s + 1, one float2 a fragment row.
      auto compute = [&](int buf) {
        const float* As = tiles + buf * 2 * TcSmem::kTile;
        const float* Bs = As + TcSmem::kTile;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          float b_big[2][2], b_small[2][2];
#pragma unroll
          for (int ni = 0; ni < 2; ++ni) {
            const float2 bb = *reinterpret_cast<const float2*>(Bs + (wc + 8 * ni + g) * LD + 2 * t + 8 * s);
            const float v[2] = {bb.x, bb.y};
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              b_big[ni][e] = kSplit ? nvcuda::wmma::__float_to_tf32(v[e]) : v[e];  // TF32: rounded in store
              if (kSplit) b_small[ni][e] = nvcuda::wmma::__float_to_tf32(v[e] - b_big[ni][e]);
            }
          }
          // one 16-row tile of A at a time (its split halves are the 3xTF32 kernel's largest state)
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            const float2 lo = *reinterpret_cast<const float2*>(As + (wr + 16 * mi + g) * LD + 2 * t + 8 * s);
            const float2 hi = *reinterpret_cast<const float2*>(As + (wr + 16 * mi + 8 + g) * LD + 2 * t + 8 * s);
            // slots: a[0] = (g, k0), a[1] = (g + 8, k0), a[2] = (g, k1), a[3] = (g + 8, k1)
            const float v[4] = {lo.x, hi.x, lo.y, hi.y};
            float a_big[4], a_small[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              a_big[e] = kSplit ? nvcuda::wmma::__float_to_tf32(v[e]) : v[e];  // TF32: rounded in store
              if (kSplit) a_small[e] = nvcuda::wmma::__float_to_tf32(v[e] - a_big[e]);
            }
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
              if (kSplit) {
                // The tensor cores add with truncation (round toward zero): accumulated over the whole
                // K loop inside them, that bias made 3xTF32 ~75x less accurate than FP32 FMAs on an
                // H200 (6.1e-6 vs 8.2e-8 at D = 256). So each k-step's three products go to a fresh
                // partial, added to the running sum by FP32 adds (round to nearest): the truncation
                // stays within one step's partial sum (Ootomo & Yokota, 2022).
                float part[4] = {0.f, 0.f, 0.f, 0.f};
                mma_tf32_16x8x8(part, a_small, b_big[ni]);
                mma_tf32_16x8x8(part, a_big, b_small[ni]);
                mma_tf32_16x8x8(part, a_big, b_big[ni]);
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[mi][ni][q] += part[q];
              } else {
                mma_tf32_16x8x8(acc[mi][ni], a_big, b_big[ni]);
              }
            }
          }
        }
      };

      // Software pipeline (as the FMA kernel): tile k+1's global loads in registers during tile k's
      // mma, stored into the other buffer after them; one barrier a tile. The barrier before the
      // first store ends every thread's reads of Cs (which aliases the tiles) from the previous
      // column block's epilogue.
      int buf = 0;
      if (kbeg < kend) load(kbeg);
      __syncthreads();
      if (kbeg < kend) store(0);
      __syncthreads();
      for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
        const bool more = k0 + BK < kend;
        if (more) load(k0 + BK);
        compute(buf);
        if (more) store(buf ^ 1);
        __syncthreads();
        buf ^= 1;
      }
      // (every warp is past its last reads of the tiles: the loop ended on a barrier)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<float2*>(Cs + (wr + 16 * mi + 8 * h + g) * LDC + wc + 8 * ni + 2 * t) =
                make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      if (first) {
        // Row km_r + 16q's guards are spread over the 16 lanes of one half warp (its k).
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float gs = guard[q];
#pragma unroll
          for (int o = 8; o > 0; o /= 2) gs += __shfl_xor_sync(0xffffffffu, gs, o);
          if (km_k == 0) guard_rows[km_r + 16 * q] = gs;
        }
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
