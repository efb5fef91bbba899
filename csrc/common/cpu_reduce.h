// Row reductions of the CPU tile loops (mahalanobis*, kernel_matmul, mmd2's dense pass, the anomaly
// map), written with eight independent partial sums.
//
// Without reassociation flags a single running sum is one dependent add per element (~4 cycles on
// the cores we measure), which the compiler may not vectorise: for mahalanobis at N = 200000, D = 256
// the centring guard and the row sums of squares were two such chains per row, ~half of the op's time.
// Eight chains vectorise (SSE2 baseline, and an AVX2 clone picked at load time) and overlap.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace distkern {
namespace cpu {

// Σ v[k]² for k < n.
template <typename acc_t>
DK_CPU_MULTIVERSION acc_t sum_squares(const acc_t* __restrict__ v, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += v[k + j] * v[k + j];
  acc_t t = 0;
  for (; k < n; ++k) t += v[k] * v[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

// Σ a[k]·b[k] for k < n.
template <typename acc_t>
DK_CPU_MULTIVERSION acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[k + j] * b[k + j];
  acc_t t = 0;
  for (; k < n; ++k) t += a[k] * b[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

// out[r] = Σ a[k]·b_r[k] for k < n, r < 4: four dot products sharing a, each in eight chains (32 independent
// sums: one short dot waits on its chains' latency, four overlap), a read once. Written with GCC vector types
// (four doubles, two per dot and step): left to the vectoriser, the 32 scalar sums came out shuffled and
// spilled to the stack, no faster than four dot()s.
DK_CPU_MULTIVERSION inline void dot4(const double* __restrict__ a, const double* __restrict__ b0,
                                     const double* __restrict__ b1, const double* __restrict__ b2,
                                     const double* __restrict__ b3, int64_t n, double* __restrict__ out) {
  typedef double v4 __attribute__((vector_size(32)));
  auto load = [](const double* p) {
    v4 v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  };
  const double* b[4] = {b0, b1, b2, b3};
  v4 lo[4] = {}, hi[4] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const v4 al = load(a + k), ah = load(a + k + 4);
    for (int r = 0; r < 4; ++r) {
      lo[r] += al * load(b[r] + k);
      hi[r] += ah * load(b[r] + k + 4);
    }
  }
  for (int r = 0; r < 4; ++r) {
    double t = 0;
    for (int64_t q = k; q < n; ++q) t += a[q] * b[r][q];
    const v4 v = lo[r] + hi[r];
    out[r] = ((v[0] + v[1]) + (v[2] + v[3])) + t;
  }
}

// Σ (a[k] − b[k])² for k < n: a squared distance from the coordinates (exactly 0 for a = b).
template <typename acc_t>
DK_CPU_MULTIVERSION acc_t sq_distance(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += (a[k + j] - b[k + j]) * (a[k + j] - b[k + j]);
  acc_t t = 0;
  for (; k < n; ++k) t += (a[k] - b[k]) * (a[k] - b[k]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

// Σ v[k] for k < n, accumulated in double.
template <typename acc_t>
DK_CPU_MULTIVERSION double sum_double(const acc_t* __restrict__ v, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += static_cast<double>(v[k + j]);
  double t = 0;
  for (; k < n; ++k) t += static_cast<double>(v[k]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

// dst[k] = x[k·sx] − mu[k] for k < n, in the accumulation type; returns Σ (dst[k] − dst[k]), which is
// 0 for a finite row and NaN otherwise (the guard of mahalanobis_math.h's center, summed in eight chains).
template <typename scalar_t, typename acc_t>
DK_CPU_MULTIVERSION acc_t center_row(const scalar_t* __restrict__ x, int64_t sx, const acc_t* __restrict__ mu,
                                     acc_t* __restrict__ dst, int64_t n) {
  acc_t g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  if (sx == 1) {
    for (; k + 8 <= n; k += 8)
      for (int j = 0; j < 8; ++j) {
        const acc_t c = static_cast<acc_t>(x[k + j]) - mu[k + j];
        dst[k + j] = c;
        g[j] += c - c;
      }
  }
  acc_t t = 0;
  for (; k < n; ++k) {
    const acc_t c = static_cast<acc_t>(x[k * sx]) - mu[k];
    dst[k] = c;
    t += c - c;
  }
  return ((g[0] + g[1]) + (g[2] + g[3])) + ((g[4] + g[5]) + (g[6] + g[7])) + t;
}

// m rows of center_row: dst[i·ldd + k] = x[i·si + k·sk] − mu[i·smu + k] for i < m, k < n, and
// guard[i·sg] = Σ_k (dst − dst) (0 for a finite row, NaN otherwise, as center_row's).
//
// Where the row stride is the smaller one (x column-major here: anomalib's (B, C, H·W) embedding seen
// as (B, P, D), or a transposed (N, D)), row by row would read one element per line of x and come back
// for the rest of the line a row later, from L2 at best: PaDiM at B = 32, P = 3136, D = 100 spent 2.4×
// its contiguous time so. There the rows are gathered 64 at a time along the column, each line of x
// read once.
template <typename scalar_t, typename acc_t>
DK_CPU_MULTIVERSION void center_rows(const scalar_t* __restrict__ x, int64_t si, int64_t sk,
                                     const acc_t* __restrict__ mu, int64_t smu, int64_t m, int64_t n,
                                     acc_t* __restrict__ dst, int64_t ldd, acc_t* __restrict__ guard,
                                     int64_t sg) {
  const int64_t asi = si < 0 ? -si : si, ask = sk < 0 ? -sk : sk;
  if (m <= 1 || n <= 1 || ask <= asi) {
    for (int64_t i = 0; i < m; ++i) guard[i * sg] = center_row(x + i * si, sk, mu + i * smu, dst + i * ldd, n);
    return;
  }
  constexpr int64_t kRows = 64, kAhead = 16, kLine = 64 / sizeof(scalar_t);
  acc_t g[kRows];
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    const int64_t mi = m - i0 < kRows ? m - i0 : kRows;
    for (int64_t i = 0; i < mi; ++i) g[i] = 0;
    const acc_t* mu0 = mu + i0 * smu;
    acc_t* d0 = dst + i0 * ldd;
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* src = x + i0 * si + k * sk;
      // the lines of column k + kAhead: a line per column, a page apart, which the hardware prefetchers
      // do not follow (without this, 3/4 of the time here waited on those loads)
      if (k + kAhead < n)
        for (int64_t i = 0; i < mi; i += kLine) __builtin_prefetch(src + kAhead * sk + i * si);
      for (int64_t i = 0; i < mi; ++i) {
        const acc_t c = static_cast<acc_t>(src[i * si]) - mu0[i * smu + k];
        d0[i * ldd + k] = c;
        g[i] += c - c;
      }
    }
    for (int64_t i = 0; i < mi; ++i) guard[(i0 + i) * sg] = g[i];
  }
}

}  // namespace cpu
}  // namespace distkern
