// Whitening factors of a batch of covariances (distkern.gaussian.whitening_factor): L lower-triangular with
// (scale·Σ + ridge·I)⁻¹ = L Lᵀ, in float64, without forming an inverse. With J the reversal permutation and
// J Σ J = C Cᵀ (Cholesky), Σ = U Uᵀ for U = J C J (upper-triangular), so L = U⁻ᵀ = J C⁻ᵀ J: C's triangular
// inverse, transposed, both axes flipped. With scale = 1/n, Σ may be a scatter matrix: GaussianStats.factor
// hands its accumulators over as they are, and no covariance is materialised.
//
// Why an op: PaDiM fits 3136 covariances (D = 100 to 550). torch's batched Cholesky and triangular solve
// on the CPU factor one matrix after another on one core, and the flips, symmetrisation and casts each
// stream all P·D² float64 through memory (2.6 s at P = 3136, D = 100 as whole-batch torch ops, 1.3 s after
// removing the redundant passes). Here, in parallel over the batch (at::parallel_for), the matrices go through
// scratch buffers of each task with the reversal folded into the load and the store: eight at a time on
// AVX-512 lanes (four on AVX2; factor_lanes.inc) up to D = kLanesMaxD, else one at a time (LAPACK
// single-threaded inside each). Other devices run ATen calls on chunks of the batch (cuSOLVER batches each).
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "common/check.h"
#include "common/cpu_gemm.h"
#include "common/cpu_reduce.h"
#include "common/macros.h"
#include "common/simd_math.h"

// LAPACK's Cholesky and BLAS's trsm through ATen's own wrappers (declared for its builds with LAPACK / BLAS):
// the integer ABI of the library torch links is then ATen's business, not ours.
#if AT_BUILD_WITH_LAPACK() && AT_BUILD_WITH_BLAS()
#include <ATen/native/BatchLinearAlgebra.h>
#define DISTKERN_DIRECT_LAPACK 1
#else
#define DISTKERN_DIRECT_LAPACK 0
#endif

namespace distkern {
namespace factor_lanes {
#define DK_LANES_FILE "mahalanobis/factor_lanes.inc"
#include "common/simd_targets.inc"
#if DK_AVX512_CODE
// 2 lanes and 1, for what is left of a batch after its whole groups (the same arithmetic a lane)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace on_fma2 {
using LD = ::distkern::simd::Fma2d;
#include "mahalanobis/factor_lanes.inc"
}  // namespace on_fma2
namespace on_fma1 {
using LD = ::distkern::simd::Fma1d;
#include "mahalanobis/factor_lanes.inc"
}  // namespace on_fma1
#pragma GCC pop_options
#endif
}  // namespace factor_lanes

