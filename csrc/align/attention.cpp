// Attention with shared keys and values (K = V = x), in tiles with an online softmax.
//
// prompt_align (python/distkern/ops/align.py) never projects the P patch tokens: for a head h with
// query q_h and key / value projections W_k,h, W_v,h,
//   softmax_p(q_h · W_k,hᵀ x_p) · (W_v,hᵀ x_p) = W_v,hᵀ · softmax_p(q̃_h · x_p) x_p,   q̃_h = W_k,h q_h,
// (key biases cancel in the softmax, value biases pass through it). So the attention of the T text
// queries of H heads over the P tokens is one attention of H·T queries q̃ over keys = values = x, in
// the token space: O(H·T·P·D) instead of the O(P·D·E) of projecting every token. This op computes
// it: out (B, M, D) = softmax(q xᵀ, over P) x and the row log-sum-exp (B, M) for the flash-style
// backward, streaming x in tiles of `tile` tokens with the running max / sum of the online softmax,
// so no (B, M, P) matrix exists. One device-generic composite of batched GEMMs (cuBLAS; on the CPU
// distkern's AVX-512 product in float32) and elementwise updates, registered for every device
// (CompositeExplicitAutograd). On CUDA a fused
// kernel (attention_kernel.cu) replaces it when DISTKERN_FUSED_ATTENTION=1 or
// distkern._C.set_fused_attention(True) — opt-in until it has run on a GPU. Accumulation in
// float32 (float64 for float64).
#include "align/attention.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/check.h"
#include "common/cpu_gemm.h"

namespace distkern {
namespace align {
namespace {

std::atomic<int> g_fused{-1};  // -1: not decided yet (DISTKERN_FUSED_ATTENTION), 0 / 1

}  // namespace

bool fused_attention_enabled() {
  int v = g_fused.load();
  if (v < 0) {
    const char* env = std::getenv("DISTKERN_FUSED_ATTENTION");
    v = (env != nullptr && std::strcmp(env, "1") == 0) ? 1 : 0;
    g_fused.store(v);
  }
  return v == 1;
}

void set_fused_attention(bool on) { g_fused.store(on ? 1 : 0); }

at::Tensor check_attention(const at::Tensor& q, const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                           int64_t tile) {
  const char* op = "distkern.shared_kv_attention";
  check_float(op, "q", q);
  check_float(op, "x", x);
  check_dim(op, "q", q, 3, "(B, M, D)");
  check_dim(op, "x", x, 3, "(B, P, D)");
  check_same_device(op, "x", x, "q", q);
  TORCH_CHECK_VALUE(q.size(0) == x.size(0) && q.size(2) == x.size(2), op,
                    ": q (B, M, D) and x (B, P, D) must share B and D; got ", shape_str(q), " and ", shape_str(x));
  TORCH_CHECK_VALUE(tile >= 1, op, ": tile must be >= 1; got ", tile);
  const int64_t B = q.size(0), P = x.size(1);
  at::Tensor keep;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = a token to attend to); got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == P, op, ": mask must be (B, P) = (",
                      B, ", ", P, "); got ", shape_str(*mask));
    check_same_device(op, "mask", *mask, "q", q);
    keep = *mask;
  }
  return keep;
}

namespace {

// a @ b for (B, n, k) · (B, k, m): per batch on distkern's AVX-512 product for float32 CPU tensors (torch's
// bmm goes through MKL, AVX2 on AMD processors: common/cpu_gemm.h), else at::bmm.
at::Tensor batched_mm(const at::Tensor& a, const at::Tensor& b) {
  if (!(a.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
        cpu::fast_gemm_enabled() && a.size(0) > 0))
    return at::bmm(a, b);  // also B = 0, which at::stack would refuse
  std::vector<at::Tensor> outs;
  outs.reserve(a.size(0));
  for (int64_t i = 0; i < a.size(0); ++i) outs.push_back(cpu::mm(a[i], b[i]));
  return at::stack(outs);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> shared_kv_attention_composite(const at::Tensor& q, const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& mask,
                                                                 int64_t tile) {
  const at::Tensor keep = check_attention(q, x, mask, tile);
  const int64_t B = q.size(0), M = q.size(1), P = x.size(1), D = q.size(2);
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor qa = q.to(acc);
  const double ninf = -std::numeric_limits<double>::infinity();
  at::Tensor run_max = at::full({B, M}, ninf, qa.options());
  at::Tensor run_sum = at::zeros({B, M}, qa.options());
  at::Tensor out = at::zeros({B, M, D}, qa.options());
  for (int64_t p0 = 0; p0 < P; p0 += tile) {
    const int64_t n = std::min(tile, P - p0);
    const at::Tensor xt = x.narrow(1, p0, n).to(acc);
    at::Tensor s = batched_mm(qa, xt.transpose(1, 2));  // (B, M, n)
    if (keep.defined()) s.masked_fill_(keep.narrow(1, p0, n).logical_not().unsqueeze(1), ninf);
    const at::Tensor new_max = at::maximum(run_max, std::get<0>(s.max(-1)));
    // rows with nothing to attend to yet keep max −inf: use 0 there so that exp() gives 0, not NaN
    const at::Tensor safe_max = at::where(at::isinf(new_max), at::zeros_like(new_max), new_max);
    const at::Tensor alpha = at::exp(run_max - safe_max);
    s.sub_(safe_max.unsqueeze(-1)).exp_();
    run_sum = run_sum * alpha + s.sum(-1);
    out.mul_(alpha.unsqueeze(-1)).add_(batched_mm(s, xt));
    run_max = new_max;
  }
  // A row whose tokens are all masked out attends to nothing: output 0 (as torch's
  // scaled_dot_product_attention), log-sum-exp −inf, and the backward gives it zero gradients.
  out.div_(at::where(run_sum > 0, run_sum, at::ones_like(run_sum)).unsqueeze(-1));
  const at::Tensor lse = run_max + at::log(run_sum);
  return {out.to(q.scalar_type()), lse};
}

TORCH_LIBRARY_IMPL(distkern, CompositeExplicitAutograd, m) {
  m.impl("shared_kv_attention", &shared_kv_attention_composite);
}

}  // namespace align
}  // namespace distkern
