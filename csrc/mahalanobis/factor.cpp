// Whitening factors of a batch of covariances (distkern.gaussian.whitening_factor): L lower-triangular with
// (Σ + ridge·I)⁻¹ = L Lᵀ, in float64, without forming an inverse. With J the reversal permutation and
// J Σ J = C Cᵀ (Cholesky), Σ = U Uᵀ for U = J C J (upper-triangular), so L = U⁻ᵀ = J C⁻ᵀ J: C's triangular
// inverse, transposed, both axes flipped.
//
// Why an op: PaDiM fits 3136 covariances (D = 100 to 550). torch's batched Cholesky and triangular solve
// on the CPU factor one matrix after another on one core, and the flips, symmetrisation and casts each
// stream all P·D² float64 through memory (2.6 s at P = 3136, D = 100 as whole-batch torch ops, 1.3 s after
// removing the redundant passes). Here the batch runs in chunks of ~2 MiB, in parallel over the chunks
// (at::parallel_for; LAPACK single-threaded inside each), every step of a chunk on cache-resident data.
// Other devices run the same ATen calls on the whole batch at once (cuSOLVER batches them itself).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "common/cpu_reduce.h"

namespace distkern {
namespace {

constexpr const char* kOp = "distkern.whitening_factors";
// Largest D factorised and inverted by the row-oriented code below (D³/6 FMAs each, one matrix in cache);
// above it, LAPACK's blocked Cholesky and a blocked triangular inverse through GEMMs (tri_inverse). Per
// matrix on the 2-core AVX2 EPYC (two chunks at a time), row-oriented / LAPACK + tri_inverse / LAPACK + solve
// against the identity: D = 128 0.19 / 0.24 / 0.37 ms, 256 1.04 / 0.94 / 1.31, 384 3.5 / 1.7 / 3.3,
// 550 9.0 / 5.6 / 7.7.
constexpr int64_t kOwnInverseMaxD = 192;

// xt (D×D, row-major) = (c⁻¹)ᵀ for c lower-triangular (row-major, leading dimension ldc; its strict upper
// triangle is not read): column j of the inverse, (c⁻¹)[i, j] = −c[i, j:i]·(c⁻¹)[j:i, j] / c[i, i] for i > j,
// is row j of xt, so each entry is one contiguous dot product (D³/6 FMAs in all). Strict lower triangle 0.
void lower_inverse_t(const double* c, int64_t ldc, int64_t D, double* xt) {
  for (int64_t j = 0; j < D; ++j) {
    double* xj = xt + j * D;
    for (int64_t i = 0; i < j; ++i) xj[i] = 0.0;
    xj[j] = 1.0 / c[j * ldc + j];
    for (int64_t i = j + 1; i < D; ++i) {
      const double* ci = c + i * ldc;
      xj[i] = -cpu::dot(ci + j, xj + j, i - j) / ci[i];
    }
  }
}

// a (D×D, row-major) ← its Cholesky factor C (lower; the strict upper triangle is left as it was), row by
// row (Cholesky–Banachiewicz: C[i, j] = (a[i, j] − C[i, :j]·C[j, :j]) / C[j, j], contiguous dot products).
// Returns 0, or i + 1 when the leading minor of order i + 1 is not positive definite (LAPACK's info).
int32_t cholesky_lower(double* a, int64_t D) {
  for (int64_t i = 0; i < D; ++i) {
    double* ai = a + i * D;
    for (int64_t j = 0; j < i; ++j) {
      const double* aj = a + j * D;
      ai[j] = (ai[j] - cpu::dot(ai, aj, j)) / aj[j];
    }
    const double d = ai[i] - cpu::dot(ai, ai, i);
    if (!(d > 0.0)) return static_cast<int32_t>(i + 1);  // NaN included
    ai[i] = std::sqrt(d);
  }
  return 0;
}

// The factors of a chunk on the CPU for D ≤ kOwnInverseMaxD, one matrix at a time in a D×D scratch: the
// reversed (symmetrised, loaded) covariance's lower triangle, its Cholesky factor in place, the inverse,
// and L = J C⁻ᵀ J written to out — no temporaries of the chunk, nothing but the matrix in cache.
template <typename out_t>
void factor_chunk_cpu(const at::Tensor& cov, int64_t g0, int64_t n, double ridge, bool symmetrize, at::Tensor& out,
                      at::Tensor& info) {
  const int64_t D = cov.size(-1);
  const int64_t s0 = cov.stride(0), s1 = cov.stride(1), s2 = cov.stride(2);
  std::vector<double> a(D * D), x(D * D);
  int32_t* ip = info.data_ptr<int32_t>();
  out_t* op = out.data_ptr<out_t>();
  for (int64_t g = g0; g < g0 + n; ++g) {
    const double* c = cov.data_ptr<double>() + g * s0;
    // a[i, j] = Σ'[D−1−i, D−1−j] (+ ridge on the diagonal) for j ≤ i, Σ' = ½(Σ + Σᵀ) with symmetrize: the
    // lower triangle of J Σ' J, the one the Cholesky reads
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        const int64_t p = D - 1 - i, q = D - 1 - j;
        double v = c[p * s1 + q * s2];
        if (symmetrize) v = (v + c[q * s1 + p * s2]) * 0.5;
        a[i * D + j] = i == j ? v + ridge : v;
      }
    ip[g] = cholesky_lower(a.data(), D);
    out_t* o = op + g * D * D;
    if (ip[g] != 0) {  // undefined for this g (the caller raises): NaN, not stale memory
      for (int64_t k = 0; k < D * D; ++k) o[k] = static_cast<out_t>(NAN);
      continue;
    }
    // L[r, s] = C⁻¹[D−1−s, D−1−r] = xt[D−1−r, D−1−s]: xt with both axes reversed (lower, as xt is upper)
    lower_inverse_t(a.data(), D, D, x.data());
    for (int64_t r = 0; r < D; ++r) {
      const double* xr = x.data() + (D - 1 - r) * D + (D - 1);
      for (int64_t s = 0; s < D; ++s) o[r * D + s] = static_cast<out_t>(xr[-s]);
    }
  }
}

// x ← c⁻¹ for c lower-triangular (n × n float64 views; c's strict upper triangle is not read), x lower-
// triangular. Recursive on halves, as LAPACK's blocked trtri: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]],
// the off-diagonal block by two GEMMs; ~n³/3 FLOPs where a solve against the identity costs n³. Blocks of ≤ 64
// by lower_inverse_t.
void tri_inverse(const at::Tensor& c, const at::Tensor& x) {
  const int64_t n = c.size(0);
  if (n <= 64) {
    const at::Tensor cc = c.contiguous();
    at::Tensor xt = at::empty({n, n}, cc.options());
    lower_inverse_t(cc.data_ptr<double>(), n, n, xt.data_ptr<double>());
    x.copy_(xt.t());
    return;
  }
  const int64_t h = n / 2, m = n - h;
  const at::Tensor xa = x.narrow(0, 0, h).narrow(1, 0, h), xc = x.narrow(0, h, m).narrow(1, h, m);
  tri_inverse(c.narrow(0, 0, h).narrow(1, 0, h), xa);
  tri_inverse(c.narrow(0, h, m).narrow(1, h, m), xc);
  x.narrow(0, 0, h).narrow(1, h, m).zero_();
  x.narrow(0, h, m).narrow(1, 0, h).copy_(at::mm(xc, at::mm(c.narrow(0, h, m).narrow(1, 0, h), xa)).neg_());
}

// Factors of cov[g] for g in [g0, g0 + n) into out (its dtype) and their Cholesky info into info.
void factor_chunk(const at::Tensor& cov, int64_t g0, int64_t n, double ridge, bool symmetrize, at::Tensor& out,
                  at::Tensor& info) {
  const int64_t D = cov.size(-1);
  if (cov.device().is_cpu() && D <= kOwnInverseMaxD) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "whitening_factors", [&] {
      factor_chunk_cpu<scalar_t>(cov, g0, n, ridge, symmetrize, out, info);
    });
    return;
  }
  const at::Tensor c = cov.narrow(0, g0, n);
  at::Tensor r = symmetrize ? at::add(c, c.mT()).flip({-2, -1}).mul_(0.5) : c.flip({-2, -1});
  if (ridge != 0.0) r.diagonal(0, -2, -1).add_(ridge);
  auto [chol, inf] = at::linalg_cholesky_ex(r, /*upper=*/false, /*check_errors=*/false);
  info.narrow(0, g0, n).copy_(inf);
  at::Tensor o = out.narrow(0, g0, n);
  if (!cov.device().is_cpu()) {  // cuSOLVER / cuBLAS batch the whole chunk
    const at::Tensor eye = at::eye(D, r.options()).expand_as(chol);
    o.copy_(at::linalg_solve_triangular(chol, eye, /*upper=*/false).mT().flip({-2, -1}));
    o.tril_();
    return;
  }
  at::Tensor x = at::empty({D, D}, r.options());
  for (int64_t g = 0; g < n; ++g) {
    tri_inverse(chol.select(0, g), x);
    o.select(0, g).copy_(x.t().flip({0, 1}));  // L = J C⁻ᵀ J, lower-triangular
  }
}

