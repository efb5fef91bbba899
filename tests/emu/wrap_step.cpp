// C entry points of the emulated sampler-step kernels (tests/test_kernel_emulation.py, ctypes).
#include "diffusion/step_kernel.cu"  // rewritten by cu2cpp.py

namespace {

distkern::diffusion::StepArgs common(const void* x, const void* m, const void* noise, const double* per_sample,
                                     const double* coefs, int64_t B, int64_t n, int64_t numel, int clip_mode,
                                     double clip_range, int64_t seed, int64_t offset) {
  distkern::diffusion::StepArgs a;
  a.x = x;
  a.m = m;
  a.noise = noise;
  a.per_sample = per_sample;
  for (int i = 0; i < 8; ++i) a.coefs[i] = coefs[i];
  a.B = B;
  a.n = n;
  a.numel = numel;
  a.clip_mode = clip_mode;
  a.clip_range = clip_range;
  a.seed = seed;
  a.offset = offset;
  return a;
}

int forward(int dtype, distkern::diffusion::StepArgs a, void* out, void* x0, double ratio, double max_value,
            void* scale) {
  a.out = out;
  a.x0 = x0;
  a.ratio = ratio;
  a.max_value = max_value;
  a.scale = scale;
  return distkern::diffusion::launch_sampler_step(static_cast<distkern::DType>(dtype), a, nullptr);
}

}  // namespace

extern "C" {

int emu_sampler_step(int dtype, const void* x, const void* m, const void* px0, const void* noise, void* out, void* x0,
                     const double* per_sample, const double* coefs, int64_t B, int64_t n, int64_t numel,
                     int clip_mode, double clip_range, double ratio, double max_value, int64_t seed, int64_t offset,
                     void* scale) {
  auto a = common(x, m, noise, per_sample, coefs, B, n, numel, clip_mode, clip_range, seed, offset);
  a.px0 = px0;
  return forward(dtype, a, out, x0, ratio, max_value, scale);
}

// The same with dynamic thresholding over `select_blocks` blocks a sample, in the zeroed workspace `ws`
// (B × kSelectWords words).
int emu_sampler_step_select(int dtype, const void* x, const void* m, const void* noise, void* out, void* x0,
                            const double* coefs, int64_t B, int64_t n, double ratio, double max_value, int64_t seed,
                            void* scale, int64_t select_blocks, void* ws) {
  auto a = common(x, m, noise, nullptr, coefs, B, n, B * n, 2, 1.0, seed, 4);
  a.select_blocks = select_blocks;
  a.select_ws = ws;
  return forward(dtype, a, out, x0, ratio, max_value, scale);
}

int emu_sampler_step_backward(int dtype, const void* grad_prev, const void* grad_x0, const void* x, const void* m,
                              const void* noise, void* gx, void* gm, void* gpx, const double* per_sample,
                              const double* coefs, int64_t B, int64_t n, int64_t numel, int clip_mode,
                              double clip_range, int64_t seed, int64_t offset) {
  auto a = common(x, m, noise, per_sample, coefs, B, n, numel, clip_mode, clip_range, seed, offset);
  a.grad_prev = grad_prev;
  a.grad_x0 = grad_x0;
  a.out = gx;
  a.x0 = gm;
  a.gpx0 = gpx;
  return distkern::diffusion::launch_sampler_step_backward(static_cast<distkern::DType>(dtype), a, nullptr);
}
}
