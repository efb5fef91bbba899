// Attention with shared keys and values (torch side): checks and the composite shared by the CPU
// (composite) and CUDA (fused kernel or composite) entry points.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace distkern {
namespace align {

// Checks q (B, M, D), x (B, P, D), mask (B, P) bool, tile >= 1; returns the mask (undefined if none).
at::Tensor check_attention(const at::Tensor& q, const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                           int64_t tile);

// softmax(q xᵀ) x and the row log-sum-exp, streamed over tiles of x with an online softmax (ATen ops).
std::tuple<at::Tensor, at::Tensor> shared_kv_attention_composite(const at::Tensor& q, const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& mask,
                                                                 int64_t tile);

// Whether CUDA uses the fused kernel (DISTKERN_FUSED_ATTENTION=1 at first use, or set_fused_attention).
bool fused_attention_enabled();
void set_fused_attention(bool on);

}  // namespace align
}  // namespace distkern
