// A CPU stand-in for the CUDA features distkern's kernels use, so that their index arithmetic
// (loader mappings, shared-memory layouts, fragment addresses and alignment, reductions, tails,
// grid-stride loops) can be tested on a machine without a GPU. One block runs at a time, its blockDim.x
// threads as fibers of the calling thread; __shared__ variables are statics;
// __syncthreads and the warp shuffles are barriers, and so is a warp's mma.sync
// (emu::mma_tf32_16x8x8: the PTX fragment layout, and the tensor cores' arithmetic as far as the
// kernels' accuracy depends on it).
// Fibers, not OS threads: a barrier is a switch within one thread instead of a futex wake-up per thread
// (with std::threads the emulated tests spent more time in the kernel's scheduler than in the kernels:
// 80 M context switches, as much system time as user time). The fibers of a block run in thread order up
// to the first barrier, in reverse order up to the next, and so on: a read of another thread's
// shared-memory write with no barrier between them sees the old value whenever the reader runs first (a
// later thread's write in the forward phases, an earlier one's in the reverse ones), where OS threads
// left it to chance. A barrier that not every thread reaches stops the run with a message (deadlock)
// instead of hanging it. tests/emu/emu_selftest.cpp checks these properties.
// The .cu sources are compiled as C++ after tests/emu/cu2cpp.py rewrites their launches
// (`k<<<grid, block, smem, stream>>>(args)` → `emu::launch([&] { k(args); }, grid, block, smem)`)
// and dynamic shared memory; tests/emu/stub/ stands in for <cuda_runtime.h> and <mma.h>.
// Used by tests/test_tile_emulation.py and tests/test_kernel_emulation.py only; the CUDA build
// never sees this file.
#pragma once

#define DISTKERN_CUDA_EMULATION 1

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define DK_EMU_ASAN 1
#else
#define DK_EMU_ASAN 0
#endif

// A switch between two fibers' stacks: on x86-64 a few instructions of our own (swapcontext also saves
// the signal mask, a system call per switch, and AddressSanitizer intercepts it to clear the shadow of the
// whole target stack each time, which made the sanitized emulation slower than with OS threads); elsewhere
// ucontext. dk_emu_switch(&from_sp, to_sp) saves the callee-saved registers, the x87 control word and
// MXCSR on the current stack, stores its pointer in from_sp and continues on to_sp's stack.
#if defined(__x86_64__) && !defined(DK_EMU_UCONTEXT)
#define DK_EMU_ASM_SWITCH 1
extern "C" void dk_emu_switch(void** from_sp, void* to_sp);
__asm__(
    ".text\n"
    ".weak dk_emu_switch\n"
    ".type dk_emu_switch,@function\n"
    "dk_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $16, %rsp\n"
    "  stmxcsr 8(%rsp)\n"
    "  fnstcw (%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  fldcw (%rsp)\n"
    "  ldmxcsr 8(%rsp)\n"
    "  addq $16, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size dk_emu_switch,.-dk_emu_switch\n");
#else
#define DK_EMU_ASM_SWITCH 0
#endif

// The running fiber's indices: one OS thread plays every thread of a block, and the scheduler sets
// threadIdx before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

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

class Barrier;

