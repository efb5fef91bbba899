// C entry points of the emulated Mahalanobis tile kernels (tests/test_kernel_emulation.py, ctypes).
#include <cmath>
#include <vector>

#include "mahalanobis/mahalanobis_kernel.cu"  // rewritten by cu2cpp.py

using distkern::DType;
using distkern::cuda::MatMode;

extern "C" {

int emu_maha_forward(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* mean, const void* factor,
                     void* out, int64_t N, int64_t D, int64_t R, int lower) {
  return distkern::mahalanobis::launch_forward(static_cast<DType>(xt), x, sx0, sx1, mean, factor, out, N, D, R,
                                               lower != 0, static_cast<MatMode>(mode), nullptr);
}

int emu_maha_backward(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* grad, const void* mean,
                      const void* factor, void* z, void* gx, void* partial, int64_t N, int64_t D, int64_t R,
                      int lower) {
  return distkern::mahalanobis::launch_backward(static_cast<DType>(xt), x, sx0, sx1, grad, mean, factor, z, gx,
                                                partial, N, D, R, lower != 0, static_cast<MatMode>(mode), nullptr);
}

int emu_maha_k(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* means, const void* factors,
               const void* bias, void* out, int64_t* idx, int64_t N, int64_t D, int64_t R, int64_t K, int lower,
               int reduce) {
  return distkern::mahalanobis::launch_k_components(static_cast<DType>(xt), x, sx0, sx1, means, factors, bias, out,
                                                    idx, N, D, R, K, lower != 0,
                                                    static_cast<distkern::mahalanobis::KReduce>(reduce),
                                                    static_cast<MatMode>(mode), nullptr);
}

int emu_maha_pos(int xt, int ft, int mode, const void* x, int64_t sb, int64_t sp, int64_t sd, const void* means,
                 const void* factors, void* out, int64_t B, int64_t P, int64_t D, int64_t R, int lower) {
  return distkern::mahalanobis::launch_positions(static_cast<DType>(xt), static_cast<DType>(ft), x, sb, sp, sd, means,
                                                 factors, out, B, P, D, R, lower != 0, static_cast<MatMode>(mode),
                                                 nullptr);
}
int emu_maha_k_shared(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* center,
                      const void* bmat, const void* zz, const void* vv, const void* bias, void* out, int64_t* idx,
                      int64_t N, int64_t D, int64_t K, int reduce) {
  return distkern::mahalanobis::launch_k_shared(static_cast<DType>(xt), x, sx0, sx1, center, bmat, zz, vv, bias, out,
                                                idx, N, D, K, static_cast<distkern::mahalanobis::KReduce>(reduce),
                                                static_cast<MatMode>(mode), nullptr);
}

}  // extern "C"

namespace {

struct CpuPanels {
  const float* factor;  // D × R
  float* xc;            // rows × D
  float* z;             // rows × R
  int64_t D, R;
  int64_t calls = 0, flops = 0;
};

// Z[0 : rows, c0 : c0 + cols] = XC[0 : rows, k0 : D] · W[k0 : D, c0 : c0 + cols], summed in double
int cpu_panel_gemm(void* ctx, int64_t rows, int64_t k0, int64_t c0, int64_t cols) {
  auto* c = static_cast<CpuPanels*>(ctx);
  ++c->calls;
  c->flops += 2 * rows * cols * (c->D - k0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = c0; j < c0 + cols; ++j) {
      double s = 0.0;
      for (int64_t k = k0; k < c->D; ++k) s += double(c->xc[i * c->D + k]) * c->factor[k * c->R + j];
      c->z[i * c->R + j] = static_cast<float>(s);
    }
  return 0;
}

}  // namespace

// The forward's Gram panels with rows of `rows` and column blocks of `block`, a CPU loop as the GEMMs;
// *calls / *flops get the number of GEMMs and their multiply-adds × 2.
extern "C" int emu_maha_forward_panels(int xt, const void* x, int64_t sx0, int64_t sx1, const float* mean,
                                       const float* factor, float* out, int64_t N, int64_t D, int64_t R, int lower,
                                       int64_t rows, int64_t block, int64_t* calls, int64_t* flops) {
  std::vector<float> xc(static_cast<size_t>(rows * D), NAN), z(static_cast<size_t>(rows * R), NAN), guard(rows, NAN);
  CpuPanels c{factor, xc.data(), z.data(), D, R};
  const distkern::mahalanobis::FwdPanels p{&cpu_panel_gemm, &c, xc.data(), z.data(), guard.data(), rows, block};
  const int rc = static_cast<int>(distkern::mahalanobis::launch_forward_panels(
      static_cast<DType>(xt), x, sx0, sx1, mean, out, N, D, R, lower != 0, p, nullptr));
  *calls = c.calls;
  *flops = c.flops;
  return rc;
}

