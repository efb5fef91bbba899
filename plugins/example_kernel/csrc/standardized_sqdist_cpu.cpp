// standardized_sqdist on the CPU: rows in parallel (at::parallel_for), the same arithmetic as the
// CUDA kernel (standardized_sqdist_math.h), accumulation in float32 (float64 for float64 x).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "standardized_sqdist.h"
#include "standardized_sqdist_math.h"

namespace distkern_example_kernel {
namespace {

template <typename T, typename acc_t>
void rows_cpu(const T* x, int64_t sx0, int64_t sx1, const acc_t* mean, const acc_t* inv_std, acc_t* out,
              int64_t N, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* xr = x + n * sx0;
      acc_t acc = 0;
      for (int64_t d = 0; d < D; ++d) {
        acc += standardized_term<acc_t>(static_cast<acc_t>(xr[d * sx1]), mean[d], inv_std[d]);
      }
      out[n] = acc;
    }
  });
}

at::Tensor standardized_sqdist_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std) {
  const at::ScalarType acc = check_standardized_sqdist(x, mean, inv_std);
  const at::Tensor m = mean.contiguous(), s = inv_std.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "standardized_sqdist_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rows_cpu<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), m.const_data_ptr<acc_t>(),
                              s.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), x.size(0), x.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern_example_kernel, CPU, m) { m.impl("standardized_sqdist", &standardized_sqdist_cpu); }

}  // namespace distkern_example_kernel
