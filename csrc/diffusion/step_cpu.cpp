// CPU schedule of the fused sampler step: flat element ranges in parallel, cut at sample boundaries
// (so per-sample coefficients are loaded once per run of elements), blocks of 256 elements whose
// noise is converted or drawn into a stack buffer first, then one branch-free loop of step_math.h.
// Dynamic thresholding first finds each sample's quantile of |x0| by selection (O(n), one buffer of
// the sample's size per thread).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "diffusion/step.h"
#include "diffusion/step_math.h"

namespace distkern {
namespace diffusion {
namespace {

constexpr int64_t kBlock = 256;

template <typename acc_t>
Coefs<acc_t> coefs_for(const StepInputs& in, const double* table, int64_t b) {
  return load_coefs<acc_t>(table ? table + b * kNumCoefs : in.coefs.data());
}

// Noise of elements [i, i + len) into buf (len ≤ kBlock), from the tensor or the generator; null if none.
template <typename scalar_t, typename acc_t>
const acc_t* fill_noise(const StepInputs& in, const scalar_t* np, int64_t i, int64_t len, acc_t* buf) {
  if (np) {
    for (int64_t k = 0; k < len; ++k) buf[k] = static_cast<acc_t>(np[i + k]);
    return buf;
  }
  if (in.seed < 0) return nullptr;
  float z[4];
  int64_t group = -1;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t e = i + k;
    if ((e >> 2) != group) {
      group = e >> 2;
      normals4(static_cast<uint64_t>(in.seed), static_cast<uint64_t>(in.offset), static_cast<uint64_t>(group), z);
    }
    buf[k] = static_cast<acc_t>(z[e & 3]);
  }
  return buf;
}

// Per-sample scale of dynamic thresholding.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> threshold_scales(const StepInputs& in) {
  std::vector<acc_t> scale(in.B, acc_t(1));
  if (in.n == 0) return scale;
  const scalar_t* xp = in.x.data_ptr<scalar_t>();
  const scalar_t* mp = in.m.data_ptr<scalar_t>();
  const scalar_t* np = in.noise.defined() ? in.noise.data_ptr<scalar_t>() : nullptr;
  const double* table = in.per_sample.defined() ? in.per_sample.data_ptr<double>() : nullptr;
  int64_t lo;
  acc_t frac;
  quantile_rank(static_cast<acc_t>(in.ratio), in.n, &lo, &frac);
  at::parallel_for(0, in.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> v(in.n);
    acc_t nbuf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const Coefs<acc_t> c = coefs_for<acc_t>(in, table, b);
      const int64_t base = b * in.n;
      bool nan = false;
      for (int64_t k0 = 0; k0 < in.n; k0 += kBlock) {
        const int64_t len = std::min(kBlock, in.n - k0);
        const acc_t* nz = fill_noise<scalar_t, acc_t>(in, np, base + k0, len, nbuf);
        for (int64_t k = 0; k < len; ++k) {
          const int64_t e = base + k0 + k;
          const acc_t x0 = x0_of(c, static_cast<acc_t>(xp[e]), static_cast<acc_t>(mp[e]), nz ? nz[k] : acc_t(0));
          nan |= (x0 != x0);
          v[k0 + k] = x0 < 0 ? -x0 : x0;
        }
      }
      if (nan) {  // a NaN anywhere: a NaN quantile, as torch.quantile (nth_element has no order for NaN)
        scale[b] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      std::nth_element(v.begin(), v.begin() + lo, v.end());
      const acc_t vlo = v[lo];
      const acc_t vhi = lo + 1 < in.n ? *std::min_element(v.begin() + lo + 1, v.end()) : vlo;
      scale[b] = threshold_scale(lerp(vlo, vhi, frac), static_cast<acc_t>(in.max_value));
    }
  });
  return scale;
}

