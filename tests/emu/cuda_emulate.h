// A CPU stand-in for the few CUDA features the tile-product skeleton uses, so that its index
// arithmetic (loader mappings, shared-memory layouts, fragment addresses and alignment, the
// accumulator hand-off to the epilogue, guards, triangles, problems) can be tested on a machine
// without a GPU. One block runs at a time as 256 std::threads; __shared__ variables are statics;
// __syncthreads and the warp shuffles are barriers. WMMA fragments hold the whole tile in every
// lane (the hardware spreads it over the warp; the mock only keeps the documented semantics of
// load / mma / store, and checks the pointer alignment and leading dimensions the API requires).
// Used by tests/test_tile_emulation.py only; the CUDA build never sees this file.
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx, blockIdx;

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

namespace emu {

constexpr int kThreads = 256;
inline std::barrier<>* g_block = nullptr;
inline std::barrier<>* g_warp[kThreads / 32] = {};
inline int64_t g_xch[kThreads];

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: %s\n", what);
  std::abort();
}

// Run kernel(args...) over a grid of (gx, gy) blocks of 256 threads, one block at a time.
template <typename F>
void launch(unsigned gx, unsigned gy, F kernel) {
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::barrier<> block(kThreads);
      std::vector<std::barrier<>*> warps;
      for (int w = 0; w < kThreads / 32; ++w) warps.push_back(new std::barrier<>(32));
      g_block = &block;
      for (int w = 0; w < kThreads / 32; ++w) g_warp[w] = warps[w];
      std::vector<std::thread> ts;
      for (int t = 0; t < kThreads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = dim3{static_cast<unsigned>(t), 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel();
        });
      for (auto& t : ts) t.join();
      for (auto* w : warps) delete w;
    }
}

}  // namespace emu

inline void __syncthreads() { emu::g_block->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  int64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::g_xch[t] = bits;
  emu::g_warp[w]->arrive_and_wait();
  bits = emu::g_xch[w * 32 + (lane ^ off)];
  emu::g_warp[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

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
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s = std::fma(a.x[m * K + k], b.x[k * N + n], s);
      out[m * N + n] = s;
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
