// C entry points of the emulated nearest-reference kernels (tests/test_kernel_emulation.py, ctypes): the fused
// tile kernel, and the Gram panel schedule with a plain CPU loop as the GEMM of each panel.
#include <cmath>
#include <vector>

#include "mahalanobis/nearest_kernel.cu"  // rewritten by cu2cpp.py

extern "C" int emu_nearest(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* rhat,
                           const void* inv_norm, void* out, int64_t* idx, int64_t N, int64_t D, int64_t M) {
  return distkern::nearest::launch_nearest(static_cast<distkern::DType>(xt), x, sx0, sx1, rhat, inv_norm, out, idx, N,
                                           D, M, static_cast<distkern::cuda::MatMode>(mode), nullptr, nullptr);
}

namespace {

template <typename acc_t>
struct CpuGram {
  const acc_t* x;     // (N, D) in the accumulation type, contiguous
  const acc_t* rhat;  // (M, D)
  int64_t D;
  int64_t calls = 0, guard_calls = 0;
};

// G[i, j] = x[r0 + i] · rhat[j0 + j] summed in double, and the rows' guards when asked
template <typename acc_t>
int cpu_gram(void* ctx, void* Gv, int64_t ld, void* guardv, int64_t r0, int64_t rows, int64_t j0, int64_t cols) {
  auto* g = static_cast<CpuGram<acc_t>*>(ctx);
  auto* G = static_cast<acc_t*>(Gv);
  ++g->calls;
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* xr = g->x + (r0 + i) * g->D;
    if (guardv != nullptr) {
      acc_t s = 0;
      for (int64_t k = 0; k < g->D; ++k) s += xr[k] - xr[k];
      static_cast<acc_t*>(guardv)[i] = s;
    }
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t* rr = g->rhat + (j0 + j) * g->D;
      double s = 0.0;
      for (int64_t k = 0; k < g->D; ++k) s += double(xr[k]) * double(rr[k]);
      G[i * ld + j] = static_cast<acc_t>(s);
    }
  }
  if (guardv != nullptr) ++g->guard_calls;
  return 0;
}

template <typename acc_t>
int gram_typed(int xt, const acc_t* x, const acc_t* rhat, const acc_t* inv_norm, acc_t* out, int64_t* idx, int64_t N,
               int64_t D, int64_t M, int64_t max_rows, int64_t max_cols, int64_t* calls, int64_t* guard_calls,
               int64_t* plan) {
  using namespace distkern::nearest;
  CpuGram<acc_t> g{x, rhat, D};
  const GramPlan pl = gram_plan(N, M, max_rows, max_cols);
  // odd offsets would misalign the 16-byte groups: the workspace starts aligned, as ATen's allocations
  std::vector<acc_t> ws(static_cast<size_t>(pl.rows * pl.ld) + 4, acc_t(NAN)), guard(pl.rows, acc_t(NAN));
  GramPanels gp{&cpu_gram<acc_t>, &g, ws.data(), guard.data(), pl};
  const int rc = static_cast<int>(launch_nearest(static_cast<distkern::DType>(xt), x, D, 1, rhat, inv_norm, out, idx,
                                                 N, D, M, distkern::cuda::MatMode::Fma, &gp, nullptr));
  *calls = g.calls;
  *guard_calls = g.guard_calls;
  plan[0] = pl.rows;
  plan[1] = pl.cols;
  plan[2] = pl.ld;
  return rc;
}

}  // namespace

// The Gram schedule with panels of at most max_rows × max_cols; x (float32 or float64 as xt = 0 / 3) is
// contiguous in the accumulation type. *calls / *guard_calls get the numbers of panel GEMMs and guard fills,
// plan[0..2] the panel rows, columns and leading dimension.
extern "C" int emu_nearest_gram(int xt, const void* x, const void* rhat, const void* inv_norm, void* out, int64_t* idx,
                                int64_t N, int64_t D, int64_t M, int64_t max_rows, int64_t max_cols, int64_t* calls,
                                int64_t* guard_calls, int64_t* plan) {
  if (xt == static_cast<int>(distkern::DType::F64))
    return gram_typed<double>(xt, static_cast<const double*>(x), static_cast<const double*>(rhat),
                              static_cast<const double*>(inv_norm), static_cast<double*>(out), idx, N, D, M, max_rows,
                              max_cols, calls, guard_calls, plan);
  return gram_typed<float>(xt, static_cast<const float*>(x), static_cast<const float*>(rhat),
                           static_cast<const float*>(inv_norm), static_cast<float*>(out), idx, N, D, M, max_rows,
                           max_cols, calls, guard_calls, plan);
}
