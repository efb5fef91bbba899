// Input checks and preparation shared by the CPU and CUDA implementations.
#include "mahalanobis/mahalanobis.h"

#include "common/check.h"

namespace distkern {
namespace mahalanobis {

namespace {

// With lower=True only the lower triangle of a factor is used. On the CPU a non-zero strict upper
// triangle is refused (cheap: D² reads, no device sync; a full matrix passed as a triangular
// factor would otherwise give a silently wrong distance). On a GPU the check would cost a host
// sync: the strict upper triangle is zeroed instead.
at::Tensor checked_lower(const char* op, const at::Tensor& f, bool on_cpu) {
  if (!on_cpu) return f.tril();
  const int64_t D = f.size(-1), batches = f.numel() / (D * D);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "mahalanobis_check_lower", [&] {
    const scalar_t* w = f.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batches; ++b)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = i + 1; j < D; ++j)
          TORCH_CHECK_VALUE(w[(b * D + i) * D + j] == scalar_t(0), op,
                            batches > 1 ? ": factors[" + std::to_string(b) + "]" : std::string(": factor"),
                            " must be lower-triangular when lower=True (Σ⁻¹ = L Lᵀ), but its "
                            "strict upper triangle has non-zero entries; pass lower=False to use "
                            "it as a general whitening matrix");
  });
  return f;
}

}  // namespace

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
  if (lower) in.factor = checked_lower(op, in.factor, factor.device().is_cpu());
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


PosInputs prepare_pos(const char* op, const at::Tensor& x, const at::Tensor& means,
                      const at::Tensor& factors, bool lower) {
  check_dim(op, "x", x, 3, "(B, P, D)");
  check_float(op, "x", x);
  check_dim(op, "means", means, 2, "(P, D)");
  check_float(op, "means", means);
  check_dim(op, "factors", factors, 3, lower ? "(P, D, D)" : "(P, D, R)");
  check_float(op, "factors", factors);
  check_same_device(op, "means", means, "x", x);
  check_same_device(op, "factors", factors, "x", x);
  const int64_t B = x.size(0), P = x.size(1), D = x.size(2);
  TORCH_CHECK_VALUE(D > 0 && P > 0, op, ": x must have P > 0 positions and D > 0 features; got shape ",
                    shape_str(x));
  TORCH_CHECK_VALUE(means.size(0) == P && means.size(1) == D, op, ": means must be (P, D) = (", P,
                    ", ", D, ") to match x of shape ", shape_str(x), "; got shape ", shape_str(means));
  TORCH_CHECK_VALUE(factors.size(0) == P && factors.size(1) == D, op, ": factors must be (P, D, R) with (P, D) = (",
                    P, ", ", D, ") to match x of shape ", shape_str(x), "; got shape ", shape_str(factors));
  const int64_t R = factors.size(2);
  TORCH_CHECK_VALUE(R > 0, op, ": factors must have at least one column; got shape ", shape_str(factors));
  if (lower) {
    TORCH_CHECK_VALUE(R == D, op, ": with lower=True the factors must be square lower-triangular (P, D, D); got shape ",
                      shape_str(factors), " (pass lower=False for general (P, D, R) whitening matrices)");
  }
  TORCH_CHECK_VALUE(factors.is_contiguous(), op,
                    ": factors must be contiguous (they are read in place, never copied: at PaDiM's sizes a copy "
                    "would be gigabytes); call .contiguous() once when you build them");
  const at::ScalarType acc = acc_type(x.scalar_type());
  TORCH_CHECK_TYPE((acc == at::kDouble) == (factors.scalar_type() == at::kDouble), op,
                   ": factors must be float64 exactly when x is float64 (the accumulation type); got x ",
                   x.scalar_type(), " and factors ", factors.scalar_type());
  PosInputs in;
  in.B = B;
  in.P = P;
  in.D = D;
  in.R = R;
  in.acc = acc;
  in.means = means.to(acc).contiguous();
  return in;
}

KInputs prepare_k(const char* op, const at::Tensor& x, const at::Tensor& means,
                  const at::Tensor& factors, bool lower, const c10::optional<at::Tensor>& bias) {
  check_dim(op, "x", x, 2, "(N, D)");
  check_float(op, "x", x);
  check_dim(op, "means", means, 2, "(K, D)");
  check_float(op, "means", means);
  check_float(op, "factors", factors);
  check_same_device(op, "means", means, "x", x);
  check_same_device(op, "factors", factors, "x", x);
  const int64_t N = x.size(0), D = x.size(1), K = means.size(0);
  TORCH_CHECK_VALUE(D > 0, op, ": x must have at least one feature (D > 0); got shape ", shape_str(x));
  TORCH_CHECK_VALUE(K > 0, op, ": means must hold at least one component (K > 0); got shape ",
                    shape_str(means));
  TORCH_CHECK_VALUE(means.size(1) == D, op, ": means must be (K, D) with D = ", D,
                    " to match x of shape ", shape_str(x), "; got shape ", shape_str(means));
  TORCH_CHECK_VALUE(factors.dim() == 2 || factors.dim() == 3, op,
                    ": factors must be one shared (D, R) factor or one per component (K, D, R); "
                    "got shape ", shape_str(factors));
  const bool shared = factors.dim() == 2;
  if (!shared) {
    TORCH_CHECK_VALUE(factors.size(0) == K, op, ": factors must have K = ", K,
                      " components to match means of shape ", shape_str(means), "; got shape ",
                      shape_str(factors));
  }
  TORCH_CHECK_VALUE(factors.size(-2) == D, op, ": factors must have D = ", D,
                    " rows to match x of shape ", shape_str(x), "; got shape ", shape_str(factors));
  const int64_t R = factors.size(-1);
  TORCH_CHECK_VALUE(R > 0, op, ": factors must have at least one column; got shape ", shape_str(factors));
  if (lower) {
    TORCH_CHECK_VALUE(R == D, op, ": with lower=True the factors must be square lower-triangular (D, D) "
                      "matrices with D = ", D, "; got shape ", shape_str(factors),
                      " (pass lower=False for general (D, R) whitening matrices)");
  }
  KInputs in;
  in.N = N;
  in.D = D;
  in.R = R;
  in.K = K;
  in.shared = shared;
  in.acc = acc_type(x.scalar_type());
  in.means = means.to(in.acc).contiguous();
  in.factors = factors.to(in.acc).contiguous();
  if (lower) in.factors = checked_lower(op, in.factors, factors.device().is_cpu());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_dim(op, "bias", b, 1, "(K,)");
    check_float(op, "bias", b);
    check_same_device(op, "bias", b, "x", x);
    TORCH_CHECK_VALUE(b.size(0) == K, op, ": bias must have K = ", K, " entries; got shape ", shape_str(b));
    in.bias = b.to(in.acc).contiguous();
  }
  if (shared) {
    // centre on the mean of the finite means: a NaN / inf mean then poisons its own column only, as
    // in the per-component path (no host sync: the count stays on the device)
    const at::Tensor finite = at::isfinite(in.means).all(1, true);
    in.center = at::where(finite, in.means, at::zeros({}, in.means.options())).sum(0) /
                finite.sum().clamp_min(1).to(in.acc);
    in.V = at::mm(in.means - in.center, in.factors).contiguous();  // K×R
    in.vv = (in.V * in.V).sum(1).contiguous();
    in.bmat = at::mm(in.factors, in.V.t()).contiguous();  // D×K
  }
  return in;
}

}  // namespace mahalanobis
}  // namespace distkern
