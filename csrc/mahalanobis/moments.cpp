// Moments of one batch of a single Gaussian's streaming fit (distkern.gaussian.GaussianStats with float32
// products), x (N, D) → float64 (total, scatter, cubic, quartic):
//
//   total   = Σ_i x_i                       mean = total / N
//   z_i     = fp32(x_i − mean)              centred in float64, rounded once
//   scatter = Σ_i z_i z_iᵀ                  float32 products over ≤ kTileRows rows, summed in float64
//   s_i     = Σ_d z_id²  (float64)          cubic = Σ_i s_i z_i,   quartic = Σ_i s_i²
//
// Why an op: the same statistics as torch calls (x.sum(0, dtype=float64), the centring, a second centring
// on z's own mean, (z·z).sum(1), zᵀz) allocate ~56 MiB of temporaries per batch of 8192 × 256 (the float64
// column sums cast the whole batch first). Each is fresh memory the kernel zero-fills page by page: at
// 1–4 µs per fault on the VMs we measure, the 1M × 256 fit took 1.2–2.3 s (3.4 s with glibc's mmap threshold
// pinned, so that every temporary is a fresh mapping) against 1.1 s for a plain XᵀX. Here the centred rows
// go through a tile of each task that stays in L2, and the product computes the upper block triangle of zᵀz
// only (column panels of 32 against the rows up to their end: 56 % of the square's FMAs at D = 256).
//
// Other devices (CompositeExplicitAutograd) compute the same formulas with ATen calls, the scatter as one
// float32 product of the whole batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "common/cpu_gemm.h"
#include "common/macros.h"

namespace distkern {
namespace {

constexpr const char* kOp = "distkern.centred_moments";
// Rows per tile: float32 products accumulate over at most this many rows before their sum goes to float64,
// and the tile (rows × D float32) is kept near 512 KiB, within L2, by fewer rows at large D (not below 64).
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileBytes = int64_t(512) << 10;
// Rows of c per product of the triangle (four of the AVX-512 micro-kernel's 12-row tiles; a multiple of 16
// floats, so that each product's columns start on a cache line).
constexpr int64_t kBlock = 48;

template <typename T>
DK_CPU_MULTIVERSION void add_rows(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t D,
                                  double* __restrict__ acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ld;
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(xr[d]);
  }
}

// z rows (ld D) = fp32(x − mean); cubic += s_i z_i; returns Σ s_i² for the rows.
template <typename T>
DK_CPU_MULTIVERSION double centre_rows(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t D,
                                       const double* __restrict__ mean, float* __restrict__ z,
                                       int64_t ldz, double* __restrict__ cubic) {
  double quartic = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ld;
    float* zr = z + r * ldz;
    for (int64_t d = 0; d < D; ++d) zr[d] = static_cast<float>(static_cast<double>(xr[d]) - mean[d]);
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

// acc (D × D, float64) += the upper triangle (j ≥ i) of c (D × D, float32)
DK_CPU_MULTIVERSION void add_upper(const float* __restrict__ c, int64_t D, double* __restrict__ acc) {
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = i; j < D; ++j) acc[i * D + j] += static_cast<double>(c[i * D + j]);
}

// c[i, j] = Σ_k z[k, i] z[k, j] over the tile's rows (z: rows × D, leading dimension ldz) for j ≥ i, and the
// rest of each diagonal block: per block of kBlock rows of c from i0, the columns from i0 on. A is the block's
// kBlock columns of z, packed once per product (D · rows floats in all); B is z itself, read in place.
void upper_product(const float* z, int64_t ldz, int64_t rows, int64_t D, float* c) {
  for (int64_t i0 = 0; i0 < D; i0 += kBlock) {
    const int64_t h = std::min(kBlock, D - i0), n = D - i0;
    if (!cpu::sgemm(h, n, rows, z + i0, 1, ldz, z + i0, ldz, 1, c + i0 * D + i0, D, /*accumulate=*/false)) {
      const at::Tensor zt = at::from_blob(const_cast<float*>(z), {rows, D}, {ldz, 1}, at::kFloat);
      at::Tensor out = at::from_blob(c + i0 * D + i0, {h, n}, {D, 1}, at::kFloat);
      at::mm_out(out, zt.narrow(1, i0, h).t(), zt.narrow(1, i0, n));
    }
  }
}

// A task's buffers, kept by its thread from call to call: freshly allocated per batch they were page faults
// (the cost this op removes; ~1.4 MiB a thread at D = 256), unless over kKeepBytes (large D, where the
// products dwarf the faults).
constexpr size_t kKeepBytes = size_t(16) << 20;
struct Scratch {
  std::vector<double> scatter, cubic;  // the task's float64 sums (upper triangle of the scatter)
  std::vector<float> z, c;             // the centred tile, and its float32 product
  void release_if_large() {
    if (scatter.capacity() * sizeof(double) + c.capacity() * sizeof(float) + z.capacity() * sizeof(float) >
        kKeepBytes) {
      std::vector<double>().swap(scatter);
      std::vector<float>().swap(c);
      std::vector<float>().swap(z);
    }
  }
};
thread_local Scratch tls_scratch;

template <typename T>
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
  std::fill(tot, tot + D, 0.0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t d = 0; d < D; ++d) tot[d] += part[c * D + d];
  std::vector<double> mean(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) mean[d] = tot[d] / static_cast<double>(N);

