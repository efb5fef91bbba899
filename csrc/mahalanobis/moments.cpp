// Moments of one batch of a single Gaussian's streaming fit (distkern.gaussian.GaussianStats), x (N, D) →
// float64 (total, scatter, cubic, quartic):
//
//   total   = Σ_i x_i                       mean = total / N
//   z_i     = x_i − mean                    in float64; rounded once to float32 for float32 products
//   scatter = Σ_i z_i z_iᵀ                  float32 products over ≤ kTileRows rows, summed in float64 (or
//                                           float64 products throughout, double_products)
//   s_i     = Σ_d z_id²  (float64)          cubic = Σ_i s_i z_i,   quartic = Σ_i s_i²
//
// Why an op: the same statistics as torch calls (x.sum(0, dtype=float64), the centring, a second centring
// on z's own mean, (z·z).sum(1), zᵀz) allocate ~56 MiB of temporaries per batch of 8192 × 256 (the float64
// column sums cast the whole batch first). Each is fresh memory the kernel zero-fills page by page: at
// 1–4 µs per fault on the VMs we measure, the 1M × 256 fit took 1.2–2.3 s (3.4 s with glibc's mmap threshold
// pinned, so that every temporary is a fresh mapping) against 1.1 s for a plain XᵀX; with float64 products
// 2.5–3.6 s. Here the centred rows go through a tile of each task that stays in L2, and the product computes
// the upper block triangle of zᵀz only (blocks of 48 rows against the columns from the block on: 59 % of the
// square's FMAs at D = 256): 0.57–0.65 s, and 1.24 s with float64 products (through torch's BLAS).
//
// Other devices (CompositeExplicitAutograd) compute the same formulas with ATen calls, the scatter as one
// product of the whole batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cpu_gemm.h"
#include "common/macros.h"

namespace distkern {
namespace {

constexpr const char* kOp = "distkern.centred_moments";
// Rows per tile: float32 products accumulate over at most this many rows before their sum goes to float64,
// and the tile (rows × D) is kept near 512 KiB, within L2, by fewer rows at large D (not below 64).
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileBytes = int64_t(512) << 10;
// Rows of the scatter per block of the triangular product (four of the AVX-512 micro-kernel's 12-row tiles; a
// multiple of 16 floats, so that each block's columns start on a cache line).
constexpr int64_t kBlock = 48;
// The tiles are split into at most kGroups groups of consecutive tiles, each summed into its own float64
// accumulators, and the groups are added in order: the result does not depend on the number of threads (a
// process with one thread, such as a torch.distributed worker, gets the same bits). The groups' scatters are
// capped at kGroupBytes in all: from D ≈ 2900 there is one group, and the blocks of each tile's product run in
// parallel instead.
constexpr int64_t kGroups = 8;
constexpr int64_t kGroupBytes = int64_t(64) << 20;
// Buffers kept from call to call up to this size (fresh per batch they were page faults: the cost this op
// removes); larger ones (large D, where the products dwarf the faults) are freed after the call.
constexpr size_t kKeepBytes = size_t(16) << 20;

template <typename T>
DK_CPU_MULTIVERSION void add_rows(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t D,
                                  double* __restrict__ acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ld;
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(xr[d]);
  }
}

// z rows (leading dimension ldz) = P(x − mean), the difference in float64 (P: the products' type); with
// s_i = ‖z_i‖² in float64, cubic += s_i z_i; returns Σ s_i² over the rows.
template <typename T, typename P>
DK_CPU_MULTIVERSION double centre_rows(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t D,
                                       const double* __restrict__ mean, P* __restrict__ z, int64_t ldz,
                                       double* __restrict__ cubic) {
  double quartic = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ld;
    P* zr = z + r * ldz;
    for (int64_t d = 0; d < D; ++d) zr[d] = static_cast<P>(static_cast<double>(xr[d]) - mean[d]);
    double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) p[j] += static_cast<double>(zr[d + j]) * static_cast<double>(zr[d + j]);
    double t = 0.0;
    for (; d < D; ++d) t += static_cast<double>(zr[d]) * static_cast<double>(zr[d]);
    const double s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])) + t;
    for (int64_t e = 0; e < D; ++e) cubic[e] += s * static_cast<double>(zr[e]);
    quartic += s * s;
  }
  return quartic;
}

