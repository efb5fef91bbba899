// CUDA entry point of nearest_cosine: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/check.h"
#include "common/matmul_mode_cuda.h"
#include "mahalanobis/nearest.h"
#include "mahalanobis/nearest_launch.h"

namespace distkern {
namespace nearest {
namespace {

std::tuple<at::Tensor, at::Tensor> nearest_cuda(const at::Tensor& x, const at::Tensor& refs) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.nearest_cosine", "x", x));
  Inputs in = prepare("distkern.nearest_cosine", x, refs);
  at::Tensor out = at::empty({in.N}, x.options().dtype(in.acc));
  at::Tensor idx = at::empty({in.N}, x.options().dtype(at::kLong));
  if (in.N == 0) return {out, idx};
  C10_CUDA_CHECK(launch_nearest(to_dtype(x.scalar_type()), x.data_ptr(), x.stride(0), x.stride(1),
                                in.rhat.data_ptr(), in.inv_norm.data_ptr(), out.data_ptr(),
                                idx.data_ptr<int64_t>(), in.N, in.D, in.M,
                                matmul_mode_for(x), at::cuda::getCurrentCUDAStream()));
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("nearest_cosine", &nearest_cuda); }

}  // namespace nearest
}  // namespace distkern
