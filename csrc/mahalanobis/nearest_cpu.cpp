// CPU schedule of nearest_cosine: row tiles in parallel, each multiplied by column blocks of the
// normalised references through BLAS into a cache-sized buffer, keeping a running argmax per row
// (the N×M similarity matrix is never stored).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_gemm.h"
#include "mahalanobis/mahalanobis_math.h"
#include "mahalanobis/nearest.h"

namespace distkern {
namespace nearest {
namespace {

constexpr int64_t kRefBlock = 512;

template <typename scalar_t, typename acc_t>
void nearest_impl(const at::Tensor& x, const Inputs& in, at::Tensor& out, at::Tensor& idx) {
  const int64_t N = in.N, D = in.D, M = in.M;
  const int64_t TM = std::clamp<int64_t>((64 * 1024) / std::max<int64_t>(D, 1), 16, 256);
  const int64_t ntiles = (N + TM - 1) / TM;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* inv = in.inv_norm.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const auto opts = in.rhat.options();
  // r̂ᵀ once (D×M) when the products run on distkern's kernel: it reads the blocks in place
  const at::Tensor rT =
      std::is_same<acc_t, float>::value && cpu::fast_gemm_enabled() ? in.rhat.t().contiguous() : at::Tensor();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xt = at::empty({TM, D}, opts);
    at::Tensor dots = at::empty({TM, std::min(kRefBlock, M)}, opts);
    at::Tensor bval_buf = at::empty({TM}, opts), bidx_buf = at::empty({TM}, opts.dtype(at::kLong));
    std::vector<mahalanobis::MinAcc<acc_t>> best(TM);
    std::vector<acc_t> guard(TM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TM, m = std::min(TM, N - r0);
      acc_t* xtp = xt.data_ptr<acc_t>();
      for (int64_t i = 0; i < m; ++i) {
        acc_t g = 0;
        for (int64_t k = 0; k < D; ++k) {
          const acc_t v = static_cast<acc_t>(xp[(r0 + i) * sx0 + k * sx1]);
          g += v - v;
          xtp[i * D + k] = v;
        }
        guard[i] = g;
        best[i].init();
      }
      for (int64_t j0 = 0; j0 < M; j0 += kRefBlock) {
        const int64_t nb = std::min(kRefBlock, M - j0);
        auto dm = at::from_blob(dots.data_ptr<acc_t>(), {m, nb}, opts);
        cpu::mm_out(dm, xt.narrow(0, 0, m), rT.defined() ? rT.narrow(1, j0, nb) : in.rhat.narrow(0, j0, nb).t());
        // ATen's vectorised max over the block (NaN propagates), then one merge per row.
        // views of the row count of this tile: max_out writes them in place (a tail tile never resizes a buffer)
        at::Tensor bval = bval_buf.narrow(0, 0, m), bidx = bidx_buf.narrow(0, 0, m);
        at::max_out(bval, bidx, dm, 1);
        const acc_t* vp = bval.data_ptr<acc_t>();
        const int64_t* jp = bidx.data_ptr<int64_t>();
        for (int64_t i = 0; i < m; ++i) best[i].update(-vp[i] + guard[i], j0 + jp[i]);
      }
      for (int64_t i = 0; i < m; ++i) {
        op[r0 + i] = -best[i].v * inv[r0 + i];
        ip[r0 + i] = best[i].idx;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nearest_cpu(const at::Tensor& x, const at::Tensor& refs) {
  Inputs in = prepare("distkern.nearest_cosine", x, refs);
  at::Tensor out = at::empty({in.N}, x.options().dtype(in.acc));
  at::Tensor idx = at::empty({in.N}, x.options().dtype(at::kLong));
  if (in.N == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_cosine_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    nearest_impl<scalar_t, acc_t>(x, in, out, idx);
  });
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CPU, m) { m.impl("nearest_cosine", &nearest_cpu); }

}  // namespace nearest
}  // namespace distkern