std::tuple<at::Tensor, at::Tensor> whitening_factors(const at::Tensor& cov_in, double ridge, bool symmetrize,
                                                     std::optional<at::ScalarType> dtype) {
  check_dim(kOp, "cov", cov_in, 3, "(G, D, D)");
  check_float(kOp, "cov", cov_in);
  TORCH_CHECK_VALUE(cov_in.size(1) == cov_in.size(2), kOp, ": cov must be (G, D, D) square matrices; got shape ",
                    shape_str(cov_in));
  TORCH_CHECK_VALUE(ridge >= 0.0, kOp, ": ridge must be >= 0; got ", ridge);
  const at::ScalarType out_t = dtype.value_or(at::kDouble);
  TORCH_CHECK_TYPE(is_float_kind(out_t), kOp, ": dtype must be a floating type; got ", out_t);
  const at::Tensor cov = cov_in.to(at::kDouble);
  const int64_t G = cov.size(0), D = cov.size(1);
  at::Tensor out = at::empty({G, D, D}, cov.options().dtype(out_t));
  at::Tensor info = at::empty({G}, cov.options().dtype(at::kInt));
  if (G == 0 || D == 0) {
    info.zero_();
    return {out, info};
  }
  if (!cov.device().is_cpu()) {
    factor_chunk(cov, 0, G, ridge, symmetrize, out, info);
    return {out, info};
  }
  const int64_t per = std::max<int64_t>(1, (int64_t(2) << 20) / (D * D * 8));  // matrices per chunk (~2 MiB)
  const int64_t chunks = (G + per - 1) / per;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * per;
      factor_chunk(cov, g0, std::min(per, G - g0), ridge, symmetrize, out, info);
    }
  });
  return {out, info};
}

}  // namespace
}  // namespace distkern

TORCH_LIBRARY_IMPL(distkern, CompositeExplicitAutograd, m) {
  m.impl("whitening_factors", &distkern::whitening_factors);
}