// The fibers of one launch: job(t) for t = 0..nt-1, each on its own stack (mmap'd once, with a guard page
// below it, and kept for later launches), switched by dk_emu_switch. A fiber runs until it waits at a
// barrier or returns; run() sweeps over the runnable fibers, alternating the direction of the sweeps.
class Scheduler {
 public:
  void run(unsigned nt, const std::function<void(unsigned)>& job) {
    const size_t page = 4096;
    while (stacks_.size() < nt) {
      void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
      mprotect(m, page, PROT_NONE);  // overflowing a fiber's stack faults instead of corrupting its neighbour
      stacks_.push_back(static_cast<char*>(m) + page);
    }
    fibers_.assign(nt, Fiber{});
    job_ = &job;
    for (unsigned t = 0; t < nt; ++t) {
      Fiber& f = fibers_[t];
#if DK_EMU_ASM_SWITCH
      // the frame dk_emu_switch pops: control words, r15..r12, rbx, rbp, then `ret` into entry() with
      // a zero return address above it (the unwinders stop there), the stack 16-byte aligned at its call
      uint64_t* sp = reinterpret_cast<uint64_t*>(stacks_[t] + kStack);
      *--sp = 0;
      *--sp = reinterpret_cast<uint64_t>(&Scheduler::entry);
      for (int r = 0; r < 6; ++r) *--sp = 0;
      sp -= 2;
      uint32_t mxcsr;
      uint16_t fcw;
      __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
      __asm__ volatile("fnstcw %0" : "=m"(fcw));
      std::memcpy(sp, &fcw, sizeof(fcw));
      std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
      f.sp = sp;
#else
      if (getcontext(&f.ctx) != 0) fail("getcontext failed");
      f.ctx.uc_stack.ss_sp = stacks_[t];
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &Scheduler::entry, 0);
#endif
    }
    unsigned left = nt;
    bool forward = true;
    while (left > 0) {
      bool progress = false;
      for (unsigned k = 0; k < nt; ++k) {
        const unsigned t = forward ? k : nt - 1 - k;
        if (!runnable(fibers_[t])) continue;
        progress = true;
        resume(t);
        if (fibers_[t].done) --left;
      }
      if (!progress) deadlock();
      forward = !forward;
    }
    job_ = nullptr;
  }

  // From a fiber: wait until `b` has left phase `phase`, resumed by a later sweep (a barrier's last
  // arrival too, which has just closed that phase: the next phase starts in the scheduler's order).
  void wait(const Barrier* b, uint64_t phase) {
    Fiber& f = fibers_[cur_];
    f.wait = b;
    f.wait_phase = phase;
    to_scheduler(f);
  }

 private:
  struct Fiber {
#if DK_EMU_ASM_SWITCH
    void* sp = nullptr;  // its saved stack pointer while switched out
#else
    ucontext_t ctx;
#endif
    bool done = false;
    const Barrier* wait = nullptr;
    uint64_t wait_phase = 0;
    void* fake_stack = nullptr;  // ASan's fake-stack handle while switched out
  };

  static void entry();
  bool runnable(const Fiber& f) const;
  [[noreturn]] void deadlock() const;

  void resume(unsigned t) {
    cur_ = t;
    threadIdx = dim3(t, 0, 0);
    threadIdx.y = threadIdx.z = 0;
    Fiber& f = fibers_[t];
    f.wait = nullptr;
#if DK_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, stacks_[t], kStack);
#endif
#if DK_EMU_ASM_SWITCH
    dk_emu_switch(&main_sp_, f.sp);
#else
    if (swapcontext(&main_, &f.ctx) != 0) fail("swapcontext failed");
#endif
#if DK_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }

  void to_scheduler(Fiber& f) {
#if DK_EMU_ASAN
    __sanitizer_start_switch_fiber(f.done ? nullptr : &f.fake_stack, main_bottom_, main_size_);
#endif
#if DK_EMU_ASM_SWITCH
    dk_emu_switch(&f.sp, main_sp_);
#else
    if (swapcontext(&f.ctx, &main_) != 0) fail("swapcontext failed");
#endif
#if DK_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &main_bottom_, &main_size_);
#endif
  }

  static constexpr size_t kStack = size_t(1) << 19;  // 512 KiB a fiber: ASan's -O0 frames are large

  std::vector<Fiber> fibers_;
  std::vector<char*> stacks_;
#if DK_EMU_ASM_SWITCH
  void* main_sp_ = nullptr;
#else
  ucontext_t main_;
#endif
  unsigned cur_ = 0;
  const std::function<void(unsigned)>* job_ = nullptr;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
};

inline Scheduler& scheduler() {
  static Scheduler* s = new Scheduler;  // leaked on purpose: its stacks serve every launch
  return *s;
}