  // the centred tiles, in parallel over tiles; each task keeps its own float64 sums, added in task order
  const int64_t tile = std::min(kTileRows, std::max<int64_t>(64, kTileBytes / (4 * D)));
  const int64_t ntiles = (N + tile - 1) / tile;
  // the tile's rows 64 bytes longer than a multiple of 64: rows a multiple of 1 KiB apart would share few L1
  // sets, and the micro-kernel streams 32-column panels down them
  const int64_t ldz = (D + 15) / 16 * 16 + 16;
  struct Part {
    Scratch* s;
    double quartic;
  };
  std::vector<Part> parts(static_cast<size_t>(std::max(1, at::get_num_threads())), Part{nullptr, 0.0});
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch& s = tls_scratch;
    Part& p = parts[static_cast<size_t>(at::get_thread_num())];
    if (p.s == nullptr) {
      p.s = &s;
      s.scatter.assign(static_cast<size_t>(D * D), 0.0);
      s.cubic.assign(static_cast<size_t>(D), 0.0);
      s.z.resize(static_cast<size_t>(tile * ldz));
      s.c.resize(static_cast<size_t>(D * D));
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, rows = std::min(tile, N - r0);
      p.quartic += centre_rows<T>(xp + r0 * ld, ld, rows, D, mean.data(), s.z.data(), ldz, s.cubic.data());
      upper_product(s.z.data(), ldz, rows, D, s.c.data());
      add_upper(s.c.data(), D, s.scatter.data());
    }
  });
  double* sc = scatter.data_ptr<double>();
  double* cu = cubic.data_ptr<double>();
  double q = 0.0;
  for (const Part& p : parts) {  // in the order of the threads (outputs are zeros)
    if (p.s == nullptr) continue;
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = i; j < D; ++j) sc[i * D + j] += p.s->scatter[i * D + j];
    for (int64_t d = 0; d < D; ++d) cu[d] += p.s->cubic[d];
    q += p.quartic;
    p.s->release_if_large();
  }
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < i; ++j) sc[i * D + j] = sc[j * D + i];
  quartic.fill_(q);
}

void check_x(const at::Tensor& x) {
  check_float(kOp, "x", x);
  check_dim(kOp, "x", x, 2, "(N, D)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> centred_moments_cpu(const at::Tensor& x_in) {
  check_x(x_in);
  const int64_t N = x_in.size(0), D = x_in.size(1);
  const auto f64 = x_in.options().dtype(at::kDouble);
  at::Tensor total = at::zeros({D}, f64), scatter = at::zeros({D, D}, f64), cubic = at::zeros({D}, f64);
  at::Tensor quartic = at::zeros({}, f64);
  if (N == 0 || D == 0) return {total, scatter, cubic, quartic};
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= D ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centred_moments", [&] {
    moments_cpu<scalar_t>(x, total, scatter, cubic, quartic);
  });
  return {total, scatter, cubic, quartic};
}

// Any other device: the same formulas as ATen calls.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> centred_moments_any(const at::Tensor& x) {
  check_x(x);
  const int64_t N = x.size(0), D = x.size(1);
  const auto f64 = x.options().dtype(at::kDouble);
  if (N == 0 || D == 0)
    return {at::zeros({D}, f64), at::zeros({D, D}, f64), at::zeros({D}, f64), at::zeros({}, f64)};
  const at::Tensor total = x.sum(0, /*keepdim=*/false, at::kDouble);
  const at::Tensor z = (x.to(at::kDouble) - total / static_cast<double>(N)).to(at::kFloat);
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
