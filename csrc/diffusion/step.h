// The fused sampler step (torch side): argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace distkern {
namespace diffusion {

// Checked, contiguous inputs of sampler_step / sampler_step_backward.
struct StepInputs {
  at::Tensor x, m, px0, noise;   // (B, ...) contiguous, one dtype; px0 / noise undefined when absent
  std::vector<double> coefs;     // 8 host coefficients (empty when per_sample is given)
  at::Tensor per_sample;         // (B, 8) float64 contiguous on x's device, or undefined
  int64_t B = 0, n = 0, numel = 0;  // batch, elements per sample, all elements
  int clip_mode = 0;
  double clip_range = 1.0, ratio = 0.995, max_value = 1.0;
  int64_t seed = -1, offset = 0;
};

StepInputs prepare_step(const char* op, const at::Tensor& sample, const at::Tensor& model_output,
                        const c10::optional<at::Tensor>& prev_x0, const c10::optional<at::Tensor>& noise,
                        at::ArrayRef<double> coefs, const c10::optional<at::Tensor>& per_sample,
                        int64_t clip_mode, double clip_range, double ratio, double max_value, int64_t seed,
                        int64_t offset);

// A gradient argument (grad_prev / grad_x0) checked against the sample: same shape, made contiguous
// in the sample's dtype.
at::Tensor prepare_grad(const char* op, const char* name, const at::Tensor& g, const at::Tensor& sample);

}  // namespace diffusion
}  // namespace distkern
