// CPU schedule of the Mahalanobis op: row tiles in parallel (at::parallel_for, OpenMP), each tile
// centred into a cache-sized buffer and multiplied by the factor through BLAS. No N×D temporary:
// the extra memory is one tile per thread (about 256 KiB) whatever N is.
//
// With a lower-triangular factor only the blocks on and below the diagonal are multiplied:
// z[:, j0:j1] = xc[:, j0:] · L[j0:, j0:j1], which skips ~(1 − 1/2 − BJ/2D) of the FLOPs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_reduce.h"
#include "mahalanobis/mahalanobis.h"
#include "mahalanobis/mahalanobis_math.h"

namespace distkern {
namespace mahalanobis {
namespace {

constexpr const char* kFwd = "distkern.mahalanobis";
constexpr const char* kBwd = "distkern.mahalanobis_backward";
constexpr int64_t kBlockCols = 64;  // column block of the triangular product

// Rows per tile: keep the centred tile near 256 KiB (L2-resident), within [16, 1024] rows, and
// small enough that a small N still gives every thread a few tiles.
int64_t tile_rows(int64_t N, int64_t D, int64_t elem) {
  int64_t rows = (256 * 1024) / std::max<int64_t>(1, D * elem);
  const int64_t per_thread = (N + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  rows = std::min(rows, std::max<int64_t>(per_thread, 16));
  return std::clamp<int64_t>(rows, 16, 1024);
}

template <typename scalar_t, typename acc_t>
void center_tile(const scalar_t* x, int64_t sx0, int64_t sx1, int64_t r0, int64_t m, int64_t D,
                 const acc_t* mu, acc_t* xc, acc_t* guard) {
  cpu::center_rows(x + r0 * sx0, sx0, sx1, mu, 0, m, D, xc, D, guard, 1);
}

// z (m×R, contiguous) = xc (m×D) · W (D×R), using only the lower triangle when lower; `next` (lower
// only): memory to prefetch along the product (cpu_gemm.h).
void tile_product(const at::Tensor& xc, const at::Tensor& W, at::Tensor& z, int64_t m, bool lower,
                  const cpu::PrefetchRows* next = nullptr) {
  const int64_t D = W.size(0), R = W.size(1);
  auto a = xc.narrow(0, 0, m);
  auto zm = z.narrow(0, 0, m);
  if (!lower) {
    cpu::mm_out(zm, a, W);
    return;
  }
  if (cpu::mm_tril_out(zm, a, W, next)) return;  // AVX-512: A packed once, zero blocks skipped per 32 columns
  for (int64_t j0 = 0; j0 < R; j0 += kBlockCols) {
    const int64_t nb = std::min(kBlockCols, R - j0);
    auto zj = zm.narrow(1, j0, nb);
    cpu::mm_out(zj, a.narrow(1, j0, D - j0), W.narrow(0, j0, D - j0).narrow(1, j0, nb));
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const Inputs& in, bool lower, at::Tensor& out) {
  const int64_t N = in.N, D = in.D, R = in.R;
  const int64_t TM = tile_rows(N, D, sizeof(acc_t));
  const int64_t ntiles = (N + TM - 1) / TM;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* mu = in.mean.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  const auto opts = in.mean.options();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xc = at::empty({TM, D}, opts);
    // z holds one column block per product when lower (narrowed views of a contiguous buffer
    // keep BLAS from copying), the full width otherwise.
    at::Tensor z = at::empty({TM, R}, opts);
    std::vector<acc_t> guard(TM), sumsq(TM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TM, m = std::min(TM, N - r0);
      center_tile(xp, sx0, sx1, r0, m, D, mu, xc.data_ptr<acc_t>(), guard.data());
      tile_product(xc, in.factor, z, m, lower);
      const acc_t* zp = z.data_ptr<acc_t>();
      for (int64_t i = 0; i < m; ++i) {
        op[r0 + i] = finish(cpu::sum_squares(zp + i * R, R), guard[i]);
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& factor,
                       bool lower) {
  Inputs in = prepare(kFwd, x, mean, factor, lower);
  at::Tensor out = at::empty({in.N}, x.options().dtype(in.acc));
  if (in.N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mahalanobis_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, acc_t>(x, in, lower, out);
  });
  return out;
}

template <typename scalar_t, typename acc_t>
void backward_impl(const at::Tensor& g, const at::Tensor& x, const Inputs& in, bool lower,
                   at::Tensor& gx, at::Tensor& partial, int64_t TM) {
  const int64_t N = in.N, D = in.D, R = in.R;
  const int64_t ntiles = partial.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* mu = in.mean.data_ptr<acc_t>();
  const acc_t* gp = g.data_ptr<acc_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  acc_t* pp = partial.data_ptr<acc_t>();
  const auto opts = in.mean.options();
  const at::Tensor& W = in.factor;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xc = at::empty({TM, D}, opts);
    at::Tensor z = at::empty({TM, R}, opts);
    std::vector<acc_t> guard(TM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TM, m = std::min(TM, N - r0);
      center_tile(xp, sx0, sx1, r0, m, D, mu, xc.data_ptr<acc_t>(), guard.data());
      tile_product(xc, W, z, m, lower);
      acc_t* zp = z.data_ptr<acc_t>();
      for (int64_t i = 0; i < m; ++i) {
        // The guard rides along so a non-finite row gets a NaN gradient.
        const acc_t c = grad_coef(gp[r0 + i]) + guard[i];
        for (int64_t j = 0; j < R; ++j) zp[i * R + j] *= c;
      }
      // gx = z · Wᵀ (into the centred-tile buffer, which is free now). With a lower-triangular W,
      // column block [i0, i1) of the result needs only z[:, :i1].
      auto zm = z.narrow(0, 0, m);
      auto gm = xc.narrow(0, 0, m);
      if (!lower) {
        cpu::mm_out(gm, zm, W.t());
      } else {
        for (int64_t i0 = 0; i0 < D; i0 += kBlockCols) {
          const int64_t nb = std::min(kBlockCols, D - i0);
          auto gj = gm.narrow(1, i0, nb);
          cpu::mm_out(gj, zm.narrow(1, 0, i0 + nb), W.narrow(0, i0, nb).narrow(1, 0, i0 + nb).t());
        }
      }
      const acc_t* src = xc.data_ptr<acc_t>();
      acc_t* prow = pp + t * D;
      for (int64_t k = 0; k < D; ++k) prow[k] = 0;
      for (int64_t i = 0; i < m; ++i) {
        scalar_t* dst = gxp + (r0 + i) * D;
        for (int64_t k = 0; k < D; ++k) {
          const acc_t v = src[i * D + k];
          dst[k] = static_cast<scalar_t>(v);
          prow[k] -= v;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                const at::Tensor& mean, const at::Tensor& factor,
                                                bool lower) {
  Inputs in = prepare(kBwd, x, mean, factor, lower);
  at::Tensor g = prepare_grad(kBwd, grad, x, in);
  at::Tensor gx = at::empty({in.N, in.D}, x.options());
  if (in.N == 0) return {gx, at::zeros({in.D}, in.mean.options())};
  const int64_t elem = in.acc == at::kDouble ? 8 : 4;
  const int64_t TM = tile_rows(in.N, in.D, elem);
  const int64_t ntiles = (in.N + TM - 1) / TM;
  // Per-tile partial sums of ∂L/∂μ = −Σₙ ∂L/∂xₙ, summed in a fixed order: deterministic.
  at::Tensor partial = at::empty({ntiles, in.D}, in.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mahalanobis_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_impl<scalar_t, acc_t>(g, x, in, lower, gx, partial, TM);
  });
  return {gx, partial.sum(0)};
}


// ---- K Gaussians ---------------------------------------------------------------------------------

enum class KRed { None, Min, LogSumExp };

// One tile of rows against all K components → dist (m×K, row stride ldd), then the reduction.
template <typename scalar_t, typename acc_t>
void k_impl(const at::Tensor& x, const KInputs& in, bool lower, KRed red, at::Tensor& out,
            at::Tensor& idx) {
  const int64_t N = in.N, D = in.D, R = in.R, K = in.K;
  const int64_t TM = tile_rows(N, D, sizeof(acc_t));
  const int64_t ntiles = (N + TM - 1) / TM;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* means = in.means.data_ptr<acc_t>();
  const acc_t* bias = in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr;
  acc_t* op = out.data_ptr<acc_t>();
  int64_t* ip = red == KRed::Min ? idx.data_ptr<int64_t>() : nullptr;
  const auto opts = in.means.options();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xc = at::empty({TM, D}, opts);
    at::Tensor z = at::empty({TM, R}, opts);
    at::Tensor dbuf = red == KRed::None ? at::Tensor() : at::empty({TM, K}, opts);
    std::vector<acc_t> guard(TM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TM, m = std::min(TM, N - r0);
      // The N×K output is written in place; a reduction goes through a tile-sized buffer.
      at::Tensor dist = red == KRed::None ? out.narrow(0, r0, m) : dbuf.narrow(0, 0, m);
      acc_t* dp = dist.data_ptr<acc_t>();
      if (in.shared) {
        center_tile(xp, sx0, sx1, r0, m, D, in.center.data_ptr<acc_t>(), xc.data_ptr<acc_t>(), guard.data());
        tile_product(xc, in.factors, z, m, lower);
        cpu::mm_out(dist, z.narrow(0, 0, m), in.V.t());
        const acc_t* zp = z.data_ptr<acc_t>();
        const acc_t* vv = in.vv.data_ptr<acc_t>();
        for (int64_t i = 0; i < m; ++i) {
          const acc_t zz = finish(cpu::sum_squares(zp + i * R, R), guard[i]);
          for (int64_t k = 0; k < K; ++k) dp[i * K + k] = combine_shared(zz, dp[i * K + k], vv[k]);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          center_tile(xp, sx0, sx1, r0, m, D, means + k * D, xc.data_ptr<acc_t>(), guard.data());
          tile_product(xc, in.factors[k], z, m, lower);
          const acc_t* zp = z.data_ptr<acc_t>();
          for (int64_t i = 0; i < m; ++i) {
            dp[i * K + k] = finish(cpu::sum_squares(zp + i * R, R), guard[i]);
          }
        }
      }
      if (red == KRed::Min) {
        for (int64_t i = 0; i < m; ++i) {
          MinAcc<acc_t> a;
          a.init();
          for (int64_t k = 0; k < K; ++k) a.update(dp[i * K + k], k);
          op[r0 + i] = a.v;
          ip[r0 + i] = a.idx;
        }
      } else if (red == KRed::LogSumExp) {
        for (int64_t i = 0; i < m; ++i) {
          LseAcc<acc_t> a;
          a.init();
          for (int64_t k = 0; k < K; ++k) a.update(bias[k] - acc_t(0.5) * dp[i * K + k]);
          op[r0 + i] = a.result();
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> k_cpu(const char* name, const at::Tensor& x,
                                         const at::Tensor& means, const at::Tensor& factors,
                                         bool lower, const c10::optional<at::Tensor>& bias,
                                         KRed red) {
  KInputs in = prepare_k(name, x, means, factors, lower, bias);
  at::Tensor out = red == KRed::None ? at::empty({in.N, in.K}, x.options().dtype(in.acc))
                                     : at::empty({in.N}, x.options().dtype(in.acc));
  at::Tensor idx = at::empty({red == KRed::Min ? in.N : 0}, x.options().dtype(at::kLong));
  if (in.N == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mahalanobis_k_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    k_impl<scalar_t, acc_t>(x, in, lower, red, out, idx);
  });
  return {out, idx};
}

at::Tensor k_none_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors, bool lower) {
  return std::get<0>(k_cpu("distkern.mahalanobis_k", x, means, factors, lower, c10::nullopt, KRed::None));
}

std::tuple<at::Tensor, at::Tensor> k_min_cpu(const at::Tensor& x, const at::Tensor& means,
                                             const at::Tensor& factors, bool lower) {
  return k_cpu("distkern.mahalanobis_k_min", x, means, factors, lower, c10::nullopt, KRed::Min);
}

at::Tensor k_lse_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors,
                     const at::Tensor& bias, bool lower) {
  return std::get<0>(k_cpu("distkern.mahalanobis_k_logsumexp", x, means, factors, lower, bias, KRed::LogSumExp));
}

// ---- per-position Gaussians (PaDiM) ------------------------------------------------------------

// True when the strict upper triangle of the row-major D×R matrix m is all zeros (±0): one branch-free
// OR over the bit patterns with the sign masked, which vectorises.
template <typename factor_t>
bool strict_upper_is_zero(const factor_t* m, int64_t D, int64_t R) {
  using bits_t = std::conditional_t<sizeof(factor_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(factor_t) == 4, uint32_t, uint64_t>>;
  constexpr bits_t mask = static_cast<bits_t>(~(bits_t(1) << (8 * sizeof(bits_t) - 1)));
  bits_t acc = 0;
  for (int64_t k = 0; k < D; ++k) {
    const bits_t* row = reinterpret_cast<const bits_t*>(m + k * R);
    for (int64_t j = k + 1; j < R; ++j) acc |= row[j] & mask;
  }
  return acc == 0;
}

// Parallel over positions; each position's factor is used in place when it is already in the
// accumulation type (fp32 / fp64), or its lower part converted (fp16 / bf16 → fp32, a D×R buffer per
// thread, never a copy of all P factors); its strict upper triangle is checked when lower (one
// vectorised pass), and it multiplies the B centred rows of that position.
template <typename scalar_t, typename factor_t, typename acc_t>
void pos_impl(const at::Tensor& x, const at::Tensor& factors, const PosInputs& in, bool lower,
              at::Tensor& out) {
  const int64_t B = in.B, P = in.P, D = in.D, R = in.R;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sb = x.stride(0), sp = x.stride(1), sd = x.stride(2);
  const factor_t* fp = factors.data_ptr<factor_t>();
  const acc_t* mu = in.means.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  const auto opts = in.means.options();
  constexpr bool in_place = std::is_same_v<factor_t, acc_t>;
  // Positions per block: one where the features are x's contiguous axis; where the positions are (x a
  // (B, P, D) view of a (B, D, P) embedding, as anomalib holds it), up to 16 at a time, centred together
  // (cpu::center_rows) so that each line of x is read once, within ~512 KiB of centred rows.
  const bool gather = std::abs(sd) > std::abs(sp);
  const int64_t PB =
      gather ? std::clamp<int64_t>((512 * 1024) / std::max<int64_t>(1, B * D * int64_t(sizeof(acc_t))), 1, 16) : 1;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor xc = at::empty({PB * B, D}, opts);  // row q·B + b: position pb + q, image b
    at::Tensor z = at::empty({B, R}, opts);
    at::Tensor w = in_place ? at::Tensor() : at::zeros({D, R}, opts);
    std::vector<acc_t> guard(PB * B);
    for (int64_t pb = p0; pb < p1; pb += PB) {
      const int64_t np = std::min(PB, p1 - pb);
      acc_t* xcp = xc.data_ptr<acc_t>();
      for (int64_t b = 0; b < B; ++b)
        cpu::center_rows(xp + b * sb + pb * sp, sp, sd, mu + pb * D, D, np, D, xcp + b * D, B * D, guard.data() + b, B);
      for (int64_t q = 0; q < np; ++q) {
        const int64_t p = pb + q;
        const factor_t* src = fp + p * D * R;
        TORCH_CHECK_VALUE(!lower || strict_upper_is_zero(src, D, R), "distkern.mahalanobis_pos: factors[", p,
                          "] must be lower-triangular when lower=True, but its strict upper triangle has "
                          "non-zero entries; pass lower=False to use general whitening matrices");
        at::Tensor wp_t;
        if constexpr (in_place) {
          wp_t = at::from_blob(const_cast<acc_t*>(reinterpret_cast<const acc_t*>(src)), {D, R}, opts);
        } else {
          acc_t* wp = w.data_ptr<acc_t>();
          for (int64_t k = 0; k < D; ++k) {
            const int64_t jmax = lower ? std::min(k + 1, R) : R;  // the upper triangle stays zero
            for (int64_t j = 0; j < jmax; ++j) wp[k * R + j] = static_cast<acc_t>(src[k * R + j]);
          }
          wp_t = w;
        }
        // the next factor of this thread's positions, all of it, fetched along this product: read in place,
        // panel by panel, it would come from memory one strided line pair at a time, and its check after
        // (the strict upper triangle) then reads from cache too
        const cpu::PrefetchRows next{in_place && p + 1 < p1 ? static_cast<const void*>(src + D * R) : nullptr, D,
                                     static_cast<int64_t>(R * sizeof(factor_t)),
                                     static_cast<int64_t>(R * sizeof(factor_t))};
        tile_product(xc.narrow(0, q * B, B), wp_t, z, B, lower, &next);
        const acc_t* zp = z.data_ptr<acc_t>();
        const acc_t* g = guard.data() + q * B;
        for (int64_t b = 0; b < B; ++b) {
          op[b * P + p] = finish(cpu::sum_squares(zp + b * R, R), g[b]);
        }
      }
    }
  });
}

at::Tensor pos_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& factors, bool lower) {
  PosInputs in = prepare_pos("distkern.mahalanobis_pos", x, means, factors, lower);
  at::Tensor out = at::empty({in.B, in.P}, x.options().dtype(in.acc));
  if (in.B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mahalanobis_pos_cpu", [&] {
    using xs_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<xs_t, double>, double, float>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factors.scalar_type(), "mahalanobis_pos_cpu_f", [&] {
      if constexpr (std::is_same_v<acc_t, double> == std::is_same_v<scalar_t, double>) {
        pos_impl<xs_t, scalar_t, acc_t>(x, factors, in, lower, out);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CPU, m) {
  m.impl("mahalanobis_pos", &pos_cpu);
  m.impl("mahalanobis", &forward_cpu);
  m.impl("mahalanobis_backward", &backward_cpu);
  m.impl("mahalanobis_k", &k_none_cpu);
  m.impl("mahalanobis_k_min", &k_min_cpu);
  m.impl("mahalanobis_k_logsumexp", &k_lse_cpu);
}

}  // namespace mahalanobis
}  // namespace distkern
