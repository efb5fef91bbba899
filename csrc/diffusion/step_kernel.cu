// CUDA kernels of the fused sampler step (pure CUDA: no torch headers).
//
// Forward: one thread per 8 consecutive elements of a 16-bit type, 4 of float32 (one 16-byte access
// per tensor) or 4 of float64 (two); grid-stride; vector accesses when every pointer allows, one
// Philox call per 4 elements when the noise is drawn in the kernel;
// the arithmetic is step_math.h, the same functions the CPU kernel runs. Bytes: 2 reads + 2 writes
// per element (+1 read for prev_x0 and for a noise tensor) — the floor of the step. The common
// deterministic step (batch-wide coefficients, no noise, no clipping) runs a lean kernel of its own
// (step_plain_kernel: same arithmetic, bit-identical results, ~50 registers against ~75-110).
// Dynamic thresholding: one block per sample (or, for large samples, several blocks a sample meeting
// in a global histogram, one launch per pass) first selects its quantile of |x0| by an 8-bit radix
// select over the float bits (4 passes for float32 accumulation, 8 for float64, each recomputing x0
// from the inputs; warp-aggregated histogram adds), writes the per-sample scale, then the
// elementwise kernel reads it. No host sync.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_types.cuh"
#include "diffusion/step_launch.h"
#include "diffusion/step_math.h"

namespace distkern {
namespace diffusion {
namespace {

using cuda::from_acc;
using cuda::to_acc;

constexpr int kThreads = 256;

// Elements per thread: 16 bytes of a 2- or 4-byte type (one 16-byte access per tensor), 4 of a
// double (two). A multiple of 4, so each thread's elements are whole Philox groups.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) == 2 ? 8 : 4;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
struct Ptrs {
  const T* x;
  const T* m;
  const T* px0;
  const T* noise;
  T* out;
  T* x0;
  T* gpx0;
  const T* gprev;
  const T* gx0;
};

template <typename T>
Ptrs<T> ptrs(const StepArgs& a) {
  return {static_cast<const T*>(a.x),     static_cast<const T*>(a.m),     static_cast<const T*>(a.px0),
          static_cast<const T*>(a.noise), static_cast<T*>(a.out),         static_cast<T*>(a.x0),
          static_cast<T*>(a.gpx0),        static_cast<const T*>(a.grad_prev), static_cast<const T*>(a.grad_x0)};
}

struct Scalars {
  int64_t n, numel, seed, offset;
  const double* per_sample;
  int clip_mode;
  double clip_range;
};

// The coefficients and clip limit of element e, for a thread walking consecutive elements: the
// sample index e / n (a 64-bit division) is taken once per group and again only where the group
// crosses into the next sample, not once per element. `scale` (dynamic thresholding's per-sample
// limits) may be null when the caller does not use `lim`.
template <typename acc_t>
struct SampleCursor {
  const double* per_sample;
  const acc_t* scale;  // null unless dynamic thresholding's limits are wanted
  int64_t n, next;     // elements per sample; first element of the next sample (numel: nothing per sample)
  Coefs<acc_t> c;
  acc_t lim;

