// mmd2's small-sample path (python/distkern/mmd.py, up to 512 samples a side) on the CPU:
//
//   dense_gram(z)                 z·zᵀ, the upper triangle computed and mirrored
//   dense_mm(a, b)                a @ b
//   dense_mmd(x, y, kernel, ...)  the estimator in one pass: z = [x; y] (centred on ȳ for the
//                                 distance kernels; never concatenated), G = z·zᵀ, then per pair r² (or
//                                 x·y), φ and the estimator's weight → the value, for a gradient the
//                                 weighted derivatives B (the rows of the samples that need one), and the
//                                 centred x and y (empty for the polynomial kernel: x and y themselves)
//   dense_mmd_grad(b, x, y, row0, dot)   the gradient rows from B, z = [x; y]: B·z (polynomial) or
//                                 2(rowsum(B)·z_rows − B·z) (distance kernels)
//
// The products run on distkern's micro-kernel (common/cpu_gemm.h) in float32 where it runs, at::mm
// otherwise; φ and r² are kernel_matmul's own (kernel_math.h: sq_dist, needs_exact_r2, phi, and its
// vector form phi_cpu.h), so both paths of mmd2 see the same per-pair arithmetic. No autograd: mmd2 calls these inside its
// autograd.Function, and differentiates plain torch ops under create_graph. dense_gram and dense_mm
// are also registered for every other device (as at::mm), so the Python path can call them anywhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cpu_gemm.h"
#include "common/cpu_reduce.h"
#include "kernel_sum/kernel_math.h"
#include "kernel_sum/kernel_sum.h"
#include "kernel_sum/phi_cpu.h"

namespace distkern {
namespace {

void check2d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D; got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point; got ",
                   t.scalar_type());
}

at::Tensor dense_gram_cpu(const at::Tensor& z) {
  check2d("distkern.dense_gram", "z", z);
  return cpu::gram(z);
}

at::Tensor dense_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check2d("distkern.dense_mm", "a", a);
  check2d("distkern.dense_mm", "b", b);
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), "distkern.dense_mm: a ", a.sizes(), " and b ", b.sizes(),
                    " cannot be multiplied");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "distkern.dense_mm: a and b must have one dtype; got ",
                   a.scalar_type(), " and ", b.scalar_type());
  return cpu::mm(a, b);
}

at::Tensor dense_gram_any(const at::Tensor& z) {
  check2d("distkern.dense_gram", "z", z);
  return at::mm(z, z.t());
}

at::Tensor dense_mm_any(const at::Tensor& a, const at::Tensor& b) {
  check2d("distkern.dense_mm", "a", a);
  check2d("distkern.dense_mm", "b", b);
  return at::mm(a, b);
}

