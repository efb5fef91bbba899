// CUDA entry points of the Mahalanobis op: checks, device guard, stream, dtype → launcher.
// Built only when distkern is built with CUDA (setup.py); the kernels live in the pure-CUDA
// mahalanobis_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>

#include "common/check.h"
#include "common/matmul_mode_cuda.h"

#include "common/macros.h"
#include "mahalanobis/mahalanobis.h"
#include "mahalanobis/mahalanobis_launch.h"

namespace distkern {
namespace mahalanobis {
namespace {

constexpr const char* kFwd = "distkern.mahalanobis";
constexpr const char* kBwd = "distkern.mahalanobis_backward";

std::atomic<int> g_schedule{static_cast<int>(Schedule::Auto)};

// The Gram panels' GEMMs (FwdPanels): cuBLAS through ATen on the current stream, TF32 only when distkern's
// mode for the op is TF32 (and torch allows it), as kernel_matmul's and nearest_cosine's panels.
struct PanelCtx {
  at::Tensor xc, z, factor;  // rows × D, rows × R, D × R, float32
  int64_t D;
  cuda::MatMode mode;
};

int panel_gemm(void* ctx, int64_t rows, int64_t k0, int64_t c0, int64_t cols) {
  auto* c = static_cast<PanelCtx*>(ctx);
  const CublasPrecisionGuard precision(c->mode);
  at::Tensor Z = c->z.narrow(0, 0, rows).narrow(1, c0, cols);
  at::mm_out(Z, c->xc.narrow(0, 0, rows).narrow(1, k0, c->D - k0), c->factor.narrow(0, k0, c->D - k0).narrow(1, c0, cols));
  return 0;
}

// The per-position panels' GEMMs (PosPanels): one batched product a column block, a position a batch entry, on
// views of the buffers and of the factors in place (cuBLAS's strided-batched GEMM takes them as they are).
struct PosPanelCtx {
  at::Tensor xc, z, factors;  // positions × B × D, positions × B × R, P × D × R, float32
  int64_t D;
  cuda::MatMode mode;
};

int pos_panel_gemm(void* ctx, int64_t p0, int64_t n, int64_t k0, int64_t c0, int64_t cols) {
  auto* c = static_cast<PosPanelCtx*>(ctx);
  const CublasPrecisionGuard precision(c->mode);
  at::Tensor Z = c->z.narrow(0, 0, n).narrow(2, c0, cols);
  at::bmm_out(Z, c->xc.narrow(0, 0, n).narrow(2, k0, c->D - k0),
              c->factors.narrow(0, p0, n).narrow(1, k0, c->D - k0).narrow(2, c0, cols));
  return 0;
}

// out = ‖Wᵀ(x − mean)‖² (mean, factor: the accumulation type, contiguous; out: N values of it), by the tile
// kernel or, at large D with float32 accumulation, by cuBLAS in bounded panels (FwdPanels,
// mahalanobis_launch.h). The single-Gaussian op and the tied K-Gaussian ops' ‖z‖² term.
void forward_into(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& factor, bool lower, at::Tensor& out,
                  cuda::MatMode mode) {
  const int64_t N = x.size(0), D = x.size(1), R = factor.size(1);
  const DType xt = to_dtype(x.scalar_type());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (use_panels(xt, N, D, R, static_cast<Schedule>(g_schedule.load(std::memory_order_relaxed)))) {
    const PanelPlan plan = panel_plan(N, D, R, lower);
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    PanelCtx ctx{at::empty({plan.rows, D}, f32), at::empty({plan.rows, R}, f32), factor, D, mode};
    at::Tensor guard = at::empty({plan.rows}, f32);
    const FwdPanels p{&panel_gemm, &ctx, ctx.xc.data_ptr<float>(), ctx.z.data_ptr<float>(), guard.data_ptr<float>(),
                      plan.rows, plan.block};
    C10_CUDA_CHECK(launch_forward_panels(xt, x.data_ptr(), x.stride(0), x.stride(1), mean.data_ptr<float>(),
                                         out.data_ptr<float>(), N, D, R, lower, p, stream));
    return;
  }
  C10_CUDA_CHECK(launch_forward(xt, x.data_ptr(), x.stride(0), x.stride(1), mean.data_ptr(), factor.data_ptr(),
                                out.data_ptr(), N, D, R, lower, mode, stream));
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& factor,
                        bool lower) {
  const c10::cuda::CUDAGuard guard(cuda_device_of(kFwd, "x", x));
  Inputs in = prepare(kFwd, x, mean, factor, lower);
  at::Tensor out = at::empty({in.N}, x.options().dtype(in.acc));
  if (in.N > 0) forward_into(x, in.mean, in.factor, lower, out, matmul_mode_for(x));
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& mean, const at::Tensor& factor,
                                                 bool lower) {
  const c10::cuda::CUDAGuard guard(cuda_device_of(kBwd, "x", x));
  Inputs in = prepare(kBwd, x, mean, factor, lower);
  at::Tensor g = prepare_grad(kBwd, grad, x, in);
  at::Tensor gx = at::empty({in.N, in.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (in.N == 0) return {gx, at::zeros({in.D}, in.mean.options())};
  const int64_t blocks = (in.N + kRowsPerBlock - 1) / kRowsPerBlock;
  at::Tensor z = at::empty({in.N, in.R}, in.mean.options());
  at::Tensor partial = at::empty({blocks, in.D}, in.mean.options());
  C10_CUDA_CHECK(launch_backward(to_dtype(x.scalar_type()), x.data_ptr(), x.stride(0),
                                 x.stride(1), g.data_ptr(), in.mean.data_ptr(),
                                 in.factor.data_ptr(), z.data_ptr(), gx.data_ptr(),
                                 partial.data_ptr(), in.N, in.D, in.R, lower,
                                 matmul_mode_for(x), at::cuda::getCurrentCUDAStream()));
  return {gx, partial.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> k_cuda(const char* name, const at::Tensor& x,
                                          const at::Tensor& means, const at::Tensor& factors,
                                          bool lower, const c10::optional<at::Tensor>& bias,
                                          KReduce red) {
  const c10::cuda::CUDAGuard guard(cuda_device_of(name, "x", x));
  KInputs in = prepare_k(name, x, means, factors, lower, bias);
  at::Tensor out = red == KReduce::None ? at::empty({in.N, in.K}, x.options().dtype(in.acc))
                                        : at::empty({in.N}, x.options().dtype(in.acc));
  at::Tensor idx = at::empty({red == KReduce::Min ? in.N : 0}, x.options().dtype(at::kLong));
  if (in.N == 0) return {out, idx};
  const DType xt = to_dtype(x.scalar_type());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const void* bp = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  int64_t* ip = red == KReduce::Min ? idx.data_ptr<int64_t>() : nullptr;
  if (in.shared) {
    // ‖Wᵀ(x − center)‖² by the single-Gaussian forward (tile kernel or Gram panels), then the cross term and
    // the reduction.
    at::Tensor zz = at::empty({in.N}, in.means.options());
    forward_into(x, in.center, in.factors, lower, zz, matmul_mode_for(x));
    C10_CUDA_CHECK(launch_k_shared(xt, x.data_ptr(), x.stride(0), x.stride(1), in.center.data_ptr(),
                                   in.bmat.data_ptr(), zz.data_ptr(), in.vv.data_ptr(), bp,
                                   out.data_ptr(), ip, in.N, in.D, in.K, red, matmul_mode_for(x), stream));
  } else {
    C10_CUDA_CHECK(launch_k_components(xt, x.data_ptr(), x.stride(0), x.stride(1),
                                       in.means.data_ptr(), in.factors.data_ptr(), bp,
                                       out.data_ptr(), ip, in.N, in.D, in.R, in.K, lower, red, matmul_mode_for(x),
                                       stream));
  }
  return {out, idx};
}

at::Tensor k_none_cuda(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors, bool lower) {
  return std::get<0>(k_cuda("distkern.mahalanobis_k", x, means, factors, lower, c10::nullopt, KReduce::None));
}

std::tuple<at::Tensor, at::Tensor> k_min_cuda(const at::Tensor& x, const at::Tensor& means,
                                              const at::Tensor& factors, bool lower) {
  return k_cuda("distkern.mahalanobis_k_min", x, means, factors, lower, c10::nullopt, KReduce::Min);
}

at::Tensor k_lse_cuda(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors,
                      const at::Tensor& bias, bool lower) {
  return std::get<0>(k_cuda("distkern.mahalanobis_k_logsumexp", x, means, factors, lower, bias, KReduce::LogSumExp));
}

at::Tensor pos_cuda(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors, bool lower) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.mahalanobis_pos", "x", x));
  PosInputs in = prepare_pos("distkern.mahalanobis_pos", x, means, factors, lower);
  at::Tensor out = at::empty({in.B, in.P}, x.options().dtype(in.acc));
  if (in.B == 0) return out;
  const DType xt = to_dtype(x.scalar_type()), ft = to_dtype(factors.scalar_type());
  if (use_pos_panels(xt, ft, in.B, in.D, in.R, static_cast<Schedule>(g_schedule.load(std::memory_order_relaxed)))) {
    const PosPanelPlan plan = pos_panel_plan(in.B, in.P, in.D, in.R, lower);
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    PosPanelCtx ctx{at::empty({plan.positions, in.B, in.D}, f32), at::empty({plan.positions, in.B, in.R}, f32),
                    factors, in.D, matmul_mode_for(x)};
    at::Tensor guard = at::empty({plan.positions, in.B}, f32);
    const PosPanels p{&pos_panel_gemm, &ctx, ctx.xc.data_ptr<float>(), ctx.z.data_ptr<float>(),
                      guard.data_ptr<float>(), plan.positions, plan.block};
    C10_CUDA_CHECK(launch_positions_panels(xt, x.data_ptr(), x.stride(0), x.stride(1), x.stride(2),
                                           in.means.data_ptr<float>(), out.data_ptr<float>(), in.B, in.P, in.D, in.R,
                                           lower, p, at::cuda::getCurrentCUDAStream()));
    return out;
  }
  C10_CUDA_CHECK(launch_positions(to_dtype(x.scalar_type()), to_dtype(factors.scalar_type()), x.data_ptr(),
                                  x.stride(0), x.stride(1), x.stride(2), in.means.data_ptr(),
                                  factors.data_ptr(), out.data_ptr(), in.B, in.P, in.D, in.R, lower,
                                  matmul_mode_for(x), at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

void set_schedule(int64_t schedule) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 2, "set_mahalanobis_schedule: 0 (auto), 1 (tile kernel) or 2 (Gram "
                    "panels); got ", schedule);
  g_schedule.store(static_cast<int>(schedule));
}

int64_t schedule() { return g_schedule.load(); }

TORCH_LIBRARY_IMPL(distkern, CUDA, m) {
  m.impl("mahalanobis_pos", &pos_cuda);
  m.impl("mahalanobis", &forward_cuda);
  m.impl("mahalanobis_backward", &backward_cuda);
  m.impl("mahalanobis_k", &k_none_cuda);
  m.impl("mahalanobis_k_min", &k_min_cuda);
  m.impl("mahalanobis_k_logsumexp", &k_lse_cuda);
}

}  // namespace mahalanobis
}  // namespace distkern
