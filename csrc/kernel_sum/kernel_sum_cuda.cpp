// CUDA entry point of kernel_matmul: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

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
};

int panel_gemm(void* ctx, const float*, int64_t ld, int64_t r0, int64_t rows, int64_t j0, int64_t cols,
               bool accumulate) {
  auto* c = static_cast<PanelGemmCtx*>(ctx);
  std::optional<at::NoTF32Guard> fp32;
  if (c->mode != cuda::MatMode::Tf32) fp32.emplace();
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

at::Tensor kernel_matmul_cuda(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& v,
                              int64_t kind, at::ArrayRef<double> params) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.kernel_matmul", "x", x));
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "distkern.kernel_matmul: float64 inputs are not supported on "
                   "CUDA yet (the kernel accumulates in float32); use float32 or compute on the CPU");
  Inputs in = prepare("distkern.kernel_matmul", x, y, v, kind, params);
  at::Tensor out = at::zeros({in.N, in.C}, x.options().dtype(at::kFloat));
  if (in.N > 0 && in.M > 0) {
    // Many columns of v (permutation tests, the backward's C·D columns): K in bounded panels, each
    // followed by a cuBLAS GEMM, instead of re-forming every x·y tile once per 64 columns.
    const PanelPlan plan = kernel_panel_plan(in.N, in.M, in.C);
    const cuda::MatMode mode = matmul_mode_for(x);
    PanelGemmCtx ctx;
    PanelGemm gemm{&panel_gemm, &ctx, nullptr, plan};
    if (plan.rows > 0 && in.v.defined()) {
      ctx = {out, in.v, at::empty({plan.rows * plan.ld}, x.options().dtype(at::kFloat)), mode};
      gemm.workspace = ctx.workspace.data_ptr<float>();
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

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("kernel_matmul", &kernel_matmul_cuda); }

}  // namespace kernel_sum
}  // namespace distkern
