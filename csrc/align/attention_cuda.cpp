// CUDA entry point of shared_kv_attention: the fused kernel when enabled and applicable (float32 /
// float16 / bfloat16, D <= 1024), else the composite of cuBLAS GEMMs (attention.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "align/attention.h"
#include "align/attention_launch.h"
#include "common/check.h"

namespace distkern {
namespace align {
namespace {

std::tuple<at::Tensor, at::Tensor> shared_kv_attention_cuda(const at::Tensor& q, const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& mask, int64_t tile) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.shared_kv_attention", "q", q));
  const at::Tensor keep = check_attention(q, x, mask, tile);
  const bool fits = q.scalar_type() != at::kDouble && q.scalar_type() == x.scalar_type() &&
                    q.size(2) <= kFusedAttentionMaxD && q.size(0) <= 65535;
  if (!fused_attention_enabled() || !fits) return shared_kv_attention_composite(q, x, mask, tile);
  const at::Tensor qc = q.contiguous(), xc = x.contiguous();
  const at::Tensor mc = keep.defined() ? keep.contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_shared_kv_attention(to_dtype(q.scalar_type()), qc.data_ptr(), xc.data_ptr(),
                                            mc.defined() ? mc.data_ptr<bool>() : nullptr, out.data_ptr(),
                                            lse.data_ptr<float>(), q.size(0), q.size(1), x.size(1), q.size(2),
                                            at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("shared_kv_attention", &shared_kv_attention_cuda); }

}  // namespace align
}  // namespace distkern