// Calls fn(b, coefs, i, len, noise) on runs [i, i + len) of at most kBlock elements of one sample b, in
// parallel over flat element ranges; noise (when want_noise) points at the run's noise, or is null.
template <typename scalar_t, typename acc_t, typename Fn>
void for_each_block(const StepInputs& in, bool want_noise, const Fn& fn) {
  const scalar_t* np = in.noise.defined() ? in.noise.data_ptr<scalar_t>() : nullptr;
  const double* table = in.per_sample.defined() ? in.per_sample.data_ptr<double>() : nullptr;
  at::parallel_for(0, in.numel, 16384, [&](int64_t begin, int64_t end) {
    acc_t nbuf[kBlock];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / in.n;
      const int64_t seg_end = std::min(end, (b + 1) * in.n);
      const Coefs<acc_t> c = coefs_for<acc_t>(in, table, b);
      for (; i < seg_end; i += kBlock) {
        const int64_t len = std::min(kBlock, seg_end - i);
        fn(b, c, i, len, want_noise ? fill_noise<scalar_t, acc_t>(in, np, i, len, nbuf) : nullptr);
      }
      i = seg_end;
    }
  });
}

// One run of elements with constant coefficients; the flags are template parameters so that the loop has
// no branches and vectorises.
template <bool kNoise, bool kPrev, int kMode, typename scalar_t, typename acc_t>
DK_CPU_MULTIVERSION void step_run(const Coefs<acc_t>& c, acc_t lim, const scalar_t* __restrict__ xp, const scalar_t* __restrict__ mp,
              const scalar_t* __restrict__ pp, const acc_t* __restrict__ nz, scalar_t* __restrict__ op,
              scalar_t* __restrict__ xo, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const acc_t xv = static_cast<acc_t>(xp[k]), mv = static_cast<acc_t>(mp[k]);
    const acc_t nv = kNoise ? nz[k] : acc_t(0);
    const acc_t x0 = clip_x0(x0_of(c, xv, mv, nv), kMode, lim);
    const acc_t pv = kPrev ? static_cast<acc_t>(pp[k]) : acc_t(0);
    op[k] = static_cast<scalar_t>(prev_of(c, x0, xv, mv, pv, nv));
    xo[k] = static_cast<scalar_t>(x0);
  }
}

template <bool kNoise, bool kPrev, typename scalar_t, typename acc_t>
void step_run_mode(int mode, const Coefs<acc_t>& c, acc_t lim, const scalar_t* xp, const scalar_t* mp,
                   const scalar_t* pp, const acc_t* nz, scalar_t* op, scalar_t* xo, int64_t len) {
  if (mode == kClipNone) {
    step_run<kNoise, kPrev, kClipNone>(c, lim, xp, mp, pp, nz, op, xo, len);
  } else if (mode == kClipClamp) {
    step_run<kNoise, kPrev, kClipClamp>(c, lim, xp, mp, pp, nz, op, xo, len);
  } else {
    step_run<kNoise, kPrev, kClipThreshold>(c, lim, xp, mp, pp, nz, op, xo, len);
  }
}

template <typename scalar_t>
void forward(const StepInputs& in, at::Tensor& out, at::Tensor& x0out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = in.x.data_ptr<scalar_t>();
  const scalar_t* mp = in.m.data_ptr<scalar_t>();
  const scalar_t* pp = in.px0.defined() ? in.px0.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* xo = x0out.data_ptr<scalar_t>();
  std::vector<acc_t> scale;
  if (in.clip_mode == kClipThreshold) scale = threshold_scales<scalar_t, acc_t>(in);
  const int mode = in.clip_mode;
  for_each_block<scalar_t, acc_t>(in, true, [&](int64_t b, const Coefs<acc_t>& c, int64_t i, int64_t len,
                                                 const acc_t* nz) {
    const acc_t lim = mode == kClipThreshold ? scale[b] : static_cast<acc_t>(in.clip_range);
    const scalar_t* p = pp ? pp + i : nullptr;
    if (nz && p) {
      step_run_mode<true, true>(mode, c, lim, xp + i, mp + i, p, nz, op + i, xo + i, len);
    } else if (nz) {
      step_run_mode<true, false>(mode, c, lim, xp + i, mp + i, p, nz, op + i, xo + i, len);
    } else if (p) {
      step_run_mode<false, true>(mode, c, lim, xp + i, mp + i, p, nz, op + i, xo + i, len);
    } else {
      step_run_mode<false, false>(mode, c, lim, xp + i, mp + i, p, nz, op + i, xo + i, len);
    }
  });
}