// std::barrier's arrive_and_wait for the fibers of the running launch: the last of n arrivals opens the
// next phase; every arrival hands over to the scheduler.
class Barrier {
 public:
  Barrier(unsigned n, const char* what) : n_(n), what_(what) {}
  void arrive_and_wait() {
    const uint64_t phase = phase_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++phase_;
    }
    scheduler().wait(this, phase);
  }
  uint64_t phase() const { return phase_; }
  const char* what() const { return what_; }

 private:
  unsigned n_, arrived_ = 0;
  uint64_t phase_ = 0;
  const char* what_;
};

inline bool Scheduler::runnable(const Fiber& f) const {
  return !f.done && (f.wait == nullptr || f.wait->phase() != f.wait_phase);
}

inline void Scheduler::deadlock() const {
  // the waiting threads by barrier: how many, and the first of them
  std::vector<std::pair<const Barrier*, std::pair<size_t, size_t>>> at;
  for (size_t t = 0; t < fibers_.size(); ++t) {
    if (fibers_[t].done) continue;
    size_t k = 0;
    while (k < at.size() && at[k].first != fibers_[t].wait) ++k;
    if (k == at.size()) at.push_back({fibers_[t].wait, {0, t}});
    ++at[k].second.first;
  }
  std::fprintf(stderr, "emulation: deadlock, a barrier that not every thread of the block reaches; waiting:");
  for (const auto& [b, n] : at)
    std::fprintf(stderr, " %zu thread(s) from t%zu at %s;", n.first, n.second, b != nullptr ? b->what() : "?");
  std::fprintf(stderr, "\n");
  std::abort();
}

inline void Scheduler::entry() {
  Scheduler& s = scheduler();
#if DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_bottom_, &s.main_size_);
#endif
  (*s.job_)(s.cur_);
  Fiber& f = s.fibers_[s.cur_];
  f.done = true;
  s.to_scheduler(f);  // never resumed
  fail("a finished fiber was resumed");
}

inline Barrier* g_block = nullptr;
inline std::vector<Barrier*> g_warp;
inline std::vector<int64_t> g_xch;
inline std::vector<float> g_frag;             // 2 × 6 floats a thread: the operands of an emulated mma.sync
inline std::vector<unsigned> g_frag_phase;    // a thread's copy of those operands (0 / 1) for its next mma
inline unsigned char* g_dyn = nullptr;

inline void* dyn_smem() { return g_dyn; }

// kernel() over `grid` blocks (x, y, z) of `block` threads (1-D blocks, a multiple of 32), one block at a
// time; `smem` bytes of dynamic shared memory per block. Fibers 0..block.x-1 each run the blocks in order,
// and all of them meet at a barrier between two blocks (a block's shared memory and barriers are the next
// block's). Returns when every fiber has finished.
template <typename F>
void launch(F kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  const unsigned nt = block.x;
  if (block.y != 1 || block.z != 1 || nt == 0 || nt % 32 != 0 || nt > 1024) fail("block must be (32k, 1, 1)");
  std::vector<unsigned char> dyn(smem + 128);
  g_dyn = dyn.data() + (128 - reinterpret_cast<uintptr_t>(dyn.data()) % 128) % 128;
  g_xch.assign(nt, 0);
  g_frag.assign(2 * 6 * nt, 0.f);
  g_frag_phase.assign(nt, 0);
  Barrier blk(nt, "__syncthreads"), between(nt, "end of block");
  std::vector<std::unique_ptr<Barrier>> warps;
  g_warp.clear();
  for (unsigned w = 0; w < nt / 32; ++w) {
    warps.emplace_back(new Barrier(32, "warp barrier (shuffle / match / mma)"));
    g_warp.push_back(warps.back().get());
  }
  g_block = &blk;
  blockDim = block;
  gridDim = grid;
  const std::function<void(unsigned)> job = [&](unsigned) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          blockIdx.z = bz;
          kernel();
          between.arrive_and_wait();  // every thread done with this block before any starts the next
        }
  };
  scheduler().run(nt, job);
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
  float* const base = g_frag.data() + (g_frag_phase[tid] ^= 1u) * 6 * blockDim.x;
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
