// The per-element arithmetic of the Mahalanobis ops, shared by the CPU and CUDA kernels.
//
//   d²(x) = ‖Wᵀ(x − μ)‖²,   Σ⁻¹ = W Wᵀ,   W: D×R (R = D for a Cholesky factor L, R < D for a
//                                          truncated PCA whitening)
//   ∂d²/∂x = 2 W Wᵀ (x − μ) = 2 W z,   z = Wᵀ(x − μ)
//
// CPU and CUDA differ only in how they tile the two products; the centring, the non-finite guard
// and the epilogues below are the same code on both.
#pragma once

#include <math.h>

#include "common/macros.h"

namespace distkern {
namespace mahalanobis {

// Centre one coordinate and fold it into the row's non-finite guard: c − c is 0 for every finite c
// and NaN for ±inf or NaN, so a row with any non-finite coordinate (or an x − μ that overflows)
// ends with a NaN distance, never a finite wrong number, and without a data-dependent branch.
template <typename acc_t>
DK_HD acc_t center(acc_t x, acc_t mu, acc_t& guard) {
  const acc_t c = x - mu;
  guard += c - c;
  return c;
}

// Squared distance from the row's sum of squares: ≥ 0 by construction (a sum of squares, never
// the difference of two large numbers), NaN where the guard says so.
template <typename acc_t>
DK_HD acc_t finish(acc_t sumsq, acc_t guard) {
  return sumsq + guard;
}

// Coefficient that turns z = Wᵀ(x − μ) into the row's contribution to ∂L/∂x = W (2 g z).
template <typename acc_t>
DK_HD acc_t grad_coef(acc_t g) {
  return g + g;
}

}  // namespace mahalanobis
}  // namespace distkern

// ---- K Gaussians ---------------------------------------------------------------------------------
//
// Shared factor W (tied covariance): with μ̄ the mean of the K means, z = Wᵀ(x − μ̄) and
// v_k = Wᵀ(μ_k − μ̄),
//   d²_k = ‖z − v_k‖² = ‖z‖² − 2 zᵀv_k + ‖v_k‖²
// so the N×K distances cost one product by W plus one N×R·R×K product, instead of K products by
// W. The expansion is clamped at 0; centring on μ̄ keeps its cancellation error at about
// ε·(‖z‖² + ‖v_k‖²). Per-component factors W_k are evaluated directly (no expansion).

namespace distkern {
namespace mahalanobis {

template <typename acc_t>
DK_HD acc_t combine_shared(acc_t zz, acc_t cross, acc_t vv) {
  const acc_t d = zz - (cross + cross) + vv;
  return d < acc_t(0) ? acc_t(0) : d;  // NaN passes through (NaN < 0 is false)
}

// Running minimum with its index; a NaN wins and stays (a non-finite row scores NaN); ties keep
// the first index.
template <typename acc_t>
struct MinAcc {
  acc_t v;
  int64_t idx;
  DK_HD void init() {
    v = acc_t(1) / acc_t(0);  // +inf
    idx = -1;
  }
  DK_HD void update(acc_t a, int64_t k) {
    if (idx < 0 || (v == v && !(a >= v))) {
      v = a;
      idx = k;
    }
  }
  DK_HD void merge(const MinAcc& o) {
    if (o.idx < 0) return;
    if (idx < 0 || (v == v && (!(o.v >= v) || (o.v == v && o.idx < idx)))) {
      v = o.v;
      idx = o.idx;
    }
  }
};

// exp / log for float and double on host and device (expf, logf, exp, log exist on both).
DK_HD float dk_exp(float a) { return expf(a); }
DK_HD double dk_exp(double a) { return exp(a); }
DK_HD float dk_log(float a) { return logf(a); }
DK_HD double dk_log(double a) { return log(a); }

// Online log-sum-exp: m the running maximum, s = Σ exp(a − m) (s = 0: nothing seen yet or only
// −inf). A NaN term makes the result NaN.
template <typename acc_t>
struct LseAcc {
  acc_t m, s;
  DK_HD void init() {
    m = -acc_t(1) / acc_t(0);
    s = 0;
  }
  DK_HD void update(acc_t a) {
    if (!(a == a)) {
      m = s = a;
    } else if (s != s) {
      // stays NaN
    } else if (a == m) {  // also +inf twice: exp(inf − inf) would be NaN where torch.logsumexp gives inf
      s += acc_t(1);
    } else if (a > m) {
      s = s * dk_exp(m - a) + acc_t(1);
      m = a;
    } else if (a == a && a > -acc_t(1) / acc_t(0)) {
      s += dk_exp(a - m);
    }
  }
  DK_HD void merge(const LseAcc& o) {
    if (s != s) return;
    if (o.s != o.s) {
      m = s = o.s;
    } else if (o.s == acc_t(0)) {
    } else if (s == acc_t(0)) {
      m = o.m;
      s = o.s;
    } else if (o.m == m) {
      s += o.s;
    } else if (o.m > m) {
      s = s * dk_exp(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * dk_exp(o.m - m);
    }
  }
  DK_HD acc_t result() const { return s == acc_t(0) ? m : m + dk_log(s); }
};

}  // namespace mahalanobis
}  // namespace distkern