template <typename scalar_t>
void backward(const StepInputs& in, const at::Tensor& gprev, const at::Tensor& gx0, at::Tensor& gx, at::Tensor& gm,
              at::Tensor& gp) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = in.x.data_ptr<scalar_t>();
  const scalar_t* mp = in.m.data_ptr<scalar_t>();
  const scalar_t* gpp = gprev.data_ptr<scalar_t>();
  const scalar_t* gxp0 = gx0.defined() ? gx0.data_ptr<scalar_t>() : nullptr;
  scalar_t* gxo = gx.data_ptr<scalar_t>();
  scalar_t* gmo = gm.data_ptr<scalar_t>();
  scalar_t* gpo = gp.data_ptr<scalar_t>();
  const int mode = in.clip_mode;
  const acc_t lim = static_cast<acc_t>(in.clip_range);
  // the noise only matters through the clip mask
  for_each_block<scalar_t, acc_t>(in, mode != kClipNone, [&](int64_t, const Coefs<acc_t>& c, int64_t i, int64_t len,
                                                              const acc_t* nz) {
    for (int64_t k = 0; k < len; ++k) {
      acc_t inside = acc_t(1);
      if (mode != kClipNone) {
        const acc_t x0 = x0_of(c, static_cast<acc_t>(xp[i + k]), static_cast<acc_t>(mp[i + k]), nz ? nz[k] : acc_t(0));
        inside = clip_grad(x0, mode, lim);
      }
      acc_t a, bm, cp;
      step_grad(c, inside, static_cast<acc_t>(gpp[i + k]), gxp0 ? static_cast<acc_t>(gxp0[i + k]) : acc_t(0), &a, &bm,
                &cp);
      gxo[i + k] = static_cast<scalar_t>(a);
      gmo[i + k] = static_cast<scalar_t>(bm);
      gpo[i + k] = static_cast<scalar_t>(cp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& sample, const at::Tensor& model_output,
                                                    const c10::optional<at::Tensor>& prev_x0,
                                                    const c10::optional<at::Tensor>& noise, at::ArrayRef<double> coefs,
                                                    const c10::optional<at::Tensor>& per_sample, int64_t clip_mode,
                                                    double clip_range, double ratio, double max_value, int64_t seed,
                                                    int64_t offset) {
  StepInputs in = prepare_step("distkern.sampler_step", sample, model_output, prev_x0, noise, coefs, per_sample,
                               clip_mode, clip_range, ratio, max_value, seed, offset);
  at::Tensor out = at::empty_like(in.x), x0 = at::empty_like(in.x);
  if (in.numel == 0) return {out, x0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "sampler_step",
                                  [&] { forward<scalar_t>(in, out, x0); });
  return {out, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sampler_step_backward_cpu(
    const at::Tensor& grad_prev, const c10::optional<at::Tensor>& grad_x0, const at::Tensor& sample,
    const at::Tensor& model_output, const c10::optional<at::Tensor>& noise, at::ArrayRef<double> coefs,
    const c10::optional<at::Tensor>& per_sample, int64_t clip_mode, double clip_range, int64_t seed, int64_t offset) {
  const char* op = "distkern.sampler_step_backward";
  TORCH_CHECK_VALUE(clip_mode != kClipThreshold, op, ": the gradient through dynamic thresholding is not "
                    "implemented; use clamping or no clipping");
  StepInputs in = prepare_step(op, sample, model_output, c10::nullopt, noise, coefs, per_sample, clip_mode,
                               clip_range, 0.995, 1.0, seed, offset);
  const at::Tensor gp = prepare_grad(op, "grad_prev", grad_prev, in.x);
  at::Tensor g0;
  if (grad_x0.has_value() && grad_x0->defined()) g0 = prepare_grad(op, "grad_x0", *grad_x0, in.x);
  at::Tensor gx = at::empty_like(in.x), gm = at::empty_like(in.x), gpx = at::empty_like(in.x);
  if (in.numel == 0) return {gx, gm, gpx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "sampler_step_backward",
                                  [&] { backward<scalar_t>(in, gp, g0, gx, gm, gpx); });
  return {gx, gm, gpx};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CPU, m) {
  m.impl("sampler_step", &sampler_step_cpu);
  m.impl("sampler_step_backward", &sampler_step_backward_cpu);
}

}  // namespace diffusion
}  // namespace distkern
