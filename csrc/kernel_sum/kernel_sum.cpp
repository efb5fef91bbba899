// Checks and preparation of kernel_matmul, shared by the CPU and CUDA implementations.
#include <algorithm>
#include <limits>

#include "kernel_sum/kernel_sum.h"

#include <cmath>

#include "common/check.h"

namespace distkern {
namespace kernel_sum {

namespace {

const char* kind_name(int64_t k) {
  static const char* names[] = {"gaussian", "laplacian", "imq", "polynomial", "distance",
                                "gaussian'", "laplacian'", "imq'", "polynomial'", "distance'"};
  return (k >= 0 && k < kNumKinds) ? names[k] : "?";
}

}  // namespace

// A kernel id and its parameters as the kernels take them (kernel_math.h), checked, computed in double.
Params make_params(const char* op, int64_t kind, at::ArrayRef<double> params, at::ScalarType acc) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, op, ": unknown kernel id ", kind);
  Params kp;
  kp.kind = static_cast<int>(kind);
  kp.ns = 0;
  const bool bandwidths = kind == kGaussian || kind == kLaplacian || kind == kIMQ ||
                          kind == kGaussianD || kind == kLaplacianD || kind == kIMQD;
  if (bandwidths) {
    TORCH_CHECK_VALUE(!params.empty() && static_cast<int>(params.size()) <= kMaxParams, op, ": the ",
                      kind_name(kind), " kernel takes 1 to ", kMaxParams, " bandwidths; got ",
                      params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const double s = params[i];
      TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op, ": bandwidths must be finite and > 0; got ",
                        s, " at index ", i);
      const bool gauss = kind == kGaussian || kind == kGaussianD;
      const bool lap = kind == kLaplacian || kind == kLaplacianD;
      // A tiny σ makes the coefficient overflow the accumulation type (1/(2σ²) > 3.4e38 in float32 from
      // σ < 1.3e-19): inf·0 would be NaN at r = 0. The largest finite value keeps k(x, x) = 1 and every
      // other pair at 0, the kernel's limit.
      const double cap = acc == at::kDouble ? std::numeric_limits<double>::max()
                                               : static_cast<double>(std::numeric_limits<float>::max());
      kp.p[i] = std::min(cap, gauss ? 0.5 / s / s : lap ? 1.0 / s : 1.0 / s / s);
    }
    kp.ns = static_cast<int>(params.size());
  } else if (kind == kPolynomial || kind == kPolynomialD) {
    TORCH_CHECK_VALUE(params.size() == 3, op, ": the polynomial kernel takes (gamma, coef0, degree); got ",
                      params.size(), " values");
    for (int i = 0; i < 3; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(params[i]), op, ": polynomial parameters must be finite");
      kp.p[i] = params[i];
    }
    TORCH_CHECK_VALUE(params[2] >= 1, op, ": polynomial degree must be >= 1; got ", params[2]);
  } else {
    TORCH_CHECK_VALUE(params.empty(), op, ": the distance kernel takes no parameters; got ", params.size());
  }
  return kp;
}

Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& y,
               const c10::optional<at::Tensor>& v, int64_t kind, at::ArrayRef<double> params) {
  check_dim(op, "x", x, 2, "(N, D)");
  check_float(op, "x", x);
  check_dim(op, "y", y, 2, "(M, D)");
  check_float(op, "y", y);
  check_same_device(op, "y", y, "x", x);
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have D > 0 features; got shape ", shape_str(x));
  TORCH_CHECK_VALUE(y.size(1) == x.size(1), op, ": y must be (M, D) with D = ", x.size(1),
                    " to match x of shape ", shape_str(x), "; got shape ", shape_str(y));
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, op, ": unknown kernel id ", kind);
  Inputs in;
  in.N = x.size(0);
  in.M = y.size(0);
  in.D = x.size(1);
  in.acc = acc_type(x.scalar_type());
  in.kp = make_params(op, kind, params, in.acc);
  const at::Tensor ya = y.to(in.acc);
  in.center = uses_distance(in.kp.kind) && in.M > 0 ? ya.mean(0) : at::zeros({in.D}, ya.options());
  in.yc = (ya - in.center).contiguous();
  in.yy = (in.yc * in.yc).sum(1).contiguous();
  if (v.has_value() && v->defined()) {
    const at::Tensor& vv = *v;
    check_float(op, "v", vv);
    check_same_device(op, "v", vv, "x", x);
    TORCH_CHECK_VALUE(vv.dim() == 2 && vv.size(0) == in.M, op, ": v must be (M, C) with M = ", in.M,
                      " to match y of shape ", shape_str(y), "; got shape ", shape_str(vv));
    in.v = vv.to(in.acc).contiguous();
    in.C = vv.size(1);
  } else {
    in.C = 1;
  }
  return in;
}

}  // namespace kernel_sum
}  // namespace distkern
