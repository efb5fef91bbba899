// A CPU stand-in for the CUDA features distkern's kernels use, so that their index arithmetic
// (loader mappings, shared-memory layouts, fragment addresses and alignment, reductions, tails,
// grid-stride loops) can be tested on a machine without a GPU. One block runs at a time as
// blockDim.x std::threads; __shared__ variables are statics;
// __syncthreads and the warp shuffles are barriers. WMMA fragments hold the whole tile in every
// lane (the hardware spreads it over the warp; the mock only keeps the documented semantics of
// load / mma / store, and checks the pointer alignment and leading dimensions the API requires).
// The .cu sources are compiled as C++ after tests/emu/cu2cpp.py rewrites their launches
// (`k<<<grid, block, smem, stream>>>(args)` → `emu::launch([&] { k(args); }, grid, block, smem)`)
// and dynamic shared memory; tests/emu/stub/ stands in for <cuda_runtime.h> and <mma.h>.
// Used by tests/test_tile_emulation.py and tests/test_kernel_emulation.py only; the CUDA build
// never sees this file.
#pragma once

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

// CUDA's own host-side vector types (dim3, float4, make_float4, ...), then our qualifiers over the
// ones its host_defines.h made.
#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// cudaError_t, cudaStream_t, ... come from CUDA's driver_types.h (through vector_types.h); the
// runtime calls the launchers make are no-ops here.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: %s\n", what);
  std::abort();
}

inline std::barrier<>* g_block = nullptr;
inline std::vector<std::barrier<>*> g_warp;
inline std::vector<int64_t> g_xch;
inline unsigned char* g_dyn = nullptr;

inline void* dyn_smem() { return g_dyn; }

// kernel() over `grid` blocks (x, y, z) of `block` threads (1-D blocks, a multiple of 32), one block at a
// time; `smem` bytes of dynamic shared memory per block. The block's threads are std::threads made
// once per launch: each runs the blocks in order, and all of them meet at a barrier between two
// blocks (a block's shared memory and barriers are the next block's).
template <typename F>
void launch(F kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  const unsigned nt = block.x;
  if (block.y != 1 || block.z != 1 || nt == 0 || nt % 32 != 0 || nt > 1024) fail("block must be (32k, 1, 1)");
  std::vector<unsigned char> dyn(smem + 128);
  g_dyn = dyn.data() + (128 - reinterpret_cast<uintptr_t>(dyn.data()) % 128) % 128;
  g_xch.assign(nt, 0);
  std::barrier<> blk(nt), between(nt);
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  g_warp.clear();
  for (unsigned w = 0; w < nt / 32; ++w) {
    warps.emplace_back(new std::barrier<>(32));
    g_warp.push_back(warps.back().get());
  }
  g_block = &blk;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      threadIdx = dim3(t, 0, 0);
      threadIdx.y = threadIdx.z = 0;
      blockDim = block;
      gridDim = grid;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            blockIdx.z = bz;
            kernel();
            between.arrive_and_wait();  // every thread done with this block before any starts the next
          }
    });
  for (auto& t : ts) t.join();
}

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int t = threadIdx.x, w = t / 32;
  int64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_xch[t] = bits;
  g_warp[w]->arrive_and_wait();
  bits = g_xch[w * 32 + src_lane];
  g_warp[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

inline void __syncthreads() { emu::g_block->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int off, int width = 32) {
  const int lane = threadIdx.x % 32, seg = lane / width * width;
  const int src = lane ^ off;
  return emu::exchange(v, src >= seg && src < seg + width ? src : lane);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned off, int width = 32) {
  const int lane = threadIdx.x % 32, seg = lane / width * width;
  const int src = lane + static_cast<int>(off);
  return emu::exchange(v, src < seg + width ? src : lane);
}

// The lanes of the warp holding the same value as this one (all 32 lanes must call it: the kernels
// call it from warp-uniform code with the full mask, which is what it checks).
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(sizeof(T) <= 8, "match of at most 8 bytes");
  if (mask != 0xffffffffu) emu::fail("__match_any_sync: only the full mask is emulated");
  const int t = threadIdx.x, w = t / 32;
  int64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::g_xch[t] = bits;
  emu::g_warp[w]->arrive_and_wait();
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l)
    if (emu::g_xch[w * 32 + l] == bits) peers |= 1u << l;
  emu::g_warp[w]->arrive_and_wait();
  return peers;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

template <typename T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }

template <typename T>
T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }

template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T cur = a.load();
  while (v > cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

// Blocks run one after another here, so there is nothing to order; the kernels' fences are checked on
// hardware only.
inline void __threadfence() {}

template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

inline unsigned int __float_as_uint(float v) { unsigned int u; std::memcpy(&u, &v, 4); return u; }
inline float __uint_as_float(unsigned int u) { float v; std::memcpy(&v, &u, 4); return v; }
inline long long __double_as_longlong(double v) { long long u; std::memcpy(&u, &v, 8); return u; }
inline double __longlong_as_double(long long u) { double v; std::memcpy(&v, &u, 8); return v; }

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K>
struct dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };

// The whole R×C tile, row-major, in every lane.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  float x[R * C];
};

inline void check_ptr(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma pointer not 256-bit aligned");
  if (ldm % 4 != 0) emu::fail("wmma ldm (float) not a multiple of 4");
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  check_ptr(p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c)
      f.x[r * F::C + c] = std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  // The hardware's TF32 MMA: exact products, the k-sum and c added, the result truncated to float32
  // (round toward zero). Modelled as the exact sum (double: 8 products of 11-bit mantissas and c) cut
  // toward zero — kinder than the hardware, which also truncates while aligning the addends, but it
  // has the bias that builds up when a long K loop accumulates inside the tensor cores.
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s += double(a.x[m * K + k]) * double(b.x[k * N + n]);
      float r = static_cast<float>(s);
      if (std::isfinite(r) && std::fabs(double(r)) > std::fabs(s)) r = std::nextafter(r, 0.f);
      out[m * N + n] = r;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_ptr(p, ldm);
  if (threadIdx.x % 32 != 0) return;  // one writer per warp (the lanes hold the same tile)
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) (layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.x[m * N + n];
}

// cvt.rna.tf32.f32: round to the nearest 10-bit mantissa, ties away from zero.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
