// CUDA entry point of kernel_matmul: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/check.h"
#include "common/matmul_mode_cuda.h"
#include "kernel_sum/kernel_sum.h"
#include "kernel_sum/kernel_sum_launch.h"

namespace distkern {
namespace kernel_sum {
namespace {

at::Tensor kernel_matmul_cuda(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& v,
                              int64_t kind, at::ArrayRef<double> params) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.kernel_matmul", "x", x));
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "distkern.kernel_matmul: float64 inputs are not supported on "
                   "CUDA yet (the kernel accumulates in float32); use float32 or compute on the CPU");
  Inputs in = prepare("distkern.kernel_matmul", x, y, v, kind, params);
  at::Tensor out = at::zeros({in.N, in.C}, x.options().dtype(at::kFloat));
  if (in.N > 0 && in.M > 0) {
    C10_CUDA_CHECK(launch_kernel_matmul(to_dtype(x.scalar_type()), x.data_ptr(), x.stride(0), x.stride(1),
                                        in.center.data_ptr<float>(), in.yc.data_ptr<float>(),
                                        in.yy.data_ptr<float>(), in.v.defined() ? in.v.data_ptr<float>() : nullptr,
                                        out.data_ptr<float>(), in.N, in.M, in.D, in.C, in.kp,
                                        matmul_mode_for(x), at::cuda::getCurrentCUDAStream()));
  }
  return in.v.defined() ? out : out.squeeze(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("kernel_matmul", &kernel_matmul_cuda); }

}  // namespace kernel_sum
}  // namespace distkern