namespace {

constexpr const char* kOp = "distkern.whitening_factors";
// Largest D factorised and inverted by the code below alone (D³/6 FMAs each, one matrix in cache) where the
// vector lanes (kLanesMaxD, factor_lanes.inc) do not take it — the matrices left over from the groups of W,
// and CPUs without AVX2; above it,
// LAPACK's Cholesky in place (ATen's wrapper of potrf, no copies) and tri_inverse_t. Per matrix on one core of
// the Zen 4 EPYC (AVX-512; MKL takes its AVX2 code there), this code / LAPACK + tri_inverse_t: D = 4 0.27 /
// 0.37 µs, 8 0.87 / 0.89, 16 3.2 / 2.5, 32 10.0 / 8.6, 64 43 / 38, 100 108 / 94, 192 450 / 365, 256 925 / 820,
// 550 7150 / 5850 (LAPACK's Cholesky 2.6 ms there, ~21 GFLOP/s, the inverse 2.9 ms). Without LAPACK in the
// torch build, this code at every D.
constexpr int64_t kOwnInverseMaxD = 8;

// xt (D×D, row-major, leading dimension ldx) = (c⁻¹)ᵀ for c lower-triangular (row-major, leading dimension
// ldc; its strict upper triangle is not read): column j of the inverse, (c⁻¹)[i, j] = −c[i, j:i]·(c⁻¹)[j:i, j]
// / c[i, i] for i > j, is row j of xt, so each entry is one contiguous dot product (D³/6 FMAs in all). Strict
// lower triangle 0.
//
// Within a column each entry waits on the one before (a chain of short dots, latency-bound), so four columns
// j0..j0+3 go together: below their 4×4 head, row i of c against the four rows of xt in one dot4 (from j0;
// the entries of xt before each column's start are its zeros).
void lower_inverse_t(const double* c, int64_t ldc, int64_t D, double* xt, int64_t ldx) {
  auto column_head = [&](int64_t j, int64_t i_end) {  // row j of xt, entries j..i_end−1, one dot at a time
    double* xj = xt + j * ldx;
    for (int64_t i = 0; i < j; ++i) xj[i] = 0.0;
    xj[j] = 1.0 / c[j * ldc + j];
    for (int64_t i = j + 1; i < i_end; ++i) {
      const double* ci = c + i * ldc;
      xj[i] = -cpu::dot(ci + j, xj + j, i - j) / ci[i];
    }
  };
  int64_t j0 = 0;
  for (; j0 + 4 <= D; j0 += 4) {
    for (int64_t r = 0; r < 4; ++r) column_head(j0 + r, j0 + 4);
    double* x0 = xt + j0 * ldx;
    for (int64_t i = j0 + 4; i < D; ++i) {
      const double* ci = c + i * ldc;
      double s[4];
      cpu::dot4(ci + j0, x0 + j0, x0 + ldx + j0, x0 + 2 * ldx + j0, x0 + 3 * ldx + j0, i - j0, s);
      for (int64_t r = 0; r < 4; ++r) x0[r * ldx + i] = -s[r] / ci[i];
    }
  }
  for (; j0 < D; ++j0) column_head(j0, D);
}

// a (D×D, row-major) ← its Cholesky factor C (lower; the strict upper triangle is left as it was), column by
// column (Cholesky–Crout: C[j, j] = √(a[j, j] − C[j, :j]·C[j, :j]), then C[i, j] = (a[i, j] − C[i, :j]·C[j, :j])
// / C[j, j] for i > j — contiguous dots, independent across i, so four rows go through one dot4; row by row
// each entry waited on the one before it). Returns 0, or j + 1 when the leading minor of order j + 1 is not
// positive definite (LAPACK's info).
int32_t cholesky_lower(double* a, int64_t D) {
  for (int64_t j = 0; j < D; ++j) {
    double* aj = a + j * D;
    const double d = aj[j] - cpu::dot(aj, aj, j);
    if (!(d > 0.0)) return static_cast<int32_t>(j + 1);  // NaN included
    const double cjj = std::sqrt(d);
    aj[j] = cjj;
    int64_t i = j + 1;
    for (; i + 4 <= D; i += 4) {
      double* ai = a + i * D;
      double s[4];
      cpu::dot4(aj, ai, ai + D, ai + 2 * D, ai + 3 * D, j, s);
      for (int64_t r = 0; r < 4; ++r) ai[r * D + j] = (ai[r * D + j] - s[r]) / cjj;
    }
    for (; i < D; ++i) {
      double* ai = a + i * D;
      ai[j] = (ai[j] - cpu::dot(aj, ai, j)) / cjj;
    }
  }
  return 0;
}

#if DISTKERN_DIRECT_LAPACK
// Leaves of tri_inverse_t at most this order go to lower_inverse_t.
constexpr int kTriLeaf = 64;

// y (n × n, row-major, leading dimension ldy) ← (c⁻¹)ᵀ for c lower-triangular (row-major, leading dimension
// ldc; its strict upper triangle is not read), y's strict lower triangle left undefined. In BLAS's
// column-major terms c is U = cᵀ, upper, and y is Y = U⁻ᵀ, lower. Recursive on halves, as LAPACK's blocked
// trtri: with U = [[U₁₁, U₁₂], [0, U₂₂]], U⁻ᵀ = [[U₁₁⁻ᵀ, 0], [−U₂₂⁻ᵀ·U₁₂ᵀ·U₁₁⁻ᵀ, U₂₂⁻ᵀ]]: the off-diagonal block is
// −U₁₂ᵀ copied in place and solved against the two diagonal blocks of the factor (two trsm, h·m·(h + m)
// FMAs / 2 — what the product with a triangle costs; n³/6 FMAs in all). The diagonal blocks recurse on the
// factor alone, so nothing waits on an inverse. Blocks of ≤ kTriLeaf by lower_inverse_t.
void tri_inverse_t(double* c, int ldc, int n, double* y, int ldy) {
  if (n <= kTriLeaf) {
    lower_inverse_t(c, ldc, n, y, ldy);
    return;
  }
  const int h = n / 2, m = n - h;
  tri_inverse_t(c, ldc, h, y, ldy);
  tri_inverse_t(c + int64_t(h) * ldc + h, ldc, m, y + int64_t(h) * ldy + h, ldy);
  // row-major y[i, h + k] (i < h, k < m) is Y's block (h + k, i): Y₂₁ = −U₁₂ᵀ, U₁₂[i, k] = c's row-major
  // entry [h + k, i], so y[i, h + k] = −c[h + k, i]
  double* y21 = y + h;  // column-major Y₂₁: m × h, leading dimension ldy
  for (int i = 0; i < h; ++i) {
    double* yi = y + int64_t(i) * ldy + h;
    for (int k = 0; k < m; ++k) yi[k] = -c[int64_t(h + k) * ldc + i];
  }
  // Y₂₁ ← U₂₂⁻ᵀ·Y₂₁, then Y₂₁ ← Y₂₁·U₁₁⁻ᵀ (U₂₂ at c + h·ldc + h, U₁₁ at c, both upper in column-major)
  at::native::blasTriangularSolve<double>('L', 'U', 'T', 'N', m, h, c + int64_t(h) * ldc + h, ldc, y21, ldy);
  at::native::blasTriangularSolve<double>('R', 'U', 'T', 'N', m, h, c, ldc, y21, ldy);
}
#endif

// Hands the pages lying wholly inside [p, p + bytes) back to the operating system (their contents become
// undefined: zeros on Linux, where this is madvise(MADV_DONTNEED); elsewhere nothing is done).
void release_pages(const void* p, int64_t bytes) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), e = b + static_cast<uintptr_t>(bytes);
  const uintptr_t lo = (b + page - 1) / page * page, hi = e / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#else
  (void)p;
  (void)bytes;
