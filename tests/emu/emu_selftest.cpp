// Checks of the CUDA stand-in itself (cuda_emulate.h), so that the emulated kernel tests can be trusted
// to find what they are meant to find:
//   barrier    __syncthreads orders a block's shared-memory writes before the reads after it;
//   race       without it, a read of another thread's write sees the old value when the reader runs
//              first: a later thread's write in thread order (before the first barrier, the second, ...),
//              an earlier thread's in reverse order (between the first and the second, ...);
//   shuffle    __shfl_xor_sync / __shfl_down_sync / __match_any_sync against their definitions;
//   blocks     every block of a 3-D grid runs once, with its blockIdx, and its threads see blockDim;
//   deadlock   (argument "deadlock") a barrier that thread 0 never reaches stops the run with a message
//              instead of hanging: the test expects the abort;
//   oob-*      (arguments "oob-shared", "oob-local") under AddressSanitizer, an out-of-bounds write to a
//              __shared__ array and to a local array on a fiber's stack stop the run.
// Prints one line per check and "ALL OK", or exits 1.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr unsigned kThreads = 128;

bool report(const char* name, bool ok) {
  std::printf("%-10s %s\n", name, ok ? "ok" : "FAILED");
  return ok;
}

int g_s[kThreads];  // the exchange's shared array (a namespace-scope static, as __shared__ is here), zeroed per launch

// out[t] = the value thread (t + step) % n wrote; `sync` puts the barrier between the write and the read,
// after `before` other barriers (the exchange runs in thread order when `before` is even, else reversed).
std::vector<int> neighbour(bool sync, int before, int step) {
  std::vector<int> out(kThreads, -1);
  int* o = out.data();
  std::memset(g_s, 0, sizeof(g_s));
  emu::launch(
      [&] {
        const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
        for (int b = 0; b < before; ++b) __syncthreads();
        g_s[t] = t + 1;
        if (sync) __syncthreads();
        o[t] = g_s[(t + step + n) % n];
      },
      dim3(1, 1, 1), dim3(kThreads, 1, 1));
  return out;
}

bool all_right(const std::vector<int>& out, int step) {
  const int n = static_cast<int>(out.size());
  for (int t = 0; t < n; ++t)
    if (out[t] != (t + step + n) % n + 1) return false;
  return true;
}

bool shuffles() {
  std::vector<int> xor_sum(kThreads), down(kThreads);
  std::vector<unsigned> match(kThreads);
  emu::launch(
      [&] {
        const int t = static_cast<int>(threadIdx.x);
        int v = t;
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        xor_sum[t] = v;
        down[t] = __shfl_down_sync(0xffffffffu, t * 10, 3);
        match[t] = __match_any_sync(0xffffffffu, (t % 32) / 8);
      },
      dim3(1, 1, 1), dim3(kThreads, 1, 1));
  bool ok = true;
  for (int t = 0; t < static_cast<int>(kThreads); ++t) {
    const int w = t / 32, lane = t % 32;
    ok &= xor_sum[t] == 32 * 32 * w + 31 * 32 / 2;
    ok &= down[t] == (lane + 3 < 32 ? (t + 3) * 10 : t * 10);
    ok &= match[t] == (0xffu << (lane / 8 * 8));
  }
  return ok;
}

bool blocks() {
  const dim3 grid(3, 2, 2);
  std::vector<int> seen(3 * 2 * 2, 0);
  std::vector<int> dims_ok(1, 1);
  emu::launch(
      [&] {
        if (blockDim.x != 64 || gridDim.x != 3 || gridDim.y != 2 || gridDim.z != 2) dims_ok[0] = 0;
        if (threadIdx.x == 0) seen[(blockIdx.z * 2 + blockIdx.y) * 3 + blockIdx.x] += 1;
        __syncthreads();
      },
      grid, dim3(64, 1, 1));
  bool ok = dims_ok[0] == 1;
  for (int c : seen) ok &= c == 1;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "deadlock") == 0) {
    emu::launch(
        [&] {
          if (threadIdx.x == 0) return;  // never reaches the barrier the others wait at
          __syncthreads();
        },
        dim3(1, 1, 1), dim3(64, 1, 1));
    std::printf("deadlock not detected\n");
    return 1;
  }
  if (argc > 1 && std::strcmp(argv[1], "oob-shared") == 0) {  // under AddressSanitizer: stopped
    emu::launch(
        [&] {
          __shared__ int a[64];
          int* volatile p = a;  // through a pointer: for AddressSanitizer, not UBSan's bounds check
          p[threadIdx.x + 1] = 1;  // thread 63 writes a[64]
          __syncthreads();
          g_s[threadIdx.x] = a[threadIdx.x];
        },
        dim3(1, 1, 1), dim3(64, 1, 1));
    std::printf("out-of-bounds shared write not detected\n");
    return 1;
  }
  if (argc > 1 && std::strcmp(argv[1], "oob-local") == 0) {  // on a fiber's stack, under AddressSanitizer
    emu::launch(
        [&] {
          int local[8];
          volatile unsigned i = threadIdx.x % 16;  // threads 8..15 write past local[]
          int* volatile p = local;
          p[i] = 1;
          __syncthreads();
          g_s[threadIdx.x] = local[i % 8];
        },
        dim3(1, 1, 1), dim3(32, 1, 1));
    std::printf("out-of-bounds local write not detected\n");
    return 1;
  }
  bool ok = true;
  ok &= report("barrier", all_right(neighbour(true, 0, 1), 1) && all_right(neighbour(true, 1, -1), -1) &&
                             all_right(neighbour(true, 2, 1), 1));
  // the reader of a later thread's write runs first in thread order, of an earlier one's in reverse order
  ok &= report("race", !all_right(neighbour(false, 0, 1), 1) && !all_right(neighbour(false, 1, -1), -1) &&
                          !all_right(neighbour(false, 2, 1), 1));
  ok &= report("shuffle", shuffles());
  ok &= report("blocks", blocks());
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
