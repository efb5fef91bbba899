// Per-element math of the anomaly map (CLIP-style zero-shot anomaly detection), shared by the CPU
// and CUDA kernels (no torch).
//
// For a patch token x (normalised: x̂ = x / max(‖x‖, eps)) and a (normal, abnormal) prompt pair
// (t₀, t₁) with temperature τ, the softmax over the pair gives the abnormal probability
//   softmax(τ x̂·t₀, τ x̂·t₁)[1] = σ(x̂ · d),   d = τ (t₁ − t₀)   (prompts already normalised).
// So one dot product per pair (half the FLOPs of the two cosine similarities), and the map is the
// mean of σ(x̂ · d_k) over the K pairs and the L layers. The direction vectors d are formed from
// the prompts on the host side (python/distkern/ops/align.py), where autograd handles τ and the
// prompt normalisation.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace distkern {
namespace align {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize

DK_HD float sqrt_(float v) { return sqrtf(v); }
DK_HD double sqrt_(double v) { return sqrt(v); }
DK_HD float exp_(float v) { return expf(v); }
DK_HD double exp_(double v) { return exp(v); }

template <typename acc_t>
DK_HD acc_t inv_norm(acc_t sumsq) {
  const acc_t n = sqrt_(sumsq);
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

template <typename acc_t>
DK_HD acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_(-z));
}

}  // namespace align
}  // namespace distkern
