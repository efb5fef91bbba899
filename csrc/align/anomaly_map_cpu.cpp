// CPU schedule of the anomaly map: tiles of 64 patch rows per (image) in parallel; for each layer the
// tile is read in place (fp32 / fp64) or converted to fp32 once (fp16 / bf16), its row norms taken
// (vectorised, from cache), its dot products with the K direction vectors (64×D · D×K, common/cpu_gemm.h),
// then σ (on vector lanes in float32) and the running mean. Each patch token is read once; memory is one
// tile per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "align/anomaly_map.h"
#include "align/anomaly_map_math.h"
#include "common/cpu_gemm.h"
#include "common/cpu_reduce.h"
#include "common/simd_math.h"

namespace distkern {
namespace align {
namespace {

constexpr int64_t kRows = 64;

// dst = src converted to the accumulation type (fp16 / bf16 tokens), returning Σ dst².
template <typename scalar_t, typename acc_t>
DK_CPU_MULTIVERSION acc_t convert_sumsq(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
  return cpu::sum_squares(dst, n);
}

#define DK_LANES_FILE "align/sigmoid_lanes.inc"
#include "common/simd_targets.inc"

// acc[i] += Σ_k σ(z[i·K + k] · inv[i]) for the m rows of a tile: on 16 or 8 lanes with distkern's exp
// (common/simd_lanes.inc) where cpu::math_isa() names a set (float32), else kernel_math's sigmoid.
template <typename acc_t>
void add_sigmoid_sums(const acc_t* z, int64_t m, int64_t K, const acc_t* inv, acc_t* acc, cpu::Isa isa) {
#if DK_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == cpu::Isa::Avx512) return on_avx512::sigmoid_sums(z, m, K, inv, acc);
    if (isa == cpu::Isa::Avx2) return on_avx2::sigmoid_sums(z, m, K, inv, acc);
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < m; ++i) {
    acc_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += sigmoid(z[i * K + k] * inv[i]);
    acc[i] += s;
  }
}

template <typename scalar_t>
void forward(const MapInputs& in, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = in.L, B = in.B, P = in.P, D = in.D, K = in.K;
  const int64_t ntiles = (P + kRows - 1) / kRows;
  const scalar_t* xp = in.patches.data_ptr<scalar_t>();
  // the directions as D×K (their product's B, rows contiguous: distkern's kernel reads it in place)
  const at::Tensor dirs_t = in.dirs.transpose(-1, -2).contiguous();
  const acc_t* dp = dirs_t.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  const auto opts = in.dirs.options();
  const acc_t scale = acc_t(1) / static_cast<acc_t>(L * K);
  const cpu::Isa isa = cpu::math_isa();  // the sigmoid's vector lanes, if any
  at::parallel_for(0, B * ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor xt = at::empty({kRows, D}, opts);
    at::Tensor zt = at::empty({kRows, K}, opts);
    std::vector<acc_t> inv(kRows), acc(kRows);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / ntiles, r0 = (t % ntiles) * kRows, m = std::min(kRows, P - r0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* src = xp + ((l * B + b) * P + r0) * D;
        at::Tensor tile;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {  // float32 / float64 tokens: read in place
          for (int64_t i = 0; i < m; ++i) inv[i] = inv_norm(cpu::sum_squares(src + i * D, D));
          tile = at::from_blob(const_cast<acc_t*>(reinterpret_cast<const acc_t*>(src)), {m, D}, opts);
        } else {
          acc_t* x = xt.data_ptr<acc_t>();
          for (int64_t i = 0; i < m; ++i) inv[i] = inv_norm(convert_sumsq(src + i * D, x + i * D, D));
          tile = xt.narrow(0, 0, m);
        }
        const int64_t lo = in.Ld == 1 ? 0 : l, bo = in.Bd == 1 ? 0 : b;
        const at::Tensor dirs = at::from_blob(const_cast<acc_t*>(dp) + (lo * in.Bd + bo) * K * D, {D, K}, opts);
        at::Tensor z = zt.narrow(0, 0, m);
        cpu::mm_out(z, tile, dirs);
        add_sigmoid_sums(z.data_ptr<acc_t>(), m, K, inv.data(), acc.data(), isa);
      }
      for (int64_t i = 0; i < m; ++i) op[b * P + r0 + i] = acc[i] * scale;
    }
  });
}

at::Tensor anomaly_map_cpu(const at::Tensor& patches, const at::Tensor& dirs) {
  MapInputs in = prepare_map("distkern.anomaly_map", patches, dirs);
  at::Tensor out = at::zeros({in.B, in.P}, in.dirs.options());
  if (in.B == 0 || in.P == 0) return out;
  if (in.D == 0) return out.fill_(0.5);  // x̂ = 0: σ(0) for every pair
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.patches.scalar_type(), "anomaly_map",
                                  [&] { forward<scalar_t>(in, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CPU, m) { m.impl("anomaly_map", &anomaly_map_cpu); }

}  // namespace align
}  // namespace distkern
