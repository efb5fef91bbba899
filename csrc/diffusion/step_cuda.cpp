// CUDA entry points of the fused sampler step: checks, device guard, stream, dtype → launcher.
// Nothing here reads device memory back: the step can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/check.h"
#include "diffusion/step.h"
#include "diffusion/step_launch.h"
#include "diffusion/step_math.h"

namespace distkern {
namespace diffusion {
namespace {

StepArgs args_of(const StepInputs& in) {
  StepArgs a;
  a.x = in.x.data_ptr();
  a.m = in.m.data_ptr();
  a.px0 = in.px0.defined() ? in.px0.data_ptr() : nullptr;
  a.noise = in.noise.defined() ? in.noise.data_ptr() : nullptr;
  a.per_sample = in.per_sample.defined() ? in.per_sample.data_ptr<double>() : nullptr;
  if (!in.coefs.empty()) std::copy(in.coefs.begin(), in.coefs.end(), a.coefs);
  a.B = in.B;
  a.n = in.n;
  a.numel = in.numel;
  a.clip_mode = in.clip_mode;
  a.clip_range = in.clip_range;
  a.ratio = in.ratio;
  a.max_value = in.max_value;
  a.seed = in.seed;
  a.offset = in.offset;
  return a;
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& sample, const at::Tensor& model_output,
                                                     const c10::optional<at::Tensor>& prev_x0,
                                                     const c10::optional<at::Tensor>& noise,
                                                     at::ArrayRef<double> coefs,
                                                     const c10::optional<at::Tensor>& per_sample, int64_t clip_mode,
                                                     double clip_range, double ratio, double max_value, int64_t seed,
                                                     int64_t offset) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.sampler_step", "sample", sample));
  StepInputs in = prepare_step("distkern.sampler_step", sample, model_output, prev_x0, noise, coefs, per_sample,
                               clip_mode, clip_range, ratio, max_value, seed, offset);
  at::Tensor out = at::empty_like(in.x), x0 = at::empty_like(in.x);
  StepArgs a = args_of(in);
  a.out = out.data_ptr();
  a.x0 = x0.data_ptr();
  at::Tensor scale, select_ws;
  if (in.clip_mode == kClipThreshold) {
    scale = at::empty({std::max<int64_t>(in.B, 1)}, in.x.options().dtype(acc_type(in.x.scalar_type())));
    a.scale = scale.data_ptr();
    a.select_blocks = select_blocks_for(in.B, in.n);
    if (a.select_blocks > 1) {  // large samples: the select over several blocks a sample
      select_ws = at::zeros({in.B * kSelectWords}, in.x.options().dtype(at::kLong));
      a.select_ws = select_ws.data_ptr();
    }
  }
  C10_CUDA_CHECK(launch_sampler_step(to_dtype(in.x.scalar_type()), a, at::cuda::getCurrentCUDAStream()));
  return {out, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sampler_step_backward_cuda(
    const at::Tensor& grad_prev, const c10::optional<at::Tensor>& grad_x0, const at::Tensor& sample,
    const at::Tensor& model_output, const c10::optional<at::Tensor>& noise, at::ArrayRef<double> coefs,
    const c10::optional<at::Tensor>& per_sample, int64_t clip_mode, double clip_range, int64_t seed, int64_t offset) {
  const char* op = "distkern.sampler_step_backward";
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "sample", sample));
  TORCH_CHECK_VALUE(clip_mode != kClipThreshold, op, ": the gradient through dynamic thresholding is not "
                    "implemented; use clamping or no clipping");
  StepInputs in = prepare_step(op, sample, model_output, c10::nullopt, noise, coefs, per_sample, clip_mode,
                               clip_range, 0.995, 1.0, seed, offset);
  const at::Tensor gp = prepare_grad(op, "grad_prev", grad_prev, in.x);
  at::Tensor g0;
  if (grad_x0.has_value() && grad_x0->defined()) g0 = prepare_grad(op, "grad_x0", *grad_x0, in.x);
  at::Tensor gx = at::empty_like(in.x), gm = at::empty_like(in.x), gpx = at::empty_like(in.x);
  StepArgs a = args_of(in);
  a.grad_prev = gp.data_ptr();
  a.grad_x0 = g0.defined() ? g0.data_ptr() : nullptr;
  a.out = gx.data_ptr();
  a.x0 = gm.data_ptr();
  a.gpx0 = gpx.data_ptr();
  C10_CUDA_CHECK(launch_sampler_step_backward(to_dtype(in.x.scalar_type()), a, at::cuda::getCurrentCUDAStream()));
  return {gx, gm, gpx};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CUDA, m) {
  m.impl("sampler_step", &sampler_step_cuda);
  m.impl("sampler_step_backward", &sampler_step_backward_cuda);
}

}  // namespace diffusion
}  // namespace distkern