// distkern::mahalanobis::panel_plan, for the test to check its bounds
extern "C" void emu_maha_panel_plan(int64_t N, int64_t D, int64_t R, int lower, int64_t* plan) {
  const distkern::mahalanobis::PanelPlan pl = distkern::mahalanobis::panel_plan(N, D, R, lower != 0);
  plan[0] = pl.rows;
  plan[1] = pl.block;
}

namespace {

struct CpuPosPanels {
  const float* factors;  // P × D × R
  float* xc;             // positions × B × D
  float* z;              // positions × B × R
  int64_t B, D, R;
  int64_t calls = 0, flops = 0;
};

// Z[p, :, c0 : c0 + cols] = XC[p, :, k0 : D] · W[p0 + p, k0 : D, c0 : c0 + cols] for p < n, summed in double
int cpu_pos_panel_gemm(void* ctx, int64_t p0, int64_t n, int64_t k0, int64_t c0, int64_t cols) {
  auto* c = static_cast<CpuPosPanels*>(ctx);
  ++c->calls;
  c->flops += 2 * n * c->B * cols * (c->D - k0);
  for (int64_t p = 0; p < n; ++p) {
    const float* w = c->factors + (p0 + p) * c->D * c->R;
    for (int64_t i = 0; i < c->B; ++i)
      for (int64_t j = c0; j < c0 + cols; ++j) {
        double s = 0.0;
        for (int64_t k = k0; k < c->D; ++k) s += double(c->xc[(p * c->B + i) * c->D + k]) * w[k * c->R + j];
        c->z[(p * c->B + i) * c->R + j] = static_cast<float>(s);
      }
  }
  return 0;
}

}  // namespace

// The per-position forward's Gram panels with `positions` positions a panel and column blocks of `block`, a
// CPU loop as the batched GEMMs; *calls / *flops as emu_maha_forward_panels.
extern "C" int emu_maha_pos_panels(int xt, const void* x, int64_t sb, int64_t sp, int64_t sd, const float* means,
                                   const float* factors, float* out, int64_t B, int64_t P, int64_t D, int64_t R,
                                   int lower, int64_t positions, int64_t block, int64_t* calls, int64_t* flops) {
  std::vector<float> xc(static_cast<size_t>(positions * B * D), NAN), z(static_cast<size_t>(positions * B * R), NAN),
      guard(static_cast<size_t>(positions * B), NAN);
  CpuPosPanels c{factors, xc.data(), z.data(), B, D, R};
  const distkern::mahalanobis::PosPanels p{&cpu_pos_panel_gemm, &c, xc.data(), z.data(), guard.data(), positions,
                                           block};
  const int rc = static_cast<int>(distkern::mahalanobis::launch_positions_panels(
      static_cast<DType>(xt), x, sb, sp, sd, means, out, B, P, D, R, lower != 0, p, nullptr));
  *calls = c.calls;
  *flops = c.flops;
  return rc;
}

// distkern::mahalanobis::pos_panel_plan and use_pos_panels (automatic schedule), for the test to check them
extern "C" void emu_maha_pos_panel_plan(int64_t B, int64_t P, int64_t D, int64_t R, int lower, int64_t* plan) {
  const distkern::mahalanobis::PosPanelPlan pl = distkern::mahalanobis::pos_panel_plan(B, P, D, R, lower != 0);
  plan[0] = pl.positions;
  plan[1] = pl.block;
}
extern "C" int emu_maha_use_pos_panels(int xt, int ft, int64_t B, int64_t D, int64_t R, int schedule) {
  return distkern::mahalanobis::use_pos_panels(static_cast<DType>(xt), static_cast<DType>(ft), B, D, R,
                                               static_cast<distkern::mahalanobis::Schedule>(schedule));
}
