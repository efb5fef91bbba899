// Checks and preparation of nearest_cosine, shared by the CPU and CUDA implementations.
#include "mahalanobis/nearest.h"

#include "common/check.h"

namespace distkern {
namespace nearest {

Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& refs) {
  check_dim(op, "x", x, 2, "(N, D)");
  check_float(op, "x", x);
  check_dim(op, "refs", refs, 2, "(M, D)");
  check_float(op, "refs", refs);
  check_same_device(op, "refs", refs, "x", x);
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have D > 0 features; got shape ", shape_str(x));
  TORCH_CHECK_VALUE(refs.size(1) == x.size(1), op, ": refs must be (M, D) with D = ", x.size(1),
                    " to match x of shape ", shape_str(x), "; got shape ", shape_str(refs));
  TORCH_CHECK_VALUE(refs.size(0) > 0, op, ": refs must hold at least one reference (M > 0)");
  Inputs in;
  in.N = x.size(0);
  in.D = x.size(1);
  in.M = refs.size(0);
  in.acc = acc_type(x.scalar_type());
  const at::Tensor r = refs.to(in.acc);
  in.rhat = (r / at::linalg_vector_norm(r, 2, {1}, true, c10::nullopt).clamp_min(1e-12)).contiguous();
  in.inv_norm = at::linalg_vector_norm(x, 2, {1}, false, in.acc).clamp_min(1e-12).reciprocal().contiguous();
  return in;
}

}  // namespace nearest
}  // namespace distkern