#endif
}

// Largest D factorised W matrices at a time on vector lanes (factor_lanes.inc). Per matrix on one Zen 4 core
// (2026-11-29, float32 factors, load and store included), lanes (AVX-512) / LAPACK + tri_inverse_t, µs: D = 8
// 0.1 / 0.5, 16 0.4 / 1.5, 32 1.7 / 7.5, 64 8.4 / 36, 100 25 / 93, 128 48 / 180, 192 158 / 377, 256 323 / 807,
// 384 1130 / 1920, 550 3350 / 5720, 640 5420 / 8250, 768 12100–14500 / 13600–14100, 1024 36500 / 30600 (the
// lanes' scratch, D² doubles a lane, long out of the caches there).
constexpr int64_t kLanesMaxD = 640;
// Largest D where the matrices left over from the whole groups go on narrower lanes (4, 2, 1) rather than one
// at a time through LAPACK: a lone matrix on one lane (scalar FMAs) took 8 / 156 / 15400 µs at D = 16 / 100 /
// 512 against LAPACK's 10 / 95 / 5500.
constexpr int64_t kNarrowMaxD = 48;

// Lanes of the CPU's vector set for the factors (0: none, the per-matrix path only).
int64_t factor_lanes_width() {
#if DK_AVX512_CODE
  switch (cpu::math_isa()) {
    case cpu::Isa::Avx512: return factor_lanes::on_avx512::LD::W;
    case cpu::Isa::Avx2: return factor_lanes::on_avx2::LD::W;
    case cpu::Isa::None: break;
  }
#endif
  return 0;
}

