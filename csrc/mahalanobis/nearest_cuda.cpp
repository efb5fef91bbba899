// CUDA entry point of nearest_cosine: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>

#include "common/check.h"
#include "common/matmul_mode_cuda.h"
#include "mahalanobis/nearest.h"
#include "mahalanobis/nearest_launch.h"

namespace distkern {
namespace nearest {
namespace {

std::atomic<int> g_schedule{static_cast<int>(Schedule::Auto)};

// The Gram schedule's GEMM (see GramPanels): cuBLAS through ATen on the current stream, in the accumulation
// type; TF32 only when distkern's mode for the op is TF32 (and torch allows it), as kernel_matmul's panels.
struct GramCtx {
  at::Tensor x, rhat, workspace, guard;
  at::Tensor xp;  // the current row panel of x in the accumulation type
  at::ScalarType acc;
  cuda::MatMode mode;
};

int gram_panel(void* ctx, void*, int64_t ld, void* guard, int64_t r0, int64_t rows, int64_t j0, int64_t cols) {
  auto* c = static_cast<GramCtx*>(ctx);
  const CublasPrecisionGuard precision(c->mode);
  if (guard != nullptr) {
    c->xp = c->x.narrow(0, r0, rows).to(c->acc);
    c->guard.narrow(0, 0, rows).copy_((c->xp - c->xp).sum(1));  // 0, or NaN for a non-finite row
  }
  at::Tensor G = c->workspace.as_strided({rows, cols}, {ld, 1});
  at::mm_out(G, c->xp, c->rhat.narrow(0, j0, cols).t());
  return 0;
}

std::tuple<at::Tensor, at::Tensor> nearest_cuda(const at::Tensor& x, const at::Tensor& refs) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.nearest_cosine", "x", x));
  Inputs in = prepare("distkern.nearest_cosine", x, refs);
  at::Tensor out = at::empty({in.N}, x.options().dtype(in.acc));
  at::Tensor idx = at::empty({in.N}, x.options().dtype(at::kLong));
  if (in.N == 0) return {out, idx};
  const cuda::MatMode mode = matmul_mode_for(x);
  // Large D: the products by cuBLAS in bounded panels (Gram panels, nearest_launch.h)
  GramCtx ctx;
  GramPanels gp{&gram_panel, &ctx, nullptr, nullptr, {0, 0, 0}};
  const bool gram = use_gram(in.N, in.M, in.D, static_cast<Schedule>(g_schedule.load(std::memory_order_relaxed)));
  if (gram) {
    gp.plan = gram_plan(in.N, in.M);
    const at::TensorOptions acc = x.options().dtype(in.acc);
    ctx = GramCtx{x, in.rhat, at::empty({gp.plan.rows * gp.plan.ld}, acc), at::empty({gp.plan.rows}, acc),
                  at::Tensor(), in.acc, mode};
    gp.workspace = ctx.workspace.data_ptr();
    gp.guard = ctx.guard.data_ptr();
  }
  C10_CUDA_CHECK(launch_nearest(to_dtype(x.scalar_type()), x.data_ptr(), x.stride(0), x.stride(1),
                                in.rhat.data_ptr(), in.inv_norm.data_ptr(), out.data_ptr(),
                                idx.data_ptr<int64_t>(), in.N, in.D, in.M, mode, gram ? &gp : nullptr,
                                at::cuda::getCurrentCUDAStream()));
  return {out, idx};
}

}  // namespace

void set_schedule(int64_t schedule) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 2, "set_nearest_schedule: 0 (auto), 1 (tile kernel) or 2 (Gram "
                    "panels); got ", schedule);
  g_schedule.store(static_cast<int>(schedule));
}

int64_t schedule() { return g_schedule.load(); }

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("nearest_cosine", &nearest_cuda); }

}  // namespace nearest
}  // namespace distkern
