// Input checks and preparation shared by the CPU and CUDA implementations.
#include "mahalanobis/mahalanobis.h"

#include "common/check.h"

namespace distkern {
namespace mahalanobis {

Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& mean,
               const at::Tensor& factor, bool lower) {
  check_dim(op, "x", x, 2, "(N, D)");
  check_float(op, "x", x);
  check_dim(op, "mean", mean, 1, "(D,)");
  check_float(op, "mean", mean);
  check_dim(op, "factor", factor, 2, lower ? "(D, D)" : "(D, R)");
  check_float(op, "factor", factor);
  check_same_device(op, "mean", mean, "x", x);
  check_same_device(op, "factor", factor, "x", x);
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK_VALUE(D > 0, op, ": x must have at least one feature (D > 0); got shape ",
                    shape_str(x));
  TORCH_CHECK_VALUE(mean.size(0) == D, op, ": mean must have D = ", D,
                    " entries to match x of shape ", shape_str(x), "; got shape ",
                    shape_str(mean));
  TORCH_CHECK_VALUE(factor.size(0) == D, op, ": factor must have D = ", D,
                    " rows to match x of shape ", shape_str(x), "; got shape ",
                    shape_str(factor));
  const int64_t R = factor.size(1);
  TORCH_CHECK_VALUE(R > 0, op, ": factor must have at least one column; got shape ",
                    shape_str(factor));
  if (lower) {
    TORCH_CHECK_VALUE(R == D, op,
                      ": with lower=True the factor must be a square lower-triangular (D, D) "
                      "matrix with D = ", D, "; got shape ", shape_str(factor),
                      " (pass lower=False for a general (D, R) whitening matrix)");
  }
  Inputs in;
  in.N = N;
  in.D = D;
  in.R = R;
  in.acc = acc_type(x.scalar_type());
  in.mean = mean.to(in.acc).contiguous();
  in.factor = factor.to(in.acc).contiguous();
  if (lower) {
    if (factor.device().is_cpu()) {
      // Cheap on the CPU (D² reads, no device sync): a full matrix passed as a triangular factor
      // would otherwise give a silently wrong distance.
      bool upper_zero = true;
      AT_DISPATCH_FLOATING_TYPES(in.factor.scalar_type(), "mahalanobis_check_lower", [&] {
        const scalar_t* w = in.factor.data_ptr<scalar_t>();
        for (int64_t i = 0; i < D && upper_zero; ++i)
          for (int64_t j = i + 1; j < D; ++j)
            if (w[i * D + j] != scalar_t(0)) { upper_zero = false; break; }
      });
      TORCH_CHECK_VALUE(upper_zero, op,
                        ": factor must be lower-triangular when lower=True (Σ⁻¹ = L Lᵀ), but "
                        "its strict upper triangle has non-zero entries; pass lower=False to "
                        "use it as a general whitening matrix");
    } else {
      // On a GPU the check would cost a host sync: the strict upper triangle is ignored instead.
      in.factor = in.factor.tril();
    }
  }
  return in;
}

at::Tensor prepare_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                        const Inputs& in) {
  check_dim(op, "grad", grad, 1, "(N,)");
  check_float(op, "grad", grad);
  check_same_device(op, "grad", grad, "x", x);
  TORCH_CHECK_VALUE(grad.size(0) == in.N, op, ": grad must have N = ", in.N,
                    " entries; got shape ", shape_str(grad));
  return grad.to(in.acc).contiguous();
}

}  // namespace mahalanobis
}  // namespace distkern