#if DK_AVX512_CODE
// factor_lanes.inc's two steps on W lanes (8: AVX-512; 4: AVX2; 2, 1: the same with FMA on SSE registers).
void cholesky_lanes(int64_t W, double* a, int64_t D, double* inv, int32_t* info) {
  switch (W) {
    case 8: return factor_lanes::on_avx512::cholesky_lanes(a, D, inv, info);
    case 4: return factor_lanes::on_avx2::cholesky_lanes(a, D, inv, info);
    case 2: return factor_lanes::on_fma2::cholesky_lanes(a, D, inv, info);
    default: return factor_lanes::on_fma1::cholesky_lanes(a, D, inv, info);
  }
}
void inverse_lanes(int64_t W, const double* a, int64_t D, double* xt, const int64_t* xo, const double* inv,
                   double* ninv) {
  switch (W) {
    case 8: return factor_lanes::on_avx512::inverse_lanes(a, D, xt, xo, inv, ninv);
    case 4: return factor_lanes::on_avx2::inverse_lanes(a, D, xt, xo, inv, ninv);
    case 2: return factor_lanes::on_fma2::inverse_lanes(a, D, xt, xo, inv, ninv);
    default: return factor_lanes::on_fma1::inverse_lanes(a, D, xt, xo, inv, ninv);
  }
}
#endif

// Factors of cov[g] for g in [g, g + W), W ∈ {8, 4, 2, 1}, one matrix a lane of the scratch buffers of this task
// (factor_lanes.inc's layout): the reversed, symmetrised and scaled lower triangle loaded, the Cholesky and the
// inverse on the lanes, L = J C⁻ᵀ J stored from each lane. Same contract as factor_range_cpu (info, NaN factors
// for a matrix that fails, release). A lane's arithmetic depends neither on the other lanes nor on W: a matrix
// gets the same bits in any batch and on AVX-512 or AVX2.
template <typename out_t>
void factor_group_cpu(const at::Tensor& cov, int64_t g, int64_t W, double ridge, bool symmetrize, double scale,
                      bool release, double* a, double* xt, const int64_t* xo, double* inv, double* ninv,
                      at::Tensor& out, at::Tensor& info) {
#if DK_AVX512_CODE
  const int64_t D = cov.size(-1);
  const int64_t s0 = cov.stride(0), s1 = cov.stride(1), s2 = cov.stride(2);
  const double* base = cov.data_ptr<double>();
  // a[i][j] = Σ'[p][q] for (p, q) = (D−1−i, D−1−j), p ≤ q, with the bits of factor_range_cpu's load, reading
  // each Σ once along its rows p (W streams, the lanes innermost): Σ[p][q] for q > p is stored as it is, and
  // completed at row q, where Σ[q][p] arrives: ((Σ[p][q] + Σ[q][p])·0.5)·scale. (Element by element, the
  // symmetrisation read down the columns: ~40 % of the op's time at D = 100.)
  auto at_a = [&](int64_t p, int64_t q) {
    const int64_t i = D - 1 - p;
    return a + (i * (i + 1) / 2 + (D - 1 - q)) * W;
  };
  for (int64_t p = 0; p < D; ++p) {
    if (symmetrize)
      for (int64_t q = 0; q < p; ++q) {  // completes pair (q, p)
        double* v = at_a(q, p);
        for (int64_t l = 0; l < W; ++l) {
          double x = (v[l] + base[(g + l) * s0 + p * s1 + q * s2]) * 0.5;
          if (scale != 1.0) x *= scale;
          v[l] = x;
        }
      }
    for (int64_t q = p; q < D; ++q) {  // pair (p, q): the diagonal at once, the rest when row q comes
      double* v = at_a(p, q);
      for (int64_t l = 0; l < W; ++l) {
        double x = base[(g + l) * s0 + p * s1 + q * s2];
        if (q == p || !symmetrize) {
          if (symmetrize) x = (x + x) * 0.5;
          if (scale != 1.0) x *= scale;
          if (q == p) x += ridge;
        }
        v[l] = x;
      }
    }
  }
  int32_t* ip = info.data_ptr<int32_t>() + g;
  for (int64_t l = 0; l < W; ++l) ip[l] = 0;
  cholesky_lanes(W, a, D, inv, ip);
  if (release)
    for (int64_t l = 0; l < W; ++l)
      if (ip[l] == 0) release_pages(base + (g + l) * s0, D * D * int64_t(sizeof(double)));
  inverse_lanes(W, a, D, xt, xo, inv, ninv);
  // L[r, s] = C⁻¹[D−1−s, D−1−r] = X[D−1−s][D−1−r]: column t = D−1−r of X, entries k = D−1−s ≥ t (s ≤ r)
  // the lanes innermost again: one contiguous vector of X read for each (r, s), written to W output rows
  out_t* op = out.data_ptr<out_t>() + g * D * D;
  for (int64_t r = 0; r < D; ++r) {
    const int64_t t = D - 1 - r;
    const double* col = xt + (xo[t] - (t - t % 4)) * W;  // col[k·W + l]: X[k][t] of lane l
    for (int64_t s = 0; s <= r; ++s) {
      const double* x = col + (D - 1 - s) * W;
      for (int64_t l = 0; l < W; ++l) op[l * D * D + r * D + s] = static_cast<out_t>(x[l]);
    }
    for (int64_t l = 0; l < W; ++l)
      for (int64_t s = r + 1; s < D; ++s) op[l * D * D + r * D + s] = out_t(0);
  }
  for (int64_t l = 0; l < W; ++l)  // undefined where the Cholesky failed (the caller raises): NaN
    if (ip[l] != 0)
      for (int64_t k = 0; k < D * D; ++k) op[l * D * D + k] = static_cast<out_t>(NAN);
#else
  (void)cov, (void)g, (void)W, (void)ridge, (void)symmetrize, (void)scale, (void)release, (void)a, (void)xt;
  (void)xo, (void)inv, (void)ninv, (void)out, (void)info;
#endif
}