  __device__ __forceinline__ SampleCursor(const Scalars& s, const Coefs<acc_t>& uniform, const acc_t* sc_scale,
                                          int64_t first)
      : per_sample(s.per_sample),
        scale(s.clip_mode == kClipThreshold ? sc_scale : nullptr),
        n(s.n),
        next(s.numel),
        c(uniform),
        lim(static_cast<acc_t>(s.clip_range)) {
    if (per_sample != nullptr || scale != nullptr) load(first / n);
  }
  __device__ __forceinline__ void load(int64_t b) {
    next = (b + 1) * n;
    if (per_sample != nullptr) c = load_coefs<acc_t>(per_sample + b * kNumCoefs);
    if (scale != nullptr) lim = scale[b];
  }
  __device__ __forceinline__ void at(int64_t e) {
    if (e >= next) load(e / n);
  }
};

// Load V elements starting at i (one vector access when `vec`, element-wise with bounds otherwise).
template <int V, typename T, typename acc_t>
__device__ __forceinline__ void loadv(const T* p, int64_t i, int64_t numel, bool vec, acc_t out[V]) {
  if (vec) {
    const Pack<T, V> v = *reinterpret_cast<const Pack<T, V>*>(p + i);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_acc<acc_t>(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = i + j < numel ? to_acc<acc_t>(p[i + j]) : acc_t(0);
  }
}

template <int V, typename T, typename acc_t>
__device__ __forceinline__ void storev(T* p, int64_t i, int64_t numel, bool vec, const acc_t in[V]) {
  if (vec) {
    Pack<T, V> v;
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(in[j]);
    *reinterpret_cast<Pack<T, V>*>(p + i) = v;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (i + j < numel) p[i + j] = from_acc<T>(in[j]);
  }
}

// The noise of elements i … i + V − 1: given, or drawn in the kernel (one Philox call per 4 elements,
// keyed by the element index / 4 — the numbers the CPU kernel draws), or none.
template <int V, typename T, typename acc_t>
__device__ __forceinline__ void noisev(const Ptrs<T>& p, const Scalars& s, int64_t i, bool vec, acc_t nz[V]) {
  if (p.noise) {
    loadv<V>(p.noise, i, s.numel, vec, nz);
  } else if (s.seed >= 0) {
#pragma unroll
    for (int q = 0; q < V; q += 4) {
      float z[4];
      normals4(static_cast<uint64_t>(s.seed), static_cast<uint64_t>(s.offset), static_cast<uint64_t>((i + q) >> 2), z);
#pragma unroll
      for (int j = 0; j < 4; ++j) nz[q + j] = static_cast<acc_t>(z[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) nz[j] = acc_t(0);
  }
}

// Groups a thread of the forward kernel keeps in flight: its two groups' sample and model-output loads
// (64 bytes of float32) are issued before either is computed. With one group a thread, ~62 registers
// hold 4 blocks an SM: 32 KiB of loads in flight an SM, about what the H200's 4.8 TB/s needs at ~1 µs of
// latency, with nothing to spare (the first H200 run timed the step at 36–43 % of the copy bandwidth).
constexpr int kForwardGroups = 2;

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) step_forward_kernel(Ptrs<T> p, Scalars s, Coefs<acc_t> uniform,
                                                                const acc_t* scale, bool vec_aligned) {
  constexpr int V = vec_width<T>(), U = kForwardGroups;
  const int64_t groups = (s.numel + V - 1) / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;  // a thread's groups: g0, g0 + stride, … (coalesced)
  for (int64_t g0 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g0 < groups; g0 += U * stride) {
    acc_t xs[U][V], ms[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t grp = g0 + u * stride, i = grp * V;
      if (grp >= groups) break;
      const bool vec = vec_aligned && i + V - 1 < s.numel;
      loadv<V>(p.x, i, s.numel, vec, xs[u]);
      loadv<V>(p.m, i, s.numel, vec, ms[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t grp = g0 + u * stride, i = grp * V;
      if (grp >= groups) break;
      const bool vec = vec_aligned && i + V - 1 < s.numel;
      const acc_t* x = xs[u];
      const acc_t* m = ms[u];
      acc_t nz[V], px[V], out[V], x0[V];
      SampleCursor<acc_t> cur(s, uniform, scale, i);
      // In-kernel noise is not drawn for a group inside one sample whose noise coefficients are zero
      // (a per-sample table cannot be read back to the host to decide it there): the drawn numbers are
      // finite, so 0·n changes nothing.
      if (s.per_sample && !p.noise && i + V <= cur.next && cur.c.g == acc_t(0) && cur.c.s == acc_t(0)) {
#pragma unroll
        for (int j = 0; j < V; ++j) nz[j] = acc_t(0);
      } else {
        noisev<V>(p, s, i, vec, nz);
      }
      if (p.px0) {
        loadv<V>(p.px0, i, s.numel, vec, px);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) px[j] = acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        cur.at(i + j < s.numel ? i + j : s.numel - 1);
        x0[j] = clip_x0(x0_of(cur.c, x[j], m[j], nz[j]), s.clip_mode, cur.lim);
        out[j] = prev_of(cur.c, x0[j], x[j], m[j], px[j], nz[j]);
      }
      storev<V>(p.out, i, s.numel, vec, out);
      storev<V>(p.x0, i, s.numel, vec, x0);
    }
  }
}

// The common deterministic step — batch-wide coefficients, no noise (given or drawn), no clipping,
// prev_x0 optional — as a kernel of its own: the same step_math.h arithmetic with the same zeros (n = 0,
// x0' = 0 where absent), so the result is bit-identical to step_forward_kernel's, but with no Philox /
// Box-Muller code, per-sample cursor, clip path or per-element bounds in its loop (whole 16-byte groups
// when every pointer is aligned; the tail, or unaligned tensors, element by element): fewer registers,
// more warps an SM to keep loads in flight.
// Groups a thread of step_plain_kernel keeps in flight (float64: one — two made sm_90's ptxas spill 24 bytes at
// 80 registers).
template <typename T>
constexpr int plain_groups() {
  return sizeof(T) == 8 ? 1 : kForwardGroups;
}

// One element of the deterministic step (no noise: n = 0; px the previous x0, 0 when absent).
template <typename T, typename acc_t>
__device__ __forceinline__ void plain_math(const Coefs<acc_t>& c, T xt, T mt, acc_t px, T& x0, T& out) {
  const acc_t x = to_acc<acc_t>(xt), m = to_acc<acc_t>(mt);
  const acc_t z = x0_of(c, x, m, acc_t(0));
  x0 = from_acc<T>(z);
  out = from_acc<T>(prev_of(c, z, x, m, px, acc_t(0)));
}

template <typename T, typename acc_t>
__device__ __forceinline__ void plain_element(const Ptrs<T>& p, const Coefs<acc_t>& c, int64_t e) {
  plain_math(c, p.x[e], p.m[e], p.px0 ? to_acc<acc_t>(p.px0[e]) : acc_t(0), p.x0[e], p.out[e]);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) step_plain_kernel(Ptrs<T> p, int64_t numel, Coefs<acc_t> c,
                                                              bool vec_aligned) {
  constexpr int V = vec_width<T>(), U = plain_groups<T>();
  using P = Pack<T, V>;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (!vec_aligned) {
    for (int64_t e = tid; e < numel; e += stride) plain_element(p, c, e);
    return;
  }
  const int64_t groups = numel / V;  // whole groups; the last numel % V elements after them
  for (int64_t g0 = tid; g0 < groups; g0 += U * stride) {
    P xs[U], ms[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t grp = g0 + u * stride;
      if (grp < groups) {
        xs[u] = reinterpret_cast<const P*>(p.x)[grp];
        ms[u] = reinterpret_cast<const P*>(p.m)[grp];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t grp = g0 + u * stride;
      if (grp >= groups) break;
      acc_t px[V];
      if (p.px0) {
        const P pr = reinterpret_cast<const P*>(p.px0)[grp];
#pragma unroll
        for (int j = 0; j < V; ++j) px[j] = to_acc<acc_t>(pr.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) px[j] = acc_t(0);
      }
      P out, x0;
#pragma unroll
      for (int j = 0; j < V; ++j) plain_math(c, xs[u].v[j], ms[u].v[j], px[j], x0.v[j], out.v[j]);
      reinterpret_cast<P*>(p.out)[grp] = out;
      reinterpret_cast<P*>(p.x0)[grp] = x0;
    }
  }
  const int64_t e = groups * V + tid;
  if (e < numel) plain_element(p, c, e);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) step_backward_kernel(Ptrs<T> p, Scalars s, Coefs<acc_t> uniform,
                                                                 bool vec_aligned) {
  constexpr int V = vec_width<T>();
  const int64_t groups = (s.numel + V - 1) / V;
  for (int64_t grp = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; grp < groups;
       grp += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = grp * V;
    const bool vec = vec_aligned && i + V - 1 < s.numel;
    acc_t gp[V], g0[V], x[V], m[V], nz[V], gx[V], gm[V], gpx[V];
    loadv<V>(p.gprev, i, s.numel, vec, gp);
    if (p.gx0) {
      loadv<V>(p.gx0, i, s.numel, vec, g0);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) g0[j] = acc_t(0);
    }
    if (s.clip_mode != kClipNone) {
      loadv<V>(p.x, i, s.numel, vec, x);
      loadv<V>(p.m, i, s.numel, vec, m);
      noisev<V>(p, s, i, vec, nz);
    }
    SampleCursor<acc_t> cur(s, uniform, nullptr, i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      cur.at(i + j < s.numel ? i + j : s.numel - 1);
      const acc_t inside = s.clip_mode == kClipNone
                               ? acc_t(1)
                               : clip_grad(x0_of(cur.c, x[j], m[j], nz[j]), s.clip_mode, static_cast<acc_t>(s.clip_range));
      step_grad(cur.c, inside, gp[j], g0[j], &gx[j], &gm[j], &gpx[j]);
    }
    storev<V>(p.out, i, s.numel, vec, gx);
    storev<V>(p.x0, i, s.numel, vec, gm);
    storev<V>(p.gpx0, i, s.numel, vec, gpx);
  }
}

// ---- dynamic thresholding: radix select of quantile(|x0|) per sample --------------------------------
template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = unsigned int;
  __device__ static unsigned int key(float v) { return __float_as_uint(fabsf(v)); }
  __device__ static float value(unsigned int k) { return __uint_as_float(k); }
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
  __device__ static unsigned long long key(double v) {
    return static_cast<unsigned long long>(__double_as_longlong(fabs(v)));
  }
  __device__ static double value(unsigned long long k) { return __longlong_as_double(static_cast<long long>(k)); }
};

// The coefficients of sample b: its row of the per-sample table, or the batch-wide ones.
template <typename acc_t>
__device__ __forceinline__ Coefs<acc_t> sample_coefs(const Scalars& s, const Coefs<acc_t>& uniform, int64_t b) {
  return s.per_sample ? load_coefs<acc_t>(s.per_sample + b * kNumCoefs) : uniform;
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t x0_at(const Ptrs<T>& p, const Scalars& s, const Coefs<acc_t>& c, int64_t e) {
  acc_t nv = acc_t(0);
  if (p.noise) {
    nv = to_acc<acc_t>(p.noise[e]);
  } else if (s.seed >= 0 && c.g != acc_t(0)) {  // x0 needs the draw only through g (drawn numbers are finite)
    float z[4];
    normals4(static_cast<uint64_t>(s.seed), static_cast<uint64_t>(s.offset), static_cast<uint64_t>(e >> 2), z);
    const int j = static_cast<int>(e & 3);  // selects: z[e & 3] kept z in local memory (16 bytes a thread)
    nv = static_cast<acc_t>(j == 0 ? z[0] : j == 1 ? z[1] : j == 2 ? z[2] : z[3]);
  }
  return x0_of(c, to_acc<acc_t>(p.x[e]), to_acc<acc_t>(p.m[e]), nv);
}

// The select runs one block per sample (select_blocks = 1) or, for large samples, G blocks a sample
// that meet in a global histogram (select_blocks_for). In one block, at B = 1 (SD latents, 65536
// elements a sample) one SM does every pass, bound by the loads one block keeps in flight rather than
// by bandwidth: hence 512 threads and kSelectUnroll independent elements per thread per round. |x0|
// of one sample shares a few exponents, so the first passes put nearly every key in one or two
// bins: the histogram adds are aggregated per warp (__match_any_sync: one shared atomic per distinct
// bin in the warp, not 32 on one address). The loops are warp-uniform (a warp's lanes take 32
// consecutive elements of a round, out-of-range or non-matching lanes the sentinel bin 256), so the
// full-mask intrinsic is legal.
constexpr int kSelectThreads = 512;
constexpr int kSelectUnroll = 4;
constexpr unsigned kNoBin = 256;

__device__ __forceinline__ void add_to_bin(unsigned int* hist, unsigned bin) {
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  const bool leader = static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1;
  if (bin != kNoBin && leader) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
}

// hist (256 bins, zeroed) += the digit at `shift` of the keys of elements [begin, end) of the sample
// at `base` whose bits under `mask` equal `prefix`. Called by every thread of the block.
template <typename T, typename acc_t, typename key_t>
__device__ void fill_hist(const Ptrs<T>& p, const Scalars& s, const Coefs<acc_t>& c, int64_t base, int64_t begin,
                          int64_t end, key_t prefix, key_t mask, int shift, unsigned int* hist) {
  using K = KeyOf<acc_t>;
  const int lane = threadIdx.x % 32;
  constexpr int64_t kRound = int64_t(kSelectThreads) * kSelectUnroll;
  for (int64_t r0 = begin + (threadIdx.x - lane); r0 < end; r0 += kRound) {  // warp-uniform bound
    unsigned bins[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int64_t e = r0 + u * kSelectThreads + lane;
      bins[u] = kNoBin;
      if (e < end) {
        const key_t key = K::key(x0_at<T, acc_t>(p, s, c, base + e));
        if ((key & mask) == prefix) bins[u] = static_cast<unsigned>((key >> shift) & 255u);
      }
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) add_to_bin(hist, bins[u]);
  }
}

// The bin of the rank-k key among the counts: prefix gains the digit, k becomes the rank within it.
template <typename count_t, typename key_t>
__device__ void pick_bin(const count_t* counts, int shift, key_t* prefix, long long* k) {
  long long cum = 0;
  for (int d = 0; d < 256; ++d) {
    if (cum + static_cast<long long>(counts[d]) > *k) {
      *prefix |= static_cast<key_t>(d) << shift;
      *k -= cum;
      return;
    }
    cum += static_cast<long long>(counts[d]);
  }
}

// Per thread over elements [begin, end): how many keys are ≤ prefix, the smallest key above it, NaN seen.
template <typename T, typename acc_t, typename key_t>
__device__ void count_below(const Ptrs<T>& p, const Scalars& s, const Coefs<acc_t>& c, int64_t base, int64_t begin,
                            int64_t end, key_t prefix, unsigned long long* count, key_t* mn, bool* nan) {
  using K = KeyOf<acc_t>;
#pragma unroll 4
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const acc_t v = x0_at<T, acc_t>(p, s, c, base + e);
    *nan |= (v != v);
    const key_t key = K::key(v);
    if (key <= prefix) {
      ++*count;
    } else if (key < *mn) {
      *mn = key;
    }
  }
}

// prefix is the key of the lo-th smallest |x0|; the next one is equal to it (count > lo + 1 keys are
// ≤ it) or the smallest above it. A NaN anywhere: a NaN quantile, as torch.quantile.
template <typename acc_t, typename key_t>
__device__ acc_t select_scale(key_t prefix, unsigned long long count, key_t mn, bool nan, int64_t lo, acc_t frac,
                              int64_t n, acc_t max_value) {
  using K = KeyOf<acc_t>;
  acc_t vlo = K::value(prefix);
  acc_t vhi = vlo;
  if (lo + 1 < n && static_cast<unsigned long long>(lo + 1) >= count) vhi = K::value(mn);
  if (nan) vlo = vhi = K::value(~key_t(0) >> 1);
  return threshold_scale(lerp(vlo, vhi, frac), max_value);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads, 1) threshold_kernel(Ptrs<T> p, Scalars s, Coefs<acc_t> uniform,
                                                                   acc_t ratio, acc_t max_value, acc_t* scale) {
  using key_t = typename KeyOf<acc_t>::type;
  constexpr int kBits = sizeof(key_t) * 8;
  __shared__ unsigned int hist[256];
  __shared__ key_t s_prefix;
  __shared__ long long s_k;
  __shared__ unsigned long long s_count;
  __shared__ key_t s_min;
  __shared__ int s_nan;
  const int64_t b = blockIdx.x;
  const int64_t base = b * s.n;
  const Coefs<acc_t> c = sample_coefs(s, uniform, b);
  int64_t lo;
  acc_t frac;
  quantile_rank(ratio, s.n, &lo, &frac);
  key_t prefix = 0, mask = 0;
  long long k = lo;  // rank of the wanted key among those that match the prefix so far
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    fill_hist<T, acc_t, key_t>(p, s, c, base, 0, s.n, prefix, mask, shift, hist);
    __syncthreads();
    if (threadIdx.x == 0) {
      pick_bin(hist, shift, &prefix, &k);
      s_prefix = prefix;
      s_k = k;
    }
    __syncthreads();
    prefix = s_prefix;
    k = s_k;
    mask |= static_cast<key_t>(255) << shift;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    s_count = 0;
    s_min = ~key_t(0);
    s_nan = 0;
  }
  __syncthreads();
  unsigned long long count = 0;
  key_t mn = ~key_t(0);
  bool nan = false;
  count_below<T, acc_t, key_t>(p, s, c, base, 0, s.n, prefix, &count, &mn, &nan);
  atomicAdd(&s_count, count);
  atomicMin(&s_min, mn);
  if (nan) s_nan = 1;
  __syncthreads();
  if (threadIdx.x == 0) scale[b] = select_scale(prefix, s_count, s_min, s_nan != 0, lo, frac, s.n, max_value);
}

// ---- the same select over G blocks a sample (large samples) ------------------------------------------
// Each pass is one launch over a (G, B) grid: block g histograms its slice of the sample into shared
// memory and adds the non-zero bins to the sample's global histogram; the last block of the sample to
// finish (a done counter, after __threadfence) takes and clears the histogram, picks the bin and
// stores the prefix and rank for the next launch. The count pass ends the same way with the scale.
// Words of a sample's workspace (zeroed by the caller; each pass leaves its words zeroed again):
enum : int { kWPrefix = 256, kWRank = 257, kWDone = 258, kWCount = 259, kWMinC = 260, kWNan = 261 };
static_assert(kWNan < kSelectWords, "select workspace words");

// This block's slice [begin, end) of its sample: G slices of ceil(n / G) elements (trailing ones may be empty).
__device__ __forceinline__ void slice_of(int64_t n, int64_t G, int64_t* begin, int64_t* end) {
  const int64_t per = (n + G - 1) / G;
  *begin = blockIdx.x * per;
  *end = *begin + per < n ? *begin + per : n;
}

__device__ __forceinline__ bool last_of(unsigned long long* done, int64_t G) {
  __shared__ bool last;
  __threadfence();  // this block's global adds before its arrival
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1ull) == static_cast<unsigned long long>(G - 1);
  __syncthreads();
  if (last) __threadfence();  // and the others' before the last block reads them
  return last;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads, 1) select_pass_kernel(Ptrs<T> p, Scalars s, Coefs<acc_t> uniform,
                                                                     acc_t ratio, unsigned long long* ws, int shift,
                                                                     int64_t G) {
  using key_t = typename KeyOf<acc_t>::type;
  constexpr int kBits = sizeof(key_t) * 8;
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long total[256];
  const int64_t b = blockIdx.y;
  int64_t begin, end;
  slice_of(s.n, G, &begin, &end);
  unsigned long long* w = ws + b * kSelectWords;
  const bool first = shift == kBits - 8;
  const key_t prefix = first ? key_t(0) : static_cast<key_t>(w[kWPrefix]);
  const key_t mask = first ? key_t(0) : static_cast<key_t>(~key_t(0) << (shift + 8));
  const Coefs<acc_t> c = sample_coefs(s, uniform, b);
  for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
  __syncthreads();
  fill_hist<T, acc_t, key_t>(p, s, c, b * s.n, begin, end, prefix, mask, shift, hist);
  __syncthreads();
  for (int d = threadIdx.x; d < 256; d += blockDim.x)
    if (hist[d]) atomicAdd(&w[d], static_cast<unsigned long long>(hist[d]));
  if (!last_of(&w[kWDone], G)) return;
  for (int d = threadIdx.x; d < 256; d += blockDim.x) total[d] = atomicExch(&w[d], 0ull);  // take and clear
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t lo;
    acc_t frac;
    quantile_rank(ratio, s.n, &lo, &frac);
    long long k = first ? lo : static_cast<long long>(w[kWRank]);
    key_t pre = prefix;
    pick_bin(total, shift, &pre, &k);
    w[kWPrefix] = static_cast<unsigned long long>(pre);
    w[kWRank] = static_cast<unsigned long long>(k);
    w[kWDone] = 0;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads, 1) select_count_kernel(Ptrs<T> p, Scalars s, Coefs<acc_t> uniform,
                                                                      acc_t ratio, acc_t max_value,
                                                                      unsigned long long* ws, int64_t G,
                                                                      acc_t* scale) {
  using key_t = typename KeyOf<acc_t>::type;
  __shared__ unsigned long long s_count, s_minc;
  __shared__ int s_nan;
  const int64_t b = blockIdx.y;
  int64_t begin, end;
  slice_of(s.n, G, &begin, &end);
  unsigned long long* w = ws + b * kSelectWords;
  const key_t prefix = static_cast<key_t>(w[kWPrefix]);
  const Coefs<acc_t> c = sample_coefs(s, uniform, b);
  if (threadIdx.x == 0) {
    s_count = 0;
    s_minc = 0;  // the minimum key as the maximum of complements: 0 = none yet
    s_nan = 0;
  }
  __syncthreads();
  unsigned long long count = 0;
  key_t mn = ~key_t(0);
  bool nan = false;
  count_below<T, acc_t, key_t>(p, s, c, b * s.n, begin, end, prefix, &count, &mn, &nan);
  atomicAdd(&s_count, count);
  atomicMax(&s_minc, ~static_cast<unsigned long long>(mn));
  if (nan) s_nan = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&w[kWCount], s_count);
    atomicMax(&w[kWMinC], s_minc);
    if (s_nan) atomicMax(&w[kWNan], 1ull);
  }
  if (!last_of(&w[kWDone], G)) return;
  if (threadIdx.x == 0) {
    int64_t lo;
    acc_t frac;
    quantile_rank(ratio, s.n, &lo, &frac);
    const unsigned long long total = atomicExch(&w[kWCount], 0ull), minc = atomicExch(&w[kWMinC], 0ull);
    const bool any_nan = atomicExch(&w[kWNan], 0ull) != 0;
    scale[b] = select_scale(prefix, total, static_cast<key_t>(~minc), any_nan, lo, frac, s.n, max_value);
    w[kWPrefix] = w[kWRank] = w[kWDone] = 0;
  }
}

template <typename T>
bool aligned(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * vec_width<T>()) == 0;
}

