// Closed-form Gaussian denoiser and probability-flow teleport (Gaussian score approximation).
//
// For a Gaussian N(μ, U diag(λ) Uᵀ) with U (D, r) orthonormal columns:
//   denoise:  D(x, σ) = μ + U diag(λ/(λ+σ²)) Uᵀ(x − μ)
//   teleport: x_t = μ + U diag(√((σ_t²+λ)/(σ_T²+λ))) Uᵀ(x_T − μ) + (σ_t/σ_T)·(x_T − μ − U Uᵀ(x_T − μ))
// Both are  out = μ + k·(x − μ) + U diag(w) Uᵀ(x − μ)  with per-sample (k, w): k = 0, w = λ/(λ+σ²) for the
// denoiser; k = σ_t/σ_T, w = √((σ_t²+λ)/(σ_T²+λ)) − k for the teleport. The cost is two
// (B, D)·(D, r) products, so this op is a composite of GEMMs (BLAS / cuBLAS are at the floor there)
// and two small elementwise passes; it never forms x − μ: Uᵀ(x − μ) = Uᵀx − Uᵀμ, and the output is
// addmm(k·x + (1−k)·μ, Z, Uᵀ). Registered as CompositeImplicitAutograd: autograd, fake tensors and
// every device come from the ATen ops it calls. Sizes are SymInts throughout, so the op also traces under
// torch.compile with dynamic shapes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/check.h"

namespace distkern {
namespace diffusion {
namespace {

at::Tensor gaussian_lowrank(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& U, const at::Tensor& lam,
                            const at::Tensor& sigma, const c10::optional<at::Tensor>& sigma_to) {
  const char* op = "distkern.gaussian_lowrank";
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (B, ...) with a batch dimension and at least one feature "
                    "dimension; got shape ", shape_str(x));
  const c10::SymInt B = x.sym_size(0);
  c10::SymInt D = 1;  // the features of one sample (also when the batch is empty)
  for (int64_t i = 1; i < x.dim(); ++i) D = D * x.sym_size(i);
  TORCH_CHECK_VALUE(mean.sym_numel() == D, op, ": mean must have the ", D, " features of one sample of x; got shape ",
                    shape_str(mean));
  check_dim(op, "U", U, 2, "(D, r)");
  TORCH_CHECK_VALUE(U.sym_size(0) == D, op, ": U must be (D, r) with D = ", D, "; got ", shape_str(U));
  const c10::SymInt r = U.sym_size(1);
  TORCH_CHECK_VALUE(lam.dim() == 1 && lam.sym_size(0) == r, op, ": lam must be (r,) = (", r, ",); got ",
                    shape_str(lam));
  check_float(op, "mean", mean);
  check_float(op, "U", U);
  check_float(op, "lam", lam);
  TORCH_CHECK_TYPE(!sigma.is_complex(), op, ": sigma must be real; got ", sigma.scalar_type());
  TORCH_CHECK_TYPE(!(sigma_to.has_value() && sigma_to->defined() && sigma_to->is_complex()), op,
                   ": sigma_to must be real");
  check_same_device(op, "mean", mean, "x", x);
  check_same_device(op, "U", U, "x", x);
  check_same_device(op, "lam", lam, "x", x);
  auto check_sigma = [&](const char* name, const at::Tensor& s) {
    TORCH_CHECK_VALUE(s.dim() == 0 || (s.dim() == 1 && (s.sym_size(0) == B || s.sym_size(0) == 1)), op, ": ", name,
                      " must be a scalar or (B,) = (", B, ",); got shape ", shape_str(s));
    if (s.dim() > 0) check_same_device(op, name, s, "x", x);
  };
  check_sigma("sigma", sigma);
  const bool teleport = sigma_to.has_value() && sigma_to->defined();
  if (teleport) check_sigma("sigma_to", *sigma_to);

  const auto acc = acc_type(x.scalar_type());
  const at::Tensor xf = x.reshape_symint({B, D}).to(acc);
  const at::Tensor mu = mean.reshape_symint({D}).to(acc);
  const at::Tensor Uf = U.to(acc);
  const at::Tensor lm = lam.to(acc);
  auto col = [&](const at::Tensor& s) { return s.dim() == 0 ? s.to(acc) : s.to(acc).reshape({-1, 1}); };
  const at::Tensor s = col(sigma);
  at::Tensor w, base;
  if (teleport) {
    const at::Tensor st = col(*sigma_to);
    const at::Tensor k = st / s;
    w = at::sqrt((st * st + lm) / (s * s + lm)) - k;  // the k·UUᵀ(x − μ) inside k·(x − μ) is taken back out
    base = k * xf + (1 - k) * mu;
  } else {
    w = lm / (lm + s * s);
    base = mu.expand_symint({B, D});
  }
  const at::Tensor z = (at::mm(xf, Uf) - at::matmul(mu, Uf)) * w;
  return at::addmm(base, z, Uf.t()).reshape_symint(x.sym_sizes()).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CompositeImplicitAutograd, m) { m.impl("gaussian_lowrank", &gaussian_lowrank); }

}  // namespace diffusion
}  // namespace distkern
