// Argument checks of the fused sampler step, shared by its CPU and CUDA entry points.
#include "diffusion/step.h"

#include "common/check.h"
#include "diffusion/step_math.h"

namespace distkern {
namespace diffusion {
namespace {

at::Tensor like_sample(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have the sample's shape ", shape_str(x),
                    "; got ", shape_str(t));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the sample's dtype ",
                   x.scalar_type(), "; got ", t.scalar_type());
  check_same_device(op, name, t, "sample", x);
  return t.contiguous();
}

}  // namespace

StepInputs prepare_step(const char* op, const at::Tensor& sample, const at::Tensor& model_output,
                        const c10::optional<at::Tensor>& prev_x0, const c10::optional<at::Tensor>& noise,
                        at::ArrayRef<double> coefs, const c10::optional<at::Tensor>& per_sample,
                        int64_t clip_mode, double clip_range, double ratio, double max_value, int64_t seed,
                        int64_t offset) {
  check_float(op, "sample", sample);
  TORCH_CHECK_VALUE(sample.dim() >= 1, op, ": sample must be (B, ...) with a batch dimension; got a 0-D tensor");
  StepInputs in;
  in.x = sample.contiguous();
  in.m = like_sample(op, "model_output", model_output, sample);
  if (prev_x0.has_value() && prev_x0->defined()) in.px0 = like_sample(op, "prev_x0", *prev_x0, sample);
  if (noise.has_value() && noise->defined()) in.noise = like_sample(op, "noise", *noise, sample);
  in.B = sample.size(0);
  in.numel = sample.numel();
  in.n = in.B > 0 ? in.numel / in.B : 0;
  if (per_sample.has_value() && per_sample->defined()) {
    const at::Tensor& t = *per_sample;
    TORCH_CHECK_VALUE(coefs.empty(), op, ": give the coefficients either as 8 floats or as a (B, 8) per-sample "
                      "table, not both");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == in.B && t.size(1) == kNumCoefs, op,
                      ": the per-sample coefficient table must be (B, 8) = (", in.B, ", 8); got ", shape_str(t));
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": the per-sample coefficient table must be float64; got ",
                     t.scalar_type());
    check_same_device(op, "the per-sample coefficient table", t, "sample", sample);
    in.per_sample = t.contiguous();
  } else {
    TORCH_CHECK_VALUE(coefs.size() == kNumCoefs, op, ": expected 8 coefficients (a, b, g, p, r, w, u, s); got ",
                      coefs.size());
    in.coefs.assign(coefs.begin(), coefs.end());
  }
  TORCH_CHECK_VALUE(clip_mode >= kClipNone && clip_mode <= kClipThreshold, op,
                    ": clip_mode must be 0 (none), 1 (clamp) or 2 (dynamic thresholding); got ", clip_mode);
  in.clip_mode = static_cast<int>(clip_mode);
  if (clip_mode == kClipClamp)
    TORCH_CHECK_VALUE(clip_range > 0, op, ": the clip range must be > 0; got ", clip_range);
  if (clip_mode == kClipThreshold) {
    TORCH_CHECK_VALUE(ratio >= 0 && ratio <= 1, op, ": the thresholding ratio must lie in [0, 1]; got ", ratio);
    TORCH_CHECK_VALUE(max_value >= 1, op, ": the thresholding max_value must be >= 1; got ", max_value);
    TORCH_CHECK_VALUE(in.n < (int64_t(1) << 31), op, ": dynamic thresholding takes at most 2^31 - 1 elements per "
                      "sample; got ", in.n);
  }
  in.clip_range = clip_range;
  in.ratio = ratio;
  in.max_value = max_value;
  TORCH_CHECK_VALUE(seed >= -1, op, ": seed must be >= 0 (or -1: no in-kernel noise); got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0; got ", offset);
  TORCH_CHECK_VALUE(!(in.noise.defined() && seed >= 0), op, ": give noise or a seed, not both");
  in.seed = seed;
  in.offset = offset;
  return in;
}

at::Tensor prepare_grad(const char* op, const char* name, const at::Tensor& g, const at::Tensor& sample) {
  TORCH_CHECK_VALUE(g.sizes() == sample.sizes(), op, ": ", name, " must have the sample's shape ",
                    shape_str(sample), "; got ", shape_str(g));
  check_same_device(op, name, g, "sample", sample);
  return g.to(sample.scalar_type()).contiguous();
}

}  // namespace diffusion
}  // namespace distkern