// acc[i, j] (leading dimension D) += c[i − i0, j − i0] (leading dimension n = D − i0) for i in [i0, i0 + h), j ≥ i
DK_CPU_MULTIVERSION void add_block(const float* __restrict__ c, int64_t h, int64_t i0, int64_t D,
                                   double* __restrict__ acc) {
  const int64_t n = D - i0;
  for (int64_t r = 0; r < h; ++r) {
    const float* cr = c + r * n;
    double* ar = acc + (i0 + r) * D + i0;
    for (int64_t j = r; j < n; ++j) ar[j] += static_cast<double>(cr[j]);
  }
}

thread_local std::vector<float> tls_c;  // a block's float32 product

// acc[i, j] += Σ_k z[k, i] z[k, j] over the tile's rows (z: rows × D, leading dimension ldz) for j ≥ i (and the
// rest of each diagonal block): per block of kBlock rows from i0, the columns from i0 on — in float32 into a
// block tile, then added in float64 (A, the block's columns, packed per product; B, z from column i0, read in
// place), or in float64 through torch's BLAS straight into acc. The blocks run in parallel where this is
// called outside a parallel region (one group: large D), each whole on one thread.
template <typename P>
void upper_product(const P* z, int64_t ldz, int64_t rows, int64_t D, double* acc) {
  const int64_t nb = (D + kBlock - 1) / kBlock;
  // blocks 0, nb−1, 1, nb−2, ...: a block's work falls with i0, so that consecutive ranges balance
  auto block = [&](int64_t q) {
    const int64_t b = q % 2 == 0 ? q / 2 : nb - 1 - q / 2;
    const int64_t i0 = b * kBlock, h = std::min(kBlock, D - i0), n = D - i0;
    if constexpr (std::is_same_v<P, double>) {
      const at::Tensor zt = at::from_blob(const_cast<double*>(z), {rows, D}, {ldz, 1}, at::kDouble);
      at::Tensor out = at::from_blob(acc + i0 * D + i0, {h, n}, {D, 1}, at::kDouble);
      out.addmm_(zt.narrow(1, i0, h).t(), zt.narrow(1, i0, n));
    } else {
      tls_c.resize(static_cast<size_t>(h * n));
      float* c = tls_c.data();
      if (!cpu::sgemm(h, n, rows, z + i0, 1, ldz, z + i0, ldz, 1, c, n, /*accumulate=*/false)) {
        const at::Tensor zt = at::from_blob(const_cast<float*>(z), {rows, D}, {ldz, 1}, at::kFloat);
        at::Tensor out = at::from_blob(c, {h, n}, at::kFloat);
        at::mm_out(out, zt.narrow(1, i0, h).t(), zt.narrow(1, i0, n));
      }
      add_block(c, h, i0, D, acc);
    }
  };
  if (at::in_parallel_region() || nb == 1 || rows * D * D < (int64_t(1) << 22)) {
    for (int64_t q = 0; q < nb; ++q) block(q);
  } else {
    at::parallel_for(0, nb, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) block(q);
    });
  }
}

template <typename P>
void keep_or_free(std::vector<P>& v) {
  if (v.capacity() * sizeof(P) > kKeepBytes) std::vector<P>().swap(v);
}

// Each group's float64 sums (in the calling thread, kept across calls), and each thread's tile.
thread_local std::vector<double> tls_groups;
thread_local std::vector<float> tls_z32;
thread_local std::vector<double> tls_z64;

