// CPU schedule of kernel_matmul: row tiles in parallel; for each block of y, the x·y products
// through BLAS into a cache-sized buffer, φ applied in place, and the block's K·v added to the
// output tile. The N×M kernel matrix is never stored: memory is one tile per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_gemm.h"
#include "common/cpu_reduce.h"
#include "kernel_sum/kernel_math.h"
#include "kernel_sum/kernel_sum.h"
#include "kernel_sum/phi_cpu.h"

namespace distkern {
namespace kernel_sum {
namespace {

constexpr int64_t kRows = 128;
constexpr int64_t kCols = 512;

template <typename scalar_t, typename acc_t>
void impl(const at::Tensor& x, const Inputs& in, at::Tensor& out) {
  const int64_t N = in.N, M = in.M, D = in.D;
  const int64_t ntiles = (N + kRows - 1) / kRows;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* cp = in.center.data_ptr<acc_t>();
  const acc_t* yyp = in.yy.data_ptr<acc_t>();
  const acc_t* ycp = in.yc.data_ptr<acc_t>();
  const auto opts = in.yc.options();
  const Params kp = in.kp;
  const bool dist = uses_distance(kp.kind);
  const bool vec = std::is_same<acc_t, float>::value && phi_vec_takes(kp);  // φ on vector lanes
  // yᵀ once (D×M, rows contiguous) when the products run on distkern's kernel, which then reads the
  // y blocks in place instead of packing them per tile
  const at::Tensor yT =
      std::is_same<acc_t, float>::value && cpu::fast_gemm_enabled() ? in.yc.t().contiguous() : at::Tensor();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xc = at::empty({kRows, D}, opts);
    at::Tensor kb = at::empty({kRows, std::min(kCols, std::max<int64_t>(M, 1))}, opts);
    std::vector<acc_t> xx(kRows);
    std::vector<int64_t> refine;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRows, m = std::min(kRows, N - r0);
      acc_t* xcp = xc.data_ptr<acc_t>();
      // centred rows and their norms (a non-finite row: xx is NaN; center_rows' guard, written to xx first,
      // is not needed)
      cpu::center_rows(xp + r0 * sx0, sx0, sx1, cp, 0, m, D, xcp, D, xx.data(), 1);
      for (int64_t i = 0; i < m; ++i) xx[i] = cpu::sum_squares(xcp + i * D, D);
      at::Tensor o = out.narrow(0, r0, m);
      o.zero_();
      for (int64_t j0 = 0; j0 < M; j0 += kCols) {
        const int64_t nb = std::min(kCols, M - j0);
        at::Tensor K = at::from_blob(kb.data_ptr<acc_t>(), {m, nb}, opts);
        cpu::mm_out(K, xc.narrow(0, 0, m), yT.defined() ? yT.narrow(1, j0, nb) : in.yc.narrow(0, j0, nb).t());
        acc_t* kp_ = K.data_ptr<acc_t>();
        // r² of pair (i, j) from the coordinates, for the pairs the norm form does not resolve
        auto exact_r2 = [&](int64_t i, int64_t j) { return cpu::sq_distance(xcp + i * D, ycp + (j0 + j) * D, D); };
        if (vec) {  // 16 or 8 pairs per instruction; the few unresolved pairs again from the coordinates
          if constexpr (std::is_same<acc_t, float>::value) {
            for (int64_t i = 0; i < m; ++i) {
              refine.clear();
              phi_row_vec(kp, kp_ + i * nb, nb, xx[i], yyp + j0, refine);
              for (const int64_t j : refine) kp_[i * nb + j] = phi(kp, exact_r2(i, j), acc_t(0));
            }
          }
        } else {
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < nb; ++j) {
              const acc_t dot = kp_[i * nb + j];
              acc_t r2 = 0;
              if (dist) {
                r2 = sq_dist(xx[i], yyp[j0 + j], dot);
                if (needs_exact_r2(r2, xx[i], yyp[j0 + j], kp.exact_frac)) r2 = exact_r2(i, j);
              }
              kp_[i * nb + j] = phi(kp, r2, dot);
            }
        }
        if (in.v.defined()) {
          cpu::mm_out(o, K, in.v.narrow(0, j0, nb), true);
        } else {
          o.add_(K.sum(1, true));
        }
      }
    }
  });
}

at::Tensor kernel_matmul_cpu(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& v,
                             int64_t kind, at::ArrayRef<double> params) {
  Inputs in = prepare("distkern.kernel_matmul", x, y, v, kind, params);
  at::Tensor out = at::zeros({in.N, in.C}, x.options().dtype(in.acc));
  if (in.N > 0 && in.M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kernel_matmul_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      impl<scalar_t, acc_t>(x, in, out);
    });
  }
  return in.v.defined() ? out : out.squeeze(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CPU, m) { m.impl("kernel_matmul", &kernel_matmul_cpu); }

}  // namespace kernel_sum
}  // namespace distkern
