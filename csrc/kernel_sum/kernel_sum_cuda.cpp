// CUDA entry point of kernel_matmul: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>

#include "common/check.h"
#include "common/matmul_mode_cuda.h"
#include "kernel_sum/kernel_sum.h"
#include "kernel_sum/kernel_sum_launch.h"

namespace distkern {
namespace kernel_sum {
namespace {

// The GEMM after each K panel (see kernel_panel_plan): cuBLAS through ATen, on the current stream. In
// TF32 only when distkern's mode for the op is TF32 (and torch allows it): in the fp32-accurate modes
// (FMA, 3xTF32) torch's allow_tf32 must not round the 2C flops of every pair.
struct PanelGemmCtx {
  at::Tensor out, v, workspace;
  cuda::MatMode mode;
  at::Tensor x, center, yc, xx;  // Gram panels only
  at::Tensor xc;                  // the current row panel's x − center, float32
};

std::atomic<int> g_schedule{static_cast<int>(Schedule::Auto)};

int panel_gemm(void* ctx, const float*, int64_t ld, int64_t r0, int64_t rows, int64_t j0, int64_t cols,
               bool accumulate) {
  auto* c = static_cast<PanelGemmCtx*>(ctx);
  const CublasPrecisionGuard precision(c->mode);
  const at::Tensor K = c->workspace.as_strided({rows, cols}, {ld, 1});
  at::Tensor o = c->out.narrow(0, r0, rows);
  const at::Tensor vv = c->v.narrow(0, j0, cols);
  if (accumulate) {
    o.addmm_(K, vv);
  } else {
    at::mm_out(o, K, vv);
  }
  return 0;
}

// Gram panel (see kernel_panel_plan): G = (x[r0:] − center)·yc[j0:]ᵀ by cuBLAS into the workspace, in
// TF32 only when distkern's mode for the op is TF32 (as panel_gemm). A row panel's first column panel
// (xx given) centres its rows, kept for the panels after it, and writes their squared norms.
int panel_gram(void* ctx, float*, int64_t ld, float* xx, int64_t r0, int64_t rows, int64_t j0, int64_t cols) {
  auto* c = static_cast<PanelGemmCtx*>(ctx);
  const CublasPrecisionGuard precision(c->mode);
  if (xx != nullptr) {
    c->xc = c->x.narrow(0, r0, rows).to(at::kFloat) - c->center;  // never in place: x may be float32
    c->xx.narrow(0, 0, rows).copy_(c->xc.square().sum(1));
  }
  at::Tensor G = c->workspace.as_strided({rows, cols}, {ld, 1});
  at::mm_out(G, c->xc, c->yc.narrow(0, j0, cols).t());
  return 0;
}

at::Tensor kernel_matmul_cuda(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& v,
                              int64_t kind, at::ArrayRef<double> params) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.kernel_matmul", "x", x));
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "distkern.kernel_matmul: float64 inputs are not supported on "
                   "CUDA yet (the kernel accumulates in float32); use float32 or compute on the CPU");
  Inputs in = prepare("distkern.kernel_matmul", x, y, v, kind, params);
  at::Tensor out = at::zeros({in.N, in.C}, x.options().dtype(at::kFloat));
  if (in.N > 0 && in.M > 0) {
    // Many columns of v (permutation tests, the backward's C·D columns): K in bounded panels, each
    // followed by a cuBLAS GEMM, instead of re-forming every x·y tile once per 64 columns. Large D: the
    // x·y products of each panel by cuBLAS too (Gram panels).
    const bool gram = use_gram(in.D, static_cast<Schedule>(g_schedule.load(std::memory_order_relaxed)));
    const PanelPlan plan = kernel_panel_plan(in.N, in.M, in.C, gram);
    const cuda::MatMode mode = matmul_mode_for(x);
    PanelGemmCtx ctx;
    PanelGemm gemm{&panel_gemm, &ctx, nullptr, plan};
    if (plan.rows > 0) {
      const at::TensorOptions f32 = x.options().dtype(at::kFloat);
      ctx.out = out;
      ctx.v = in.v.defined() ? in.v : at::ones({in.M, 1}, f32);  // v = None: row sums, as a GEMV
      ctx.workspace = at::empty({plan.rows * plan.ld}, f32);
      ctx.mode = mode;
      gemm.workspace = ctx.workspace.data_ptr<float>();
      if (plan.gram) {
        ctx.x = x;
        ctx.center = in.center;
        ctx.yc = in.yc;
        ctx.xx = at::empty({plan.rows}, f32);
        gemm.gram = &panel_gram;
        gemm.xx = ctx.xx.data_ptr<float>();
      }
    }
    C10_CUDA_CHECK(launch_kernel_matmul(to_dtype(x.scalar_type()), x.data_ptr(), x.stride(0), x.stride(1),
                                        in.center.data_ptr<float>(), in.yc.data_ptr<float>(),
                                        in.yy.data_ptr<float>(), in.v.defined() ? in.v.data_ptr<float>() : nullptr,
                                        out.data_ptr<float>(), in.N, in.M, in.D, in.C, in.kp, mode,
                                        gemm.workspace ? &gemm : nullptr, at::cuda::getCurrentCUDAStream()));
  }
  return in.v.defined() ? out : out.squeeze(1);
}

}  // namespace

void set_schedule(int64_t schedule) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 2, "set_kernel_sum_schedule: 0 (auto), 1 (tiles) or 2 (Gram "
                    "panels); got ", schedule);
  g_schedule.store(static_cast<int>(schedule));
}

int64_t schedule() { return g_schedule.load(); }

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("kernel_matmul", &kernel_matmul_cuda); }

}  // namespace kernel_sum
}  // namespace distkern
