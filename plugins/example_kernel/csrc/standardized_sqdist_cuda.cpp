// CUDA entry point of standardized_sqdist: checks, device guard, stream, dtype -> the pure-CUDA
// launcher. Built only with CUDA (distkern.cpp_extension leaves *_cuda.cpp out of a CPU build).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/check.h"
#include "standardized_sqdist.h"
#include "standardized_sqdist_launch.h"

namespace distkern_example_kernel {
namespace {

at::Tensor standardized_sqdist_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std) {
  const c10::cuda::CUDAGuard guard(distkern::cuda_device_of(kOp, "x", x));
  const at::ScalarType acc = check_standardized_sqdist(x, mean, inv_std);
  const at::Tensor m = mean.contiguous(), s = inv_std.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(acc));
  C10_CUDA_CHECK(launch_standardized_sqdist(distkern::to_dtype(x.scalar_type()), x.const_data_ptr(), x.stride(0),
                                            x.stride(1), m.const_data_ptr(), s.const_data_ptr(),
                                            out.mutable_data_ptr(), x.size(0), x.size(1),
                                            c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern_example_kernel, CUDA, m) { m.impl("standardized_sqdist", &standardized_sqdist_cuda); }

}  // namespace distkern_example_kernel