// The estimator from the pair matrix: value = Σ w_blk·φ over the unmasked pairs, B = w_blk·dφ/dt
// (twice for the within-sample blocks: each pair counts as (i, j) and (j, i)) for the rows of the
// samples that need a gradient. estimator: 0 biased, 1 unbiased, 2 ustat.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mmd_impl(const at::Tensor& x, const at::Tensor& y, int64_t kind, at::ArrayRef<double> params,
                                 int64_t estimator, bool need_x, bool need_y) {
  const char* op = "distkern.dense_mmd";
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  kernel_sum::Params kp = kernel_sum::make_params(op, kind, params, acc);
  kernel_sum::Params kd = kp;
  kd.kind = static_cast<int>(kind) + 5;  // the derivative kind (kernel_math.h)
  const bool dist = kernel_sum::uses_distance(kp.kind);
  const int64_t n = x.size(0), m = y.size(0), N = n + m, D = x.size(1);
  at::Tensor xa = x.to(acc).contiguous(), ya = y.to(acc).contiguous();
  if (dist) {  // translation invariant: centre on y's mean for accurate distances
    const at::Tensor c = ya.mean(0);
    xa = xa - c;
    ya = ya - c;
  }
  const at::Tensor g = cpu::gram_stacked(xa, ya);
  const acc_t* xp = xa.data_ptr<acc_t>();
  const acc_t* yp = ya.data_ptr<acc_t>();
  auto zrow = [&](int64_t i) { return i < n ? xp + i * D : yp + (i - n) * D; };  // row i of [x; y]
  const acc_t* gp = g.data_ptr<acc_t>();
  std::vector<acc_t> sq(N);  // ‖z_i‖², the Gram diagonal
  for (int64_t i = 0; i < N; ++i) sq[i] = gp[i * N + i];
  double wxx, wyy, wxy;
  if (estimator == 0) {
    wxx = 1.0 / (double(n) * n), wyy = 1.0 / (double(m) * m), wxy = -2.0 / (double(n) * m);
  } else {
    wxx = 1.0 / (double(n) * (n - 1)), wyy = 1.0 / (double(m) * (m - 1));
    wxy = estimator == 1 ? -2.0 / (double(n) * m) : -2.0 / (double(n) * (n - 1));
  }
  const bool mask_self = estimator != 0, mask_pair = estimator == 2;
  // rows of B: x's (0..n) and/or y's (n..N)
  const int64_t r0 = need_x ? 0 : n, r1 = need_y ? N : n;
  const bool need = need_x || need_y;
  at::Tensor b = need ? at::empty({r1 - r0, N}, g.options()) : at::empty({0, N}, g.options());
  acc_t* bp = b.data_ptr<acc_t>();
  // pair (i, j): t, masked?, block weight
  auto pair_t = [&](int64_t i, int64_t j) -> acc_t {
    const acc_t dot = gp[i * N + j];
    if (!dist) return dot;
    if (i == j) return acc_t(0);  // |z_i − z_i|² is 0, not its rounding
    acc_t r2 = kernel_sum::sq_dist(sq[i], sq[j], dot);
    if (kernel_sum::needs_exact_r2(r2, sq[i], sq[j], kp.exact_frac))  // near-coincident: from the coordinates
      r2 = cpu::sq_distance(zrow(i), zrow(j), D);
    return r2;
  };
  // φ and dφ/dt of row i: f over j ∈ [i, N) (the value uses the upper triangle), df over [0, N) for a
  // row of B. On vector lanes (kernel_sum/phi_cpu.h) from the Gram row, the unresolved pairs and the
  // diagonal then from the coordinates as pair_t takes them; else pair by pair.
  const bool vec = std::is_same<acc_t, float>::value && kernel_sum::phi_vec_takes(kp) &&
                   (!need || kernel_sum::phi_vec_takes(kd));
  auto phi_row = [&](const kernel_sum::Params& k, int64_t i, int64_t j0, acc_t* out, std::vector<int64_t>& refine) {
    if constexpr (std::is_same<acc_t, float>::value) {
      if (vec) {
        std::copy(gp + i * N + j0, gp + i * N + N, out + j0);
        refine.clear();
        kernel_sum::phi_row_vec(k, out + j0, N - j0, sq[i], sq.data() + j0, refine);
        for (const int64_t j : refine) out[j0 + j] = kernel_sum::phi(k, pair_t(i, j0 + j), acc_t(0));
        if (dist && j0 <= i) out[i] = kernel_sum::phi(k, acc_t(0), acc_t(0));
        return;
      }
    }
    for (int64_t j = j0; j < N; ++j) {
      const acc_t t = pair_t(i, j);
      out[j] = kernel_sum::phi(k, t, t);
    }
  };
  auto dsum = [](const acc_t* p, int64_t j0, int64_t j1) { return cpu::sum_double(p + j0, j1 - j0); };
  auto scaled = [](acc_t* out, const acc_t* df, int64_t j0, int64_t j1, double c) {
    const acc_t cc = static_cast<acc_t>(c);
    for (int64_t j = j0; j < j1; ++j) out[j] = cc * df[j];
  };
  // value over the upper triangle (t and φ are symmetric): each off-diagonal pair counts twice within
  // a sample; the cross block's pairs are (x_i, y_j) with i < n ≤ j, each once. B over its rows.
  // Rows are taken in the order 0, N−1, 1, N−2, ...: a row's work falls with i (the triangle) and x's rows
  // carry B, so contiguous chunks of that order balance the threads where chunks of rows would not.
  const int64_t grain = std::max<int64_t>(2, 4096 / std::max<int64_t>(N, 1));
  const double value = at::parallel_reduce(
      0, N, grain, 0.0,
      [&](int64_t k0, int64_t k1, double acc_v) {
        std::vector<acc_t> f(N), df(N);
        std::vector<int64_t> refine;
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i = (k & 1) ? N - 1 - (k >> 1) : (k >> 1);
          const bool xi = i < n, row_b = need && i >= r0 && i < r1;
          // the pairs (i, j ≥ i): within the sample each off-diagonal pair counts twice and the diagonal
          // once (not at all for the unbiased and U-statistics); an x row also holds its cross pairs
          // (x_i, y_j), each once, less (x_i, y_i) for the U-statistic
          phi_row(kp, i, i, f.data(), refine);
          const acc_t* fp = f.data();
          double s = (xi ? wxx : wyy) * (2.0 * dsum(fp, i + 1, xi ? n : N) + (mask_self ? 0.0 : double(fp[i])));
          if (xi) s += wxy * (mask_pair ? dsum(fp, n, n + i) + dsum(fp, n + i + 1, N) : dsum(fp, n, N));
          acc_v += s;
          if (row_b) {  // B = the block's weight · dφ/dt, 0 at the masked pairs
            phi_row(kd, i, 0, df.data(), refine);
            acc_t* brow = bp + (i - r0) * N;
            scaled(brow, df.data(), 0, n, xi ? 2.0 * wxx : wxy);
            scaled(brow, df.data(), n, N, xi ? wxy : 2.0 * wyy);
            if (mask_self) brow[i] = acc_t(0);
            if (mask_pair) brow[xi ? n + i : i - n] = acc_t(0);
          }
        }
        return acc_v;
      },
      [](double a, double c) { return a + c; });
  if (!dist) {  // the backward reads x and y themselves
    xa = at::empty({0, D}, g.options());
    ya = at::empty({0, D}, g.options());
  }
  return std::make_tuple(at::scalar_tensor(value, g.options()), b, xa, ya);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_mmd_cpu(const at::Tensor& x, const at::Tensor& y, int64_t kernel,
                                      at::ArrayRef<double> params, int64_t estimator, bool need_x, bool need_y) {
  const char* op = "distkern.dense_mmd";
  check_dim(op, "x", x, 2, "(n, D)");
  check_float(op, "x", x);
  check_dim(op, "y", y, 2, "(m, D)");
  check_float(op, "y", y);
  TORCH_CHECK_VALUE(y.size(1) == x.size(1), op, ": y must be (m, D) with D = ", x.size(1), "; got shape ",
                    shape_str(y));
  TORCH_CHECK_VALUE(estimator >= 0 && estimator <= 2, op, ": estimator must be 0 (biased), 1 (unbiased) or 2 (ustat)");
  TORCH_CHECK_VALUE(kernel >= 0 && kernel < kernel_sum::kGaussianD, op, ": unknown kernel id ", kernel);
  const int64_t lo = estimator == 0 ? 1 : 2;
  TORCH_CHECK_VALUE(x.size(0) >= lo && y.size(0) >= lo, op, ": the estimator needs at least ", lo,
                    " sample(s) on each side; got ", x.size(0), " and ", y.size(0));
  TORCH_CHECK_VALUE(estimator != 2 || x.size(0) == y.size(0), op, ": the U-statistic needs n = m");
  if (x.scalar_type() == at::kDouble) return mmd_impl<double>(x, y.to(at::kDouble), kernel, params, estimator, need_x, need_y);
  return mmd_impl<float>(x, y, kernel, params, estimator, need_x, need_y);
}