// Factors of cov[g] for g in [g0, g1) on the CPU, one matrix at a time through two D×D scratch matrices of
// this task: the reversed (symmetrised, loaded) covariance's lower triangle, its Cholesky factor C (in place),
// xt = C⁻ᵀ, and L = J C⁻ᵀ J written to out. D ≤ kOwnInverseMaxD: the Cholesky and the inverse by the code
// above; larger D: LAPACK's Cholesky and tri_inverse_t. No temporaries of the batch, no flips or transposes
// through memory: the reversal is in the load and the store. With `release` (cov contiguous), the pages lying
// wholly inside a matrix go back to the operating system once it has factorised: PaDiM's factors
// (3.8 GB at D = 550) then take the place of its scatter (7.6 GB) instead of adding to it. A matrix that
// fails keeps its pages (the caller reads it to report its eigenvalues).
template <typename out_t>
void factor_range_cpu(const at::Tensor& cov, int64_t g0, int64_t g1, double ridge, bool symmetrize, double scale,
                      bool release, at::Tensor& out, at::Tensor& info) {
  const int64_t D = cov.size(-1);
  const int64_t s0 = cov.stride(0), s1 = cov.stride(1), s2 = cov.stride(2);
#if DISTKERN_DIRECT_LAPACK
  const bool own = D <= kOwnInverseMaxD;
#else
  const bool own = true;
#endif
  const at::TensorOptions f64 = cov.options();
  at::Tensor a = at::zeros({D, D}, f64), xt = at::empty({D, D}, f64);
  double* ap = a.data_ptr<double>();
  const double* xp = xt.data_ptr<double>();
  int32_t* ip = info.data_ptr<int32_t>();
  out_t* op = out.data_ptr<out_t>();
  for (int64_t g = g0; g < g1; ++g) {
    const double* c = cov.data_ptr<double>() + g * s0;
    // a[i, j] = scale·Σ'[D−1−i, D−1−j] (+ ridge on the diagonal) for j ≤ i, Σ' = ½(Σ + Σᵀ) with symmetrize:
    // the lower triangle of J Σ' J, the one the Cholesky reads (the strict upper triangle stays 0).
    // ((a + b)·0.5)·scale: the bits of GaussianStats.covariance's (a + b)·(0.5/n) for scale = 1/n.
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        const int64_t p = D - 1 - i, q = D - 1 - j;
        double v = c[p * s1 + q * s2];
        if (symmetrize) v = (v + c[q * s1 + p * s2]) * 0.5;
        if (scale != 1.0) v *= scale;
        ap[i * D + j] = i == j ? v + ridge : v;
      }
    if (own) {
      ip[g] = cholesky_lower(ap, D);
    } else {
#if DISTKERN_DIRECT_LAPACK
      // a's lower triangle (row-major) is the upper one in LAPACK's column-major terms: U with JΣJ = UᵀU, in
      // place, is C = Uᵀ read row-major — the factor cholesky_lower computes
      int info_g = 0;
      at::native::lapackCholesky<double>('U', static_cast<int>(D), ap, static_cast<int>(D), &info_g);
      ip[g] = info_g;
#endif
    }
    out_t* o = op + g * D * D;
    if (ip[g] != 0) {  // undefined for this g (the caller raises): NaN, not stale memory
      for (int64_t k = 0; k < D * D; ++k) o[k] = static_cast<out_t>(NAN);
      continue;
    }
    if (release) release_pages(c, D * D * int64_t(sizeof(double)));
    if (own) {
      lower_inverse_t(ap, D, D, xt.data_ptr<double>(), D);
    } else {
#if DISTKERN_DIRECT_LAPACK
      tri_inverse_t(ap, static_cast<int>(D), static_cast<int>(D), xt.data_ptr<double>(), static_cast<int>(D));
#endif
    }
    // L[r, s] = C⁻¹[D−1−s, D−1−r] = xt[D−1−r, D−1−s] for s ≤ r (xt's upper triangle read backwards), 0 above
    for (int64_t r = 0; r < D; ++r) {
      const double* xr = xp + (D - 1 - r) * D + (D - 1);
      out_t* orow = o + r * D;
      for (int64_t s = 0; s <= r; ++s) orow[s] = static_cast<out_t>(xr[-s]);
      for (int64_t s = r + 1; s < D; ++s) orow[s] = out_t(0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> factors_impl(const char* op, const at::Tensor& cov_in, double ridge,
                                                bool symmetrize, std::optional<at::ScalarType> dtype, double scale,
                                                bool release) {
  check_dim(op, "cov", cov_in, 3, "(G, D, D)");
  check_float(op, "cov", cov_in);
  TORCH_CHECK_VALUE(cov_in.size(1) == cov_in.size(2), op, ": cov must be (G, D, D) square matrices; got shape ",
                    shape_str(cov_in));
  TORCH_CHECK_VALUE(ridge >= 0.0, op, ": ridge must be >= 0; got ", ridge);
  TORCH_CHECK_VALUE(scale > 0.0 && std::isfinite(scale), op, ": scale must be finite and > 0; got ", scale);
  const at::ScalarType out_t = dtype.value_or(at::kDouble);
  TORCH_CHECK_TYPE(is_float_kind(out_t), op, ": dtype must be a floating type; got ", out_t);
  const at::Tensor cov = cov_in.to(at::kDouble);  // with release, a copy made here is released as well
  const int64_t G = cov.size(0), D = cov.size(1);
  release = release && cov.is_contiguous();  // each matrix then spans its own D² doubles
  at::Tensor out = at::empty({G, D, D}, cov.options().dtype(out_t));
  at::Tensor info = at::empty({G}, cov.options().dtype(at::kInt));
  if (G == 0 || D == 0) {
    info.zero_();
    return {out, info};
  }
  if (!cov.device().is_cpu()) {
    // cuSOLVER / cuBLAS batch each chunk; chunks of ~256 MiB of float64 matrices bound the temporaries (the
    // reversed copy, the Cholesky factor, the solve's result), which on the whole of PaDiM's 3136 × 550²
    // scatter would be ~4 × 7.6 GB. No host sync: every step is queued on the stream.
    const int64_t per = std::max<int64_t>(1, (int64_t(256) << 20) / (D * D * 8));
    const at::Tensor eye = at::eye(D, cov.options());
    for (int64_t g0 = 0; g0 < G; g0 += per) {
      const int64_t n = std::min(per, G - g0);
      const at::Tensor c = cov.narrow(0, g0, n);
      at::Tensor r = symmetrize ? at::add(c, c.mT()).flip({-2, -1}).mul_(0.5) : c.flip({-2, -1});
      if (scale != 1.0) r.mul_(scale);  // flip made r a new tensor
      if (ridge != 0.0) r.diagonal(0, -2, -1).add_(ridge);
      auto [chol, inf] = at::linalg_cholesky_ex(r, /*upper=*/false, /*check_errors=*/false);
      info.narrow(0, g0, n).copy_(inf);
      out.narrow(0, g0, n).copy_(
          at::linalg_solve_triangular(chol, eye.expand_as(chol), /*upper=*/false).mT().flip({-2, -1}).tril_());
    }
    return {out, info};
  }
  // In parallel over pieces of the batch: with vector lanes (D ≤ kLanesMaxD), whole groups of W matrices, then
  // the rest in groups of W/2, ..., 1 where D ≤ kNarrowMaxD, else one matrix at a time; without lanes, one matrix
  // at a time (LAPACK single-threaded inside each, every step on one matrix in cache). A lane's arithmetic is the
  // same at every width: a matrix's factor has the bits it would have in any batch at D ≤ kNarrowMaxD, and in
  // any batch where it falls in a whole group above (else LAPACK's, ~1e-16 away).
  const int64_t W = D <= kLanesMaxD ? factor_lanes_width() : 0;
  std::vector<std::pair<int64_t, int64_t>> pieces;  // (first matrix, lanes; 0: one matrix by LAPACK)
  int64_t g = 0;
  if (W > 0) {
    for (; g + W <= G; g += W) pieces.emplace_back(g, W);
    if (D <= kNarrowMaxD)
      for (int64_t w = W / 2; w >= 1; w /= 2)
        if (g + w <= G) {
          pieces.emplace_back(g, w);
          g += w;
        }
  }
  for (; g < G; ++g) pieces.emplace_back(g, 0);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t t0, int64_t t1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "whitening_factors", [&] {
      if (pieces[t0].second > 0) {
        // scratch of the task: C packed (D(D+1)/2), X by columns (Σ_s D − b(s)), 1/C[s][s] and its negation
        std::vector<int64_t> xo(D);
        int64_t nx = 0;
        for (int64_t s = 0; s < D; ++s) {
          xo[s] = nx;
          nx += D - (s - s % 4);
        }
        const int64_t na = D * (D + 1) / 2;
        at::Tensor buf = at::empty({(na + nx + 2 * D) * W}, cov.options());  // 64-byte aligned (c10's CPU allocator)
        double* a = buf.data_ptr<double>();
        for (int64_t t = t0; t < t1 && pieces[t].second > 0; ++t) {
          const auto [g0, w] = pieces[t];  // a w-lane group uses the first part of each buffer
          factor_group_cpu<scalar_t>(cov, g0, w, ridge, symmetrize, scale, release, a, a + na * w, xo.data(),
                                     a + (na + nx) * w, a + (na + nx + D) * w, out, info);
        }
      }
      int64_t t = t0;
      while (t < t1 && pieces[t].second > 0) ++t;
      if (t < t1)  // the LAPACK pieces come last, one matrix each, consecutive
        factor_range_cpu<scalar_t>(cov, pieces[t].first, pieces[t1 - 1].first + 1, ridge, symmetrize, scale, release,
                                   out, info);
    });
  });
  return {out, info};
}

std::tuple<at::Tensor, at::Tensor> whitening_factors(const at::Tensor& cov, double ridge, bool symmetrize,
                                                     std::optional<at::ScalarType> dtype, double scale) {
  return factors_impl(kOp, cov, ridge, symmetrize, dtype, scale, /*release=*/false);
}

// The same factors; cov's contents are undefined afterwards. On the CPU, when cov is contiguous, the memory of
// each matrix that factorised is handed back to the operating system as the op goes (see factor_range_cpu).
std::tuple<at::Tensor, at::Tensor> whitening_factors_release(at::Tensor& cov, double ridge, bool symmetrize,
                                                             std::optional<at::ScalarType> dtype, double scale) {
  return factors_impl("distkern.whitening_factors_release_", cov, ridge, symmetrize, dtype, scale,
                      /*release=*/true);
}

}  // namespace
}  // namespace distkern

TORCH_LIBRARY_IMPL(distkern, CompositeExplicitAutograd, m) {
  m.impl("whitening_factors", &distkern::whitening_factors);
  m.impl("whitening_factors_release_", &distkern::whitening_factors_release);
}
