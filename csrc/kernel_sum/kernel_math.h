// The per-pair arithmetic of the kernel-sum ops, shared by the CPU and CUDA kernels.
//
//   out[n, c] = Σ_m φ(x_n, y_m) v[m, c]
//
// Distance kernels see r² = ‖x − y‖², computed as ‖x‖² + ‖y‖² − 2 x·y on data centred on the
// mean of y and clamped at 0 (never negative, no NaN at x = y), and again as Σ (x_k − y_k)² for the
// few pairs closer than that form resolves (needs_exact_r2); the polynomial kernel sees the raw dot
// product. Each kernel has a derivative kind (with respect to r², or to x·y for the
// polynomial) that the backward evaluates with the same op, so no N×M matrix exists there either.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace distkern {
namespace kernel_sum {

enum Kind : int {
  kGaussian = 0,     // Σ_s exp(−r² / (2σ_s²))
  kLaplacian = 1,    // Σ_s exp(−r / σ_s)
  kIMQ = 2,          // Σ_s (1 + r² / σ_s²)^(−1/2)
  kPolynomial = 3,   // (γ x·y + c)^d           params: γ, c, d
  kDistance = 4,     // r                         (energy distance)
  kGaussianD = 5,    // ∂/∂r² of kGaussian
  kLaplacianD = 6,   // ∂/∂r² of kLaplacian (0 at r = 0)
  kIMQD = 7,         // ∂/∂r² of kIMQ
  kPolynomialD = 8,  // ∂/∂(x·y) of kPolynomial = d γ (γ x·y + c)^(d−1)
  kDistanceD = 9,    // ∂/∂r² of kDistance = 1 / (2r) (0 at r = 0)
  kNumKinds = 10,
};

constexpr int kMaxParams = 16;

// Kernel and its coefficients, precomputed on the host in double and passed by value.
// For the bandwidth kernels p[s] holds the per-bandwidth coefficient: 1/(2σ²) (Gaussian),
// 1/σ (Laplacian), 1/σ² (IMQ); ns is the number of bandwidths. exact_frac: the radius, relative to
// ‖x‖² + ‖y‖², below which r² is taken from the coordinates (needs_exact_r2): 2⁻¹⁰ for float32
// products; the CUDA launcher widens it to 2⁻⁴ for TF32 products, whose x·y carries ~2⁻¹¹ of the norms.
struct Params {
  int kind;
  int ns;
  double p[kMaxParams];
  float exact_frac = 1.0f / 1024;
};

DK_HD bool uses_distance(int kind) { return kind != kPolynomial && kind != kPolynomialD; }

DK_HD float dk_sqrt(float a) { return sqrtf(a); }
DK_HD double dk_sqrt(double a) { return sqrt(a); }
DK_HD float dk_expf(float a) { return expf(a); }
DK_HD double dk_expf(double a) { return exp(a); }
DK_HD float dk_pow(float a, float b) { return powf(a, b); }
DK_HD double dk_pow(double a, double b) { return pow(a, b); }

// a^e for the polynomial kernel. On the CPU, the integer exponents 0..16 (KID's d = 3 and its
// derivative's 2) by repeated squaring: a few multiplications instead of a libm pow call (the small
// mmd2 path evaluates it per pair), exact to 1-2 ulp like pow. On the GPU powf is a few
// instructions already, and the loop would cost the 4×4 tile kernel registers (it spilled): pow.
template <typename acc_t>
DK_HD acc_t dk_pow_kernel(acc_t a, acc_t e) {
#if defined(__CUDA_ARCH__)
  return dk_pow(a, e);
#else
  if (e >= acc_t(0) && e <= acc_t(16) && e == acc_t(static_cast<int>(e))) {
    int n = static_cast<int>(e);
    acc_t r = acc_t(1), b = a;
    while (n > 0) {
      if (n & 1) r *= b;
      b *= b;
      n >>= 1;
    }
    return r;
  }
  return dk_pow(a, e);
#endif
}

// r² from the centred norms and dot product, clamped at 0. A non-finite row (x or y) makes it NaN: the
// guard (xx − xx) + (yy − yy) is 0 for finite norms and NaN otherwise, and the clamp keeps NaN — so a
// NaN or inf row gets NaN sums, as mahalanobis gives, never the value of a pair at distance 0 or ∞.
template <typename acc_t>
DK_HD acc_t sq_dist(acc_t xx, acc_t yy, acc_t dot) {
  const acc_t r2 = xx + yy - (dot + dot) + ((xx - xx) + (yy - yy));
  return r2 < acc_t(0) ? acc_t(0) : r2;
}

// The norm form cancels: its r² carries rounding noise of order ε·(‖x‖² + ‖y‖²), which the square root
// of the Laplacian and distance kernels makes visible for near-coincident pairs (k(x, x) = 0.9986 for
// the Laplacian at D = 256 in float32). Pairs with r² below frac·(‖x‖² + ‖y‖²) (Params::exact_frac:
// 2⁻¹⁰, within ~3 % of their centred norms, for float32 products) — duplicates, the diagonal of
// K(x, x), dense low-dimensional data — take r² from the coordinates instead (exactly 0 at x = y);
// elsewhere the norm form's relative error in r² stays below ~ε/frac. Rare in high dimension, and cheap
// in low dimension, where they are common.
template <typename acc_t>
DK_HD bool needs_exact_r2(acc_t r2, acc_t xx, acc_t yy, float frac) {
  return r2 < acc_t(frac) * (xx + yy);
}

// φ for one pair: r2 for the distance kinds, dot for the polynomial ones.
template <typename acc_t>
DK_HD acc_t phi(const Params& k, acc_t r2, acc_t dot) {
  acc_t s = 0;
  switch (k.kind) {
    case kGaussian:
      for (int i = 0; i < k.ns; ++i) s += dk_expf(-r2 * acc_t(k.p[i]));
      return s;
    case kLaplacian: {
      const acc_t r = dk_sqrt(r2);
      for (int i = 0; i < k.ns; ++i) s += dk_expf(-r * acc_t(k.p[i]));
      return s;
    }
    case kIMQ:
      for (int i = 0; i < k.ns; ++i) s += acc_t(1) / dk_sqrt(acc_t(1) + r2 * acc_t(k.p[i]));
      return s;
    case kPolynomial:
      return dk_pow_kernel(acc_t(k.p[0]) * dot + acc_t(k.p[1]), acc_t(k.p[2]));
    case kDistance:
      return dk_sqrt(r2);
    case kGaussianD:
      for (int i = 0; i < k.ns; ++i) s -= acc_t(k.p[i]) * dk_expf(-r2 * acc_t(k.p[i]));
      return s;
    case kLaplacianD: {
      if (r2 <= acc_t(0)) return acc_t(0);  // subgradient 0 at x = y: no NaN (a NaN r² stays NaN)
      const acc_t r = dk_sqrt(r2);
      for (int i = 0; i < k.ns; ++i) s -= acc_t(k.p[i]) * dk_expf(-r * acc_t(k.p[i]));
      return s / (r + r);
    }
    case kIMQD:
      for (int i = 0; i < k.ns; ++i) {
        const acc_t b = acc_t(1) + r2 * acc_t(k.p[i]);
        s -= acc_t(0.5) * acc_t(k.p[i]) / (b * dk_sqrt(b));
      }
      return s;
    case kPolynomialD:
      return acc_t(k.p[2]) * acc_t(k.p[0]) *
             dk_pow_kernel(acc_t(k.p[0]) * dot + acc_t(k.p[1]), acc_t(k.p[2]) - acc_t(1));
    case kDistanceD:
      return r2 <= acc_t(0) ? acc_t(0) : acc_t(0.5) / dk_sqrt(r2);  // NaN r² → NaN
  }
  return acc_t(0);
}

}  // namespace kernel_sum
}  // namespace distkern
