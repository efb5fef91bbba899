// Torch-side pieces shared by the CPU and CUDA entry points of standardized_sqdist.
#pragma once

#include <ATen/ATen.h>

#include "common/check.h"

namespace distkern_example_kernel {

constexpr const char* kOp = "distkern_example_kernel.standardized_sqdist";

// The argument checks (messages name the op, the argument, what was expected and what was given);
// returns the accumulation dtype: float64 for float64 x, else float32.
inline at::ScalarType check_standardized_sqdist(const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& inv_std) {
  distkern::check_float(kOp, "x", x);
  distkern::check_dim(kOp, "x", x, 2, "(N, D)");
  distkern::check_dim(kOp, "mean", mean, 1, "(D,)");
  distkern::check_dim(kOp, "inv_std", inv_std, 1, "(D,)");
  TORCH_CHECK_VALUE(mean.size(0) == x.size(1) && inv_std.size(0) == x.size(1), kOp,
                    ": mean and inv_std must have D = ", x.size(1), " entries (x is ", distkern::shape_str(x),
                    "); got ", distkern::shape_str(mean), " and ", distkern::shape_str(inv_std));
  const at::ScalarType acc = distkern::acc_type(x.scalar_type());
  TORCH_CHECK_TYPE(mean.scalar_type() == acc && inv_std.scalar_type() == acc, kOp,
                   ": mean and inv_std must be ", acc, " for x of dtype ", x.scalar_type(), "; got ",
                   mean.scalar_type(), " and ", inv_std.scalar_type());
  distkern::check_same_device(kOp, "mean", mean, "x", x);
  distkern::check_same_device(kOp, "inv_std", inv_std, "x", x);
  return acc;
}

}  // namespace distkern_example_kernel