template <typename T, typename P>
void moments_cpu(const at::Tensor& x, at::Tensor& total, at::Tensor& scatter, at::Tensor& cubic, at::Tensor& quartic) {
  const int64_t N = x.size(0), D = x.size(1), ld = x.stride(0);
  const T* xp = x.data_ptr<T>();
  // the column sums: fixed chunks of rows (the result does not depend on the thread count), summed in order
  const int64_t chunk = std::max<int64_t>(kTileRows, (N + 63) / 64), nchunks = (N + chunk - 1) / chunk;
  std::vector<double> part(static_cast<size_t>(nchunks * D), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk;
      add_rows<T>(xp + r0 * ld, ld, std::min(chunk, N - r0), D, part.data() + c * D);
    }
  });
  double* tot = total.data_ptr<double>();
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t d = 0; d < D; ++d) tot[d] += part[c * D + d];
  std::vector<double> mean(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) mean[d] = tot[d] / static_cast<double>(N);

  // The centred tiles. Their rows 64 bytes longer than a multiple of 64 bytes: rows a multiple of 1 KiB apart
  // would share few L1 sets, and the micro-kernel streams 32-column panels down them.
  const int64_t psize = static_cast<int64_t>(sizeof(P));
  const int64_t tile = std::min(kTileRows, std::max<int64_t>(64, kTileBytes / (psize * D)));
  const int64_t ntiles = (N + tile - 1) / tile;
  const int64_t ldz = (D + 15) / 16 * 16 + 64 / psize;
  const int64_t G = std::min(ntiles, std::clamp<int64_t>(kGroupBytes / (8 * D * D), 1, kGroups));
  const int64_t per = D * D + D + 1;  // a group's scatter (upper triangle), cubic, quartic
  tls_groups.assign(static_cast<size_t>(G * per), 0.0);
  double* groups = tls_groups.data();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<P>& zbuf = [&]() -> std::vector<P>& {
      if constexpr (std::is_same_v<P, double>) return tls_z64; else return tls_z32;
    }();
    zbuf.resize(static_cast<size_t>(tile * ldz));
    for (int64_t g = g0; g < g1; ++g) {
      double* acc = groups + g * per;
      for (int64_t t = g * ntiles / G; t < (g + 1) * ntiles / G; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, N - r0);
        acc[D * D + D] +=
            centre_rows<T, P>(xp + r0 * ld, ld, rows, D, mean.data(), zbuf.data(), ldz, acc + D * D);
        upper_product<P>(zbuf.data(), ldz, rows, D, acc);
      }
    }
    keep_or_free(zbuf);
    keep_or_free(tls_c);
  });
  double* sc = scatter.data_ptr<double>();
  double* cu = cubic.data_ptr<double>();
  double q = 0.0;
  for (int64_t g = 0; g < G; ++g) {  // in order
    const double* acc = groups + g * per;
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = i; j < D; ++j) sc[i * D + j] += acc[i * D + j];
    for (int64_t d = 0; d < D; ++d) cu[d] += acc[D * D + d];
    q += acc[D * D + D];
  }
  keep_or_free(tls_groups);
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < i; ++j) sc[i * D + j] = sc[j * D + i];
  quartic.fill_(q);
}

void check_x(const at::Tensor& x) {
  check_float(kOp, "x", x);
  check_dim(kOp, "x", x, 2, "(N, D)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> centred_moments_cpu(const at::Tensor& x_in,
                                                                                bool double_products) {
  check_x(x_in);
  const int64_t N = x_in.size(0), D = x_in.size(1);
  const auto f64 = x_in.options().dtype(at::kDouble);
  at::Tensor total = at::zeros({D}, f64), scatter = at::zeros({D, D}, f64), cubic = at::zeros({D}, f64);
  at::Tensor quartic = at::zeros({}, f64);
  if (N == 0 || D == 0) return {total, scatter, cubic, quartic};
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= D ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centred_moments", [&] {
    if (double_products) {
      moments_cpu<scalar_t, double>(x, total, scatter, cubic, quartic);
    } else {
      moments_cpu<scalar_t, float>(x, total, scatter, cubic, quartic);
    }
  });
  return {total, scatter, cubic, quartic};
}

// Any other device: the same formulas as ATen calls.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> centred_moments_any(const at::Tensor& x,
                                                                                bool double_products) {
  check_x(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto f64 = x.options().dtype(at::kDouble);
  if (N == 0 || D == 0)
    return {at::zeros({D}, f64), at::zeros({D, D}, f64), at::zeros({D}, f64), at::zeros({}, f64)};
  const at::Tensor total = x.sum(0, /*keepdim=*/false, at::kDouble);
  const at::Tensor zd0 = x.to(at::kDouble) - total / static_cast<double>(N);
  const at::Tensor z = double_products ? zd0 : zd0.to(at::kFloat);
  const at::Tensor zd = z.to(at::kDouble);
  const at::Tensor s = zd.square().sum(1);
  return {total, at::mm(z.t(), z).to(at::kDouble), at::mv(zd.t(), s), s.square().sum()};
}

}  // namespace
}  // namespace distkern

TORCH_LIBRARY_IMPL(distkern, CPU, m) {
  m.impl("centred_moments", &distkern::centred_moments_cpu);
}

TORCH_LIBRARY_IMPL(distkern, CompositeExplicitAutograd, m) {
  m.impl("centred_moments", &distkern::centred_moments_any);
}
