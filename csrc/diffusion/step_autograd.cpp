// Autograd of the fused sampler step, in C++: a sampler step is often called with small latents
// (one SD image: 64 K elements), where a Python autograd wrapper around the op would cost more
// than the kernel. Device-generic: it redispatches to the CPU / CUDA kernels below autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "diffusion/step_math.h"

namespace distkern {
namespace diffusion {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

bool requires_grad(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

using StepFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                                  at::ArrayRef<double>, const c10::optional<at::Tensor>&, int64_t,
                                                  double, double, double, int64_t, int64_t);

const c10::TypedOperatorHandle<StepFn>& step_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("distkern::sampler_step", "").typed<StepFn>();
  return op;
}

class SamplerStep : public torch::autograd::Function<SamplerStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sample, const at::Tensor& model_output,
                               const c10::optional<at::Tensor>& prev_x0, const c10::optional<at::Tensor>& noise,
                               std::vector<double> coefs, const c10::optional<at::Tensor>& per_sample,
                               int64_t clip_mode, double clip_range, double ratio, double max_value, int64_t seed,
                               int64_t offset) {
    TORCH_CHECK(!(noise.has_value() && noise->defined() && noise->requires_grad()),
                "distkern.sampler_step: the gradient w.r.t. a given noise tensor is not implemented; pass the noise "
                "detached (for reparameterised noise, add it to the sample before the step)");
    at::AutoDispatchBelowADInplaceOrView below;
    auto out = step_op().call(sample, model_output, prev_x0, noise, coefs, per_sample, clip_mode, clip_range, ratio,
                              max_value, seed, offset);
    ctx->save_for_backward({sample, model_output, opt(noise), opt(per_sample)});
    ctx->saved_data["coefs"] = coefs;
    ctx->saved_data["clip_mode"] = clip_mode;
    ctx->saved_data["clip_range"] = clip_range;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["has_prev"] = prev_x0.has_value() && prev_x0->defined();
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &sample = saved[0], &model_output = saved[1];
    const c10::optional<at::Tensor> noise = saved[2].defined() ? c10::optional<at::Tensor>(saved[2]) : c10::nullopt;
    const c10::optional<at::Tensor> table = saved[3].defined() ? c10::optional<at::Tensor>(saved[3]) : c10::nullopt;
    const int64_t clip_mode = ctx->saved_data["clip_mode"].toInt();
    TORCH_CHECK(clip_mode != kClipThreshold, "distkern.sampler_step: the gradient through dynamic thresholding is not "
                "implemented (the per-sample quantile is not differentiable here); use clip= or no clipping");
    const std::vector<double> coefs = ctx->saved_data["coefs"].toDoubleVector();
    at::Tensor gprev = grads[0].defined() ? grads[0] : at::zeros_like(sample);
    const c10::optional<at::Tensor> gx0 = grads[1].defined() ? c10::optional<at::Tensor>(grads[1]) : c10::nullopt;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("distkern::sampler_step_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, at::ArrayRef<double>,
                             const c10::optional<at::Tensor>&, int64_t, double, int64_t, int64_t)>();
    auto g = op.call(gprev, gx0, sample, model_output, noise, coefs, table, clip_mode,
                     ctx->saved_data["clip_range"].toDouble(), ctx->saved_data["seed"].toInt(),
                     ctx->saved_data["offset"].toInt());
    variable_list out(12);
    out[0] = std::get<0>(g);
    out[1] = std::get<1>(g);
    if (ctx->saved_data["has_prev"].toBool()) out[2] = std::get<2>(g);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> sampler_step_autograd(const at::Tensor& sample, const at::Tensor& model_output,
                                                         const c10::optional<at::Tensor>& prev_x0,
                                                         const c10::optional<at::Tensor>& noise,
                                                         at::ArrayRef<double> coefs,
                                                         const c10::optional<at::Tensor>& per_sample,
                                                         int64_t clip_mode, double clip_range, double ratio,
                                                         double max_value, int64_t seed, int64_t offset) {
  // No gradient can flow (grad mode off, or no input requires one: every sampling loop): straight to the kernel.
  // The autograd node, its saved tensors and the coefficient vector cost ~3 µs, as much as the whole step on
  // one small image's latents.
  if (!at::GradMode::is_enabled() ||
      !(sample.requires_grad() || model_output.requires_grad() || requires_grad(prev_x0) || requires_grad(noise) ||
        requires_grad(per_sample))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return step_op().call(sample, model_output, prev_x0, noise, coefs, per_sample, clip_mode, clip_range, ratio,
                          max_value, seed, offset);
  }
  auto out = SamplerStep::apply(sample, model_output, prev_x0, noise, coefs.vec(), per_sample, clip_mode, clip_range,
                                ratio, max_value, seed, offset);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, Autograd, m) { m.impl("sampler_step", &sampler_step_autograd); }

}  // namespace diffusion
}  // namespace distkern