at::Tensor dense_mmd_grad_cpu(const at::Tensor& b, const at::Tensor& x, const at::Tensor& y, int64_t row0, bool dot) {
  const char* op = "distkern.dense_mmd_grad";
  check_dim(op, "b", b, 2, "(rows, n + m)");
  check_dim(op, "x", x, 2, "(n, D)");
  check_dim(op, "y", y, 2, "(m, D)");
  check_float(op, "b", b);
  const int64_t n = x.size(0), N = n + y.size(0), R = b.size(0);
  TORCH_CHECK_VALUE(y.size(1) == x.size(1), op, ": x ", shape_str(x), " and y ", shape_str(y), " must share D");
  TORCH_CHECK_VALUE(b.size(1) == N && row0 >= 0 && row0 + R <= N, op, ": b ", shape_str(b),
                    " does not match [x; y] of ", N, " rows at row ", row0);
  const at::Tensor xa = x.to(b.scalar_type()), ya = y.to(b.scalar_type());
  at::Tensor bz = cpu::mm_stacked(b, xa, ya);
  if (dot) return bz;
  // 2(rowsum(B)·z_rows − B·z), in place; z_rows = rows [row0, row0 + R) of [x; y], from x and / or y
  const at::Tensor rs = b.sum(1, true);
  for (const auto& part : {std::make_pair(&xa, int64_t(0)), std::make_pair(&ya, n)}) {
    const int64_t lo = std::max(row0, part.second), hi = std::min(row0 + R, part.second + part.first->size(0));
    if (hi > lo)
      bz.narrow(0, lo - row0, hi - lo).sub_(rs.narrow(0, lo - row0, hi - lo) * part.first->narrow(0, lo - part.second, hi - lo));
  }
  return bz.mul_(-2);
}

}  // namespace
}  // namespace distkern

TORCH_LIBRARY_IMPL(distkern, CPU, m) {
  m.impl("dense_gram", &distkern::dense_gram_cpu);
  m.impl("dense_mm", &distkern::dense_mm_cpu);
  m.impl("dense_mmd", &distkern::dense_mmd_cpu);
  m.impl("dense_mmd_grad", &distkern::dense_mmd_grad_cpu);
}

TORCH_LIBRARY_IMPL(distkern, CompositeExplicitAutograd, m) {
  m.impl("dense_gram", &distkern::dense_gram_any);
  m.impl("dense_mm", &distkern::dense_mm_any);
}