template <typename T>
int64_t grid_for(int64_t numel, int groups_per_thread = 1) {
  const int64_t groups = (numel + vec_width<T>() - 1) / vec_width<T>();
  const int64_t per_block = int64_t(kThreads) * groups_per_thread;
  int64_t blocks = (groups + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > (int64_t(1) << 20) ? (int64_t(1) << 20) : blocks);
}

Scalars scalars(const StepArgs& a) {
  return {a.n, a.numel, a.seed, a.offset, a.per_sample, a.clip_mode, a.clip_range};
}

template <typename T, typename acc_t>
cudaError_t forward(const StepArgs& a, cudaStream_t stream) {
  const Ptrs<T> p = ptrs<T>(a);
  const Scalars s = scalars(a);
  const Coefs<acc_t> uniform = load_coefs<acc_t>(a.coefs);
  acc_t* scale = static_cast<acc_t*>(a.scale);
  if (a.clip_mode == kClipThreshold) {
    const acc_t ratio = static_cast<acc_t>(a.ratio), max_value = static_cast<acc_t>(a.max_value);
    if (a.select_blocks > 1) {
      if (a.select_ws == nullptr || a.B > 65535 || a.select_blocks > 0x7fffffff) return cudaErrorInvalidValue;
      auto* ws = static_cast<unsigned long long*>(a.select_ws);
      const dim3 grid(static_cast<unsigned>(a.select_blocks), static_cast<unsigned>(a.B));
      constexpr int kBits = sizeof(typename KeyOf<acc_t>::type) * 8;
      for (int shift = kBits - 8; shift >= 0; shift -= 8) {
        select_pass_kernel<T, acc_t><<<grid, kSelectThreads, 0, stream>>>(p, s, uniform, ratio, ws, shift,
                                                                          a.select_blocks);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
      }
      select_count_kernel<T, acc_t><<<grid, kSelectThreads, 0, stream>>>(p, s, uniform, ratio, max_value, ws,
                                                                         a.select_blocks, scale);
    } else {
      threshold_kernel<T, acc_t><<<static_cast<unsigned>(a.B), kSelectThreads, 0, stream>>>(p, s, uniform, ratio,
                                                                                          max_value, scale);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const bool vec = aligned<T>(a.x) && aligned<T>(a.m) && aligned<T>(a.px0) && aligned<T>(a.noise) &&
                   aligned<T>(a.out) && aligned<T>(a.x0);
  if (a.per_sample == nullptr && a.noise == nullptr && a.seed < 0 && a.clip_mode == kClipNone) {
    step_plain_kernel<T, acc_t><<<static_cast<unsigned>(grid_for<T>(a.numel, plain_groups<T>())), kThreads, 0, stream>>>(
        p, a.numel, uniform, vec);
  } else {
    step_forward_kernel<T, acc_t><<<static_cast<unsigned>(grid_for<T>(a.numel, kForwardGroups)), kThreads, 0, stream>>>(
        p, s, uniform, scale, vec);
  }
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t backward(const StepArgs& a, cudaStream_t stream) {
  const bool vec = aligned<T>(a.x) && aligned<T>(a.m) && aligned<T>(a.noise) && aligned<T>(a.out) &&
                   aligned<T>(a.x0) && aligned<T>(a.gpx0) && aligned<T>(a.grad_prev) && aligned<T>(a.grad_x0);
  step_backward_kernel<T, acc_t><<<static_cast<unsigned>(grid_for<T>(a.numel)), kThreads, 0, stream>>>(
      ptrs<T>(a), scalars(a), load_coefs<acc_t>(a.coefs), vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sampler_step(DType t, const StepArgs& a, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  switch (t) {
    case DType::F32: return forward<float, float>(a, stream);
    case DType::F16: return forward<__half, float>(a, stream);
    case DType::BF16: return forward<__nv_bfloat16, float>(a, stream);
    case DType::F64: return forward<double, double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_sampler_step_backward(DType t, const StepArgs& a, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  switch (t) {
    case DType::F32: return backward<float, float>(a, stream);
    case DType::F16: return backward<__half, float>(a, stream);
    case DType::BF16: return backward<__nv_bfloat16, float>(a, stream);
    case DType::F64: return backward<double, double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace diffusion
}  // namespace distkern
