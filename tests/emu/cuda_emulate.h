// A CPU stand-in for the CUDA features distkern's kernels use, so that their index arithmetic
// (loader mappings, shared-memory layouts, fragment addresses and alignment, reductions, tails,
// grid-stride loops) can be tested on a machine without a GPU. One block runs at a time on
// blockDim.x std::threads (kept from launch to launch); __shared__ variables are statics;
// __syncthreads and the warp shuffles are barriers, and so is a warp's mma.sync
// (emu::mma_tf32_16x8x8: the PTX fragment layout, and the tensor cores' arithmetic as far as the
// kernels' accuracy depends on it).
// The .cu sources are compiled as C++ after tests/emu/cu2cpp.py rewrites their launches
// (`k<<<grid, block, smem, stream>>>(args)` → `emu::launch([&] { k(args); }, grid, block, smem)`)
// and dynamic shared memory; tests/emu/stub/ stands in for <cuda_runtime.h> and <mma.h>.
// Used by tests/test_tile_emulation.py and tests/test_kernel_emulation.py only; the CUDA build
// never sees this file.
#pragma once

#define DISTKERN_CUDA_EMULATION 1

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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
inline std::vector<float> g_frag;  // 2 × 6 floats a thread: the operands of an emulated mma.sync
inline thread_local unsigned g_frag_phase = 0;
inline unsigned char* g_dyn = nullptr;

inline void* dyn_smem() { return g_dyn; }

// The threads that play a block's threads: made once, on first use, and kept for every later launch
// (a launch reuses threads 0..blockDim.x-1). Making blockDim.x std::threads per launch cost more than
// most emulated kernels, and far more under AddressSanitizer. Never destroyed: its threads wait on
// the condition variable until the process ends.
class Workers {
 public:
  // job(t) on threads t = 0..nt-1, returning when all of them have returned.
  void run(unsigned nt, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lk(m_);
    while (threads_.size() < nt) {
      const unsigned id = static_cast<unsigned>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
    job_ = &job;
    active_ = nt;
    remaining_ = nt;
    ++generation_;
    start_.notify_all();
    done_.wait(lk, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(unsigned id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      start_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;  // a launch with fewer threads than were ever made
      const std::function<void(unsigned)>* job = job_;
      lk.unlock();
      (*job)(id);
      lk.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

inline Workers& workers() {
  static Workers* w = new Workers;  // leaked on purpose (see above)
  return *w;
}

// kernel() over `grid` blocks (x, y, z) of `block` threads (1-D blocks, a multiple of 32), one block at a
// time; `smem` bytes of dynamic shared memory per block. Threads 0..block.x-1 of the pool above each run
// the blocks in order, and all of them meet at a barrier between two blocks (a block's shared memory and
// barriers are the next block's). The next launch starts when every thread has finished this one.
template <typename F>
void launch(F kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  const unsigned nt = block.x;
  if (block.y != 1 || block.z != 1 || nt == 0 || nt % 32 != 0 || nt > 1024) fail("block must be (32k, 1, 1)");
  std::vector<unsigned char> dyn(smem + 128);
  g_dyn = dyn.data() + (128 - reinterpret_cast<uintptr_t>(dyn.data()) % 128) % 128;
  g_xch.assign(nt, 0);
  g_frag.assign(2 * 6 * nt, 0.f);
  std::barrier<> blk(nt), between(nt);
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  g_warp.clear();
  for (unsigned w = 0; w < nt / 32; ++w) {
    warps.emplace_back(new std::barrier<>(32));
    g_warp.push_back(warps.back().get());
  }
  g_block = &blk;
  const std::function<void(unsigned)> job = [&](unsigned t) {
    threadIdx = dim3(t, 0, 0);
    threadIdx.y = threadIdx.z = 0;
    blockDim = block;
    gridDim = grid;
    g_frag_phase = 0;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          blockIdx.z = bz;
          kernel();
          between.arrive_and_wait();  // every thread done with this block before any starts the next
        }
  };
  workers().run(nt, job);
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

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for the calling warp (all 32 lanes call it):
// D = A·B + D on a 16×8×8 tile, lane (g, t) = (lane / 4, lane % 4) holding
//   a = {A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]}, b = {B[t][g], B[t + 4][g]},
//   d = {D[g][2t], D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1]}
// (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32). The operands cut to TF32 (the hardware reads
// only their top 19 bits), exact products, their sum and the accumulator rounded toward zero —
// kinder than the hardware, which also truncates while aligning the addends, but with the bias that
// builds up when a long K loop accumulates inside the tensor cores.
inline void mma_tf32_16x8x8(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  // One warp barrier a call: consecutive calls alternate between two copies of the operands, so a lane
  // rewrites a copy only after every lane has passed the barrier of the call that follows its reads.
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  float* const base = g_frag.data() + (g_frag_phase ^= 1u) * 6 * blockDim.x;
  float* mine = base + 6 * tid;
  for (int e = 0; e < 4; ++e) mine[e] = a[e];
  mine[4] = b[0];
  mine[5] = b[1];
  g_warp[w]->arrive_and_wait();
  auto tf32 = [](float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    std::memcpy(&v, &u, 4);
    return double(v);
  };
  const float* warp = base + 6 * 32 * w;
  auto A = [&](int r, int k) { return tf32(warp[6 * (4 * (r % 8) + k % 4) + (r / 8) + 2 * (k / 4)]); };
  auto B = [&](int k, int n) { return tf32(warp[6 * (4 * n + k % 4) + 4 + k / 4]); };
  for (int q = 0; q < 4; ++q) {
    const int r = g + 8 * (q / 2), n = 2 * t + q % 2;
    double s = d[q];
    for (int k = 0; k < 8; ++k) s += A(r, k) * B(k, n);
    float v = static_cast<float>(s);
    if (std::isfinite(v) && std::fabs(double(v)) > std::fabs(s)) v = std::nextafter(v, 0.f);
    d[q] = v;
  }
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
