// The per-element arithmetic of the Mahalanobis ops, shared by the CPU and CUDA kernels.
//
//   d²(x) = ‖Wᵀ(x − μ)‖²,   Σ⁻¹ = W Wᵀ,   W: D×R (R = D for a Cholesky factor L, R < D for a
//                                          truncated PCA whitening)
//   ∂d²/∂x = 2 W Wᵀ (x − μ) = 2 W z,   z = Wᵀ(x − μ)
//
// CPU and CUDA differ only in how they tile the two products; the centring, the non-finite guard
// and the epilogues below are the same code on both.
#pragma once

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
