// C entry points of the emulated kernel_matmul kernels (tests/test_kernel_emulation.py, ctypes): the
// fused schedule, and the panel schedules (tiles, Gram) with plain CPU loops as the GEMMs around each panel.
#include "kernel_sum/kernel_sum_kernel.cu"  // rewritten by cu2cpp.py
#include "kernel_sum/kernel_sum_f16_kernel.cu"
#include "kernel_sum/kernel_sum_bf16_kernel.cu"

namespace {

distkern::kernel_sum::Params params_of(int kind, int ns, const double* p) {
  distkern::kernel_sum::Params kp;
  kp.kind = kind;
  kp.ns = ns;
  for (int i = 0; i < distkern::kernel_sum::kMaxParams; ++i) kp.p[i] = p[i];
  return kp;
}

struct CpuGemm {
  const float* v;
  float* out;
  int64_t C;
  int64_t calls;
  // Gram panels: x in float32 (contiguous), the centre, centred y
  const float* xf = nullptr;
  const float* center = nullptr;
  const float* yc = nullptr;
  int64_t D = 0;
  int64_t gram_calls = 0, norm_calls = 0;
};

// G[i, j] = (x[r0 + i] − center) · yc[j0 + j], and the rows' centred squared norms when asked, in double
int cpu_gram(void* ctx, float* G, int64_t ld, float* xx, int64_t r0, int64_t rows, int64_t j0, int64_t cols) {
  auto* g = static_cast<CpuGemm*>(ctx);
  ++g->gram_calls;
  if (xx != nullptr) ++g->norm_calls;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = g->xf + (r0 + i) * g->D;
    if (xx != nullptr) {
      double s = 0.0;
      for (int64_t k = 0; k < g->D; ++k) s += (double(xr[k]) - g->center[k]) * (double(xr[k]) - g->center[k]);
      xx[i] = static_cast<float>(s);
    }
    for (int64_t j = 0; j < cols; ++j) {
      const float* yr = g->yc + (j0 + j) * g->D;
      double s = 0.0;
      for (int64_t k = 0; k < g->D; ++k) s += (double(xr[k]) - g->center[k]) * yr[k];
      G[i * ld + j] = static_cast<float>(s);
    }
  }
  return 0;
}

// out[r0 + i, c] (+)= Σ_j K[i, j] v[j0 + j, c], in double (the panel is what is under test)
int cpu_gemm(void* ctx, const float* K, int64_t ld, int64_t r0, int64_t rows, int64_t j0, int64_t cols,
             bool accumulate) {
  auto* g = static_cast<CpuGemm*>(ctx);
  ++g->calls;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < g->C; ++c) {
      double s = accumulate ? g->out[(r0 + i) * g->C + c] : 0.0;
      for (int64_t j = 0; j < cols; ++j) s += double(K[i * ld + j]) * g->v[(j0 + j) * g->C + c];
      g->out[(r0 + i) * g->C + c] = static_cast<float>(s);
    }
  return 0;
}

}  // namespace

extern "C" int emu_kernel_matmul(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const float* center,
                                 const float* yc, const float* yy, const float* v, float* out, int64_t N, int64_t M,
                                 int64_t D, int64_t C, int kind, int ns, const double* p) {
  return distkern::kernel_sum::launch_kernel_matmul(static_cast<distkern::DType>(xt), x, sx0, sx1, center, yc, yy, v,
                                                    out, N, M, D, C, params_of(kind, ns, p),
                                                    static_cast<distkern::cuda::MatMode>(mode), nullptr, nullptr);
}

// The panel schedule with panels of at most rows × cols (leading dimension ld); *calls gets the
// number of GEMMs run.
extern "C" int emu_kernel_matmul_panels(int xt, int mode, const void* x, int64_t sx0, int64_t sx1,
                                        const float* center, const float* yc, const float* yy, const float* v,
                                        float* out, int64_t N, int64_t M, int64_t D, int64_t C, int kind, int ns,
                                        const double* p, int64_t rows, int64_t cols, int64_t ld, float* workspace,
                                        int64_t* calls) {
  CpuGemm g{v, out, C, 0};
  const distkern::kernel_sum::PanelGemm gemm{&cpu_gemm, &g, workspace, {rows, cols, ld}};
  const int rc = distkern::kernel_sum::launch_kernel_matmul(
      static_cast<distkern::DType>(xt), x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, params_of(kind, ns, p),
      static_cast<distkern::cuda::MatMode>(mode), &gemm, nullptr);
  *calls = g.calls;
  return rc;
}

// The Gram panel schedule: cpu_gram fills each panel with x·y, the φ kernel under test turns it into K,
// cpu_gemm multiplies by v; xf is x in float32, contiguous. *calls / *gram_calls / *norm_calls get the
// numbers of GEMMs by v, Gram GEMMs and row-norm fills.
extern "C" int emu_kernel_matmul_gram(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const float* xf,
                                      const float* center, const float* yc, const float* yy, const float* v,
                                      float* out, int64_t N, int64_t M, int64_t D, int64_t C, int kind, int ns,
                                      const double* p, int64_t rows, int64_t cols, int64_t ld, float* workspace,
                                      float* xx, int64_t* calls, int64_t* gram_calls, int64_t* norm_calls) {
  CpuGemm g{v, out, C, 0, xf, center, yc, D};
  distkern::kernel_sum::PanelGemm gemm{&cpu_gemm, &g, workspace, {rows, cols, ld, true}};
  gemm.gram = &cpu_gram;
  gemm.xx = xx;
  const int rc = distkern::kernel_sum::launch_kernel_matmul(
      static_cast<distkern::DType>(xt), x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, params_of(kind, ns, p),
      static_cast<distkern::cuda::MatMode>(mode), &gemm, nullptr);
  *calls = g.calls;
  *gram_calls = g.gram_calls;
  *norm_calls = g.norm_calls;
  return rc;
}
