// The per-element math of the fused sampler step, shared by the CPU and CUDA kernels (no torch).
//
// Every step of DDPM, DDIM (and its inverse), Euler (churn / ancestral) and DPM-Solver++ (2M, SDE)
// is, per element (x the sample, m the model output, x0' the previous data prediction, n noise):
//   x0   = a·x + b·m + g·n,   x0 = clip(x0)   (none / clamp / dynamic threshold),
//   prev = p·x0 + r·x + w·m + u·x0' + s·n.
// The coefficients come from the host in float64 (python/distkern/ops/diffusion.py derives them
// from each scheduler's formula). Noise drawn in the kernel is Philox4x32-10 + Box-Muller: element
// i gets lane i % 4 of the block at counter (i / 4, offset) under key seed, so it depends on
// (seed, offset, i) only — not on the tiling, the thread count or the device.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace distkern {
namespace diffusion {

constexpr int kNumCoefs = 8;
enum ClipMode : int { kClipNone = 0, kClipClamp = 1, kClipThreshold = 2 };

template <typename acc_t>
struct Coefs {
  acc_t a, b, g, p, r, w, u, s;
};

template <typename acc_t>
DK_HD Coefs<acc_t> load_coefs(const double* c) {
  return {static_cast<acc_t>(c[0]), static_cast<acc_t>(c[1]), static_cast<acc_t>(c[2]),
          static_cast<acc_t>(c[3]), static_cast<acc_t>(c[4]), static_cast<acc_t>(c[5]),
          static_cast<acc_t>(c[6]), static_cast<acc_t>(c[7])};
}

// x0 before clipping.
template <typename acc_t>
DK_HD acc_t x0_of(const Coefs<acc_t>& c, acc_t x, acc_t m, acc_t n) {
  return c.a * x + c.b * m + c.g * n;
}

// Clamp to [-lim, lim]; dynamic thresholding also divides by lim (its per-sample scale).
template <typename acc_t>
DK_HD acc_t clip_x0(acc_t x0, int mode, acc_t lim) {
  if (mode == kClipNone) return x0;
  const acc_t v = x0 < -lim ? -lim : (x0 > lim ? lim : x0);
  return mode == kClipThreshold ? v / lim : v;
}

// d clip / d x0 (clamp: 1 inside [-lim, lim], bounds included, as torch.clamp's gradient).
template <typename acc_t>
DK_HD acc_t clip_grad(acc_t x0, int mode, acc_t lim) {
  if (mode == kClipNone) return acc_t(1);
  return (x0 >= -lim && x0 <= lim) ? acc_t(1) : acc_t(0);
}

template <typename acc_t>
DK_HD acc_t prev_of(const Coefs<acc_t>& c, acc_t x0, acc_t x, acc_t m, acc_t px0, acc_t n) {
  return c.p * x0 + c.r * x + c.w * m + c.u * px0 + c.s * n;
}

// Backward of one element: given dL/dprev (gp) and dL/dx0 (gx0, the clipped output), the
// gradients w.r.t. x, m and x0'. `inside` is clip_grad at the unclipped x0.
template <typename acc_t>
DK_HD void step_grad(const Coefs<acc_t>& c, acc_t inside, acc_t gp, acc_t gx0, acc_t* gx, acc_t* gm,
                     acc_t* gpx0) {
  const acc_t g0 = inside * (c.p * gp + gx0);
  *gx = c.a * g0 + c.r * gp;
  *gm = c.b * g0 + c.w * gp;
  *gpx0 = c.u * gp;
}

// ---- dynamic thresholding: s = clamp(quantile(|x0|, ratio), 1, max) per sample -------------------
// torch.quantile's linear interpolation: rank = ratio·(n−1) in the input's float type, lower index
// floor(rank), weight rank − floor(rank), and torch.lerp's two-sided formula.
template <typename acc_t>
DK_HD void quantile_rank(acc_t ratio, int64_t n, int64_t* lo, acc_t* frac) {
  const acc_t rank = ratio * static_cast<acc_t>(n - 1);
  int64_t l = static_cast<int64_t>(rank);
  if (l > n - 1) l = n - 1;
  if (l < 0) l = 0;
  *lo = l;
  *frac = rank - static_cast<acc_t>(l);
}

template <typename acc_t>
DK_HD acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

template <typename acc_t>
DK_HD acc_t threshold_scale(acc_t q, acc_t max_value) {
  // clamp(q, min=1, max=max_value), as torch.clamp applies min then max
  const acc_t v = q < acc_t(1) ? acc_t(1) : q;
  return v > max_value ? max_value : v;
}

// ---- counter-based normal noise -------------------------------------------------------------------
DK_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Four standard normals for block `group` (elements 4·group … 4·group+3).
DK_HD void normals4(uint64_t seed, uint64_t offset, uint64_t group, float out[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                   static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float scale = 2.3283064365386963e-10f;  // 2^-32: u in (0, 1], never 0
  const float two_pi = 6.283185307179586f;
  const float u0 = (static_cast<float>(c[0]) + 0.5f) * scale, u1 = (static_cast<float>(c[1]) + 0.5f) * scale;
  const float u2 = (static_cast<float>(c[2]) + 0.5f) * scale, u3 = (static_cast<float>(c[3]) + 0.5f) * scale;
  const float r0 = sqrtf(-2.0f * logf(u0)), r1 = sqrtf(-2.0f * logf(u2));
  out[0] = r0 * cosf(two_pi * u1);
  out[1] = r0 * sinf(two_pi * u1);
  out[2] = r1 * cosf(two_pi * u3);
  out[3] = r1 * sinf(two_pi * u3);
}

}  // namespace diffusion
}  // namespace distkern
