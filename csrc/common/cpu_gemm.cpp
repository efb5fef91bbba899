// AVX-512 single-precision products for the CPU paths (see cpu_gemm.h for why and the contract).
//
// Schedule (GotoBLAS order, sized for a 48 KiB L1 / 1 MiB L2): for each block of ≤ 512 columns and
// each K block of 256, the B block is read in place when its rows are contiguous (else packed once,
// zero-padded to 32 columns); for each 12-row block of A, A is packed k-major (12 × 256 floats, 12
// KiB, in L1) and the 12×32 micro-kernel runs over the column panels. Per k the micro-kernel does 2
// vector loads of B, 12 broadcasts of A and 24 FMAs: 0.23 bytes of L1 traffic per FLOP.
// Two variants: a lower-triangular B (tril_driver: A packed once, B's panels outermost, each from its
// diagonal) and z·zᵀ (gram_tile: dot products along the rows of z, upper-triangle tiles only).
#include "common/cpu_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/macros.h"

#if DK_AVX512_CODE
#include <immintrin.h>
#endif

namespace distkern {
namespace cpu {
namespace {

constexpr int kMR = 12;     // rows of the register tile (broadcasts)
constexpr int kNR = 32;     // columns of the register tile (two 16-float vectors)
constexpr int64_t kKC = 256;  // K block: a packed A block (12 × 256 floats) stays in L1
constexpr int64_t kNC = 512;  // column block: a B block (256 × 512 floats) stays in L2
constexpr int64_t kPrefetchRows = 24;  // software prefetch distance along B's rows

#if DK_AVX512_CODE
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's avx512fintrin.h builds _mm512_reduce_add_ps on _mm512_undefined_pd and then warns that it
// "may be used uninitialized" once inlined (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// C[0:MR, 0:nr] (=|+=) Σ_k ap[k·kMR + r] · bp[k·ldb + j] for k < kc. bp rows are read with masks, so a
// direct (unpacked) B may end anywhere.
// The cursor of a PrefetchRows stream: the next line to fetch, row by row.
struct StreamCursor {
  const PrefetchRows* s = nullptr;
  int64_t row = 0, off = 0;  // row of the stream, byte offset within it
  bool done() const { return s == nullptr || row >= s->rows; }
};

// With Pf, two lines of the cursor's stream are prefetched into L2 per k (the scalar ports are idle here).
template <int MR, bool Pf = false>
void micro(const float* ap, const float* bp, int64_t ldb, int64_t kc, float* c, int64_t ldc, int nr, bool acc,
           StreamCursor* pf = nullptr) {
  const char* pbase = nullptr;
  const char* pp = nullptr;
  int64_t prow = 0, poff = 0, plen = 0, prows = 0, pld = 0;
  if constexpr (Pf) {
    pbase = static_cast<const char*>(pf->s->base);
    prow = pf->row, poff = pf->off, prows = pf->s->rows, pld = pf->s->ld_bytes;
    plen = pf->s->row_bytes;
    pp = pbase + prow * pld + poff;
  }
  const __mmask16 m0 = nr >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nr) - 1u);
  const __mmask16 m1 =
      nr >= 32 ? static_cast<__mmask16>(0xFFFF) : (nr > 16 ? static_cast<__mmask16>((1u << (nr - 16)) - 1u) : 0);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    // B read in place may stream from memory with a row stride (PaDiM's factors, used once each):
    // fetch its rows ~24 iterations (~300 cycles) ahead
    _mm_prefetch(reinterpret_cast<const char*>(bp + (k + kPrefetchRows) * ldb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bp + (k + kPrefetchRows) * ldb + 16), _MM_HINT_T0);
    if constexpr (Pf) {
      for (int l = 0; l < 2; ++l) {
        if (prow < prows) {
          _mm_prefetch(pp, _MM_HINT_T1);
          poff += 64;
          pp += 64;
          if (poff >= plen) {  // on to the next row's first line
            ++prow;
            poff = 0;
            pp = pbase + prow * pld;
          }
        }
      }
    }
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bp + k * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, bp + k * ldb + 16);
    const float* a = ap + k * kMR;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (acc) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, cr));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, c0[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, c1[r]);
  }
  if constexpr (Pf) {
    pf->row = prow;
    pf->off = poff;
  }
}

using MicroFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, int, bool, StreamCursor*);
constexpr MicroFn kMicro[kMR + 1] = {nullptr,    &micro<1>, &micro<2>, &micro<3>,  &micro<4>,  &micro<5>, &micro<6>,
                                     &micro<7>,  &micro<8>, &micro<9>, &micro<10>, &micro<11>, &micro<12>};
constexpr MicroFn kMicroPf[kMR + 1] = {
    nullptr,           &micro<1, true>,  &micro<2, true>,  &micro<3, true>, &micro<4, true>,
    &micro<5, true>,   &micro<6, true>,  &micro<7, true>,  &micro<8, true>, &micro<9, true>,
    &micro<10, true>,  &micro<11, true>, &micro<12, true>};

// Gram tiles in dot-product form: G[i0 + r, j0 + c] (=|+=) Σ_k z[i0 + r, k] · z[j0 + c, k] over
// k ∈ [k0, k0 + kc), r < ri, c < cj (≤ 4 each; missing rows read row 0 of the tile and are not
// stored). Rows of z are contiguous along k, so no transposition is needed: 8 vector loads per 16
// FMAs, then one horizontal sum per entry per K block.
void gram_tile(const float* z, int64_t ldz, int64_t i0, int ri, int64_t j0, int cj, int64_t k0, int64_t kc,
               float* g, int64_t ldg, bool acc) {
  const float* a[4];
  const float* b[4];
  for (int r = 0; r < 4; ++r) {
    a[r] = z + (i0 + (r < ri ? r : 0)) * ldz + k0;
    b[r] = z + (j0 + (r < cj ? r : 0)) * ldz + k0;
  }
  __m512 s[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    __m512 av[4], bv[4];
    for (int r = 0; r < 4; ++r) {
      av[r] = _mm512_loadu_ps(a[r] + k);
      bv[r] = _mm512_loadu_ps(b[r] + k);
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_fmadd_ps(av[r], bv[c], s[r][c]);
  }
  if (k < kc) {
    const __mmask16 m = static_cast<__mmask16>((1u << (kc - k)) - 1u);
    __m512 av[4], bv[4];
    for (int r = 0; r < 4; ++r) {
      av[r] = _mm512_maskz_loadu_ps(m, a[r] + k);
      bv[r] = _mm512_maskz_loadu_ps(m, b[r] + k);
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_fmadd_ps(av[r], bv[c], s[r][c]);
  }
  for (int r = 0; r < ri; ++r)
    for (int c = 0; c < cj; ++c) {
      const float v = _mm512_reduce_add_ps(s[r][c]);
      float* dst = g + (i0 + r) * ldg + j0 + c;
      *dst = acc ? *dst + v : v;
    }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

// ap[k·kMR + r] = a[r·sam + k·sak] for r < mr, k < kc: a block of A, k-major, as the micro-kernel
// broadcasts it.
void pack_a(const float* a, int64_t sam, int64_t sak, int mr, int64_t kc, float* ap) {
  for (int r = 0; r < mr; ++r) {
    const float* src = a + r * sam;
    if (sak == 1) {
      for (int64_t k = 0; k < kc; ++k) ap[k * kMR + r] = src[k];
    } else {
      for (int64_t k = 0; k < kc; ++k) ap[k * kMR + r] = src[k * sak];
    }
  }
}

// The driver (plain C++; only the micro-kernel needs AVX-512): rows [0, M) of C.
void gemm_driver(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b,
                 int64_t sbk, int64_t sbn, float* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(c + i * ldc, 0, sizeof(float) * N);
    return;
  }
  thread_local std::vector<float> abuf, bbuf;
  abuf.resize(kMR * kKC);
  const bool direct_b = sbn == 1;
  if (!direct_b) bbuf.resize(kKC * kNC);
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    const int64_t ncp = (nc + kNR - 1) / kNR * kNR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const bool acc = accumulate || k0 > 0;
      const float* bp;
      int64_t ldb;
      if (direct_b) {
        bp = b + k0 * sbk + jc;
        ldb = sbk;
      } else {  // pack B[k0:k0+kc, jc:jc+nc] row-major, zero-padded to ncp columns
        float* dst = bbuf.data();
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = b + (k0 + k) * sbk + jc * sbn;
          float* row = dst + k * ncp;
          for (int64_t j = 0; j < nc; ++j) row[j] = src[j * sbn];
          for (int64_t j = nc; j < ncp; ++j) row[j] = 0.f;
        }
        bp = dst;
        ldb = ncp;
      }
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
        float* ap = abuf.data();
        pack_a(a + i0 * sam + k0 * sak, sam, sak, mr, kc, ap);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          const int nr = static_cast<int>(std::min<int64_t>(kNR, nc - jr));
          kMicro[mr](ap, bp + jr, ldb, kc, c + i0 * ldc + jc + jr, ldc, nr, acc, nullptr);
        }
      }
    }
  }
}

// C = A·B with B lower-triangular (B[k, j] = 0 for k < j, rows contiguous): each 32-column panel
// starting at column jr runs over k ≥ jr only. A is packed once, all of it (12-row blocks, k-major),
// and the panels are the outer loop, so that each panel of B — streamed from memory when B is one of
// PaDiM's P factors — is read once and reused from L1/L2 by every row block (the triangular
// products of mahalanobis*: tens of rows, K = D).
void tril_driver(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b,
                 int64_t sbk, float* c, int64_t ldc, const PrefetchRows* next) {
  StreamCursor cur;
  cur.s = next != nullptr && next->base != nullptr && next->rows > 0 ? next : nullptr;
  thread_local std::vector<float> abuf;
  const int64_t nblk = (M + kMR - 1) / kMR, kk = std::max<int64_t>(K, 1);
  abuf.resize(static_cast<size_t>(nblk * kMR * kk));
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t i0 = blk * kMR;
    const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
    pack_a(a + i0 * sam, sam, sak, mr, K, abuf.data() + blk * kMR * kk);
  }
  for (int64_t jr = 0; jr < N; jr += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, N - jr));
    const int64_t k0 = std::min(jr, K);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * kMR;
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - i0));
      float* ct = c + i0 * ldc + jr;
      if (k0 >= K) {  // the panel lies wholly above B's diagonal
        for (int r = 0; r < mr; ++r) std::memset(ct + r * ldc, 0, sizeof(float) * nr);
        continue;
      }
      (cur.done() ? kMicro : kMicroPf)[mr](abuf.data() + blk * kMR * kk + k0 * kMR, b + k0 * sbk + jr, sbk, K - k0,
                                           ct, ldc, nr, false, &cur);
    }
  }
}

bool cpu_has_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
#endif  // DK_AVX512_CODE

bool compute_enabled() {
#if DK_AVX512_CODE
  const char* env = std::getenv("DISTKERN_CPU_GEMM");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
  return cpu_has_avx512f();
#else
  return false;
#endif
}

// Row blocks of 12 in an order that balances the triangle of gram across contiguous chunks:
// 0, last, 1, last − 1, ...
std::vector<int64_t> balanced_blocks(int64_t nblocks) {
  std::vector<int64_t> order;
  order.reserve(nblocks);
  for (int64_t lo = 0, hi = nblocks - 1; lo <= hi; ++lo, --hi) {
    order.push_back(lo);
    if (hi != lo) order.push_back(hi);
  }
  return order;
}

bool usable(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && !t.is_conj() && !t.is_neg();
}

}  // namespace

bool fast_gemm_enabled() {
  static const bool on = compute_enabled();
  return on;
}

bool sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t sbk,
           int64_t sbn, float* c, int64_t ldc, bool accumulate) {
#if DK_AVX512_CODE
  if (!fast_gemm_enabled()) return false;
  gemm_driver(M, N, K, a, sam, sak, b, sbk, sbn, c, ldc, accumulate);
  return true;
#else
  (void)M, (void)N, (void)K, (void)a, (void)sam, (void)sak, (void)b, (void)sbk, (void)sbn, (void)c, (void)ldc,
      (void)accumulate;
  return false;
#endif
}

void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (fast_gemm_enabled() && usable(a) && usable(b) && usable(out) && out.stride(1) == 1 &&
      out.size(0) == a.size(0) && out.size(1) == b.size(1) && a.size(1) == b.size(0)) {
    sgemm(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), a.stride(1), b.data_ptr<float>(),
          b.stride(0), b.stride(1), out.data_ptr<float>(), out.stride(0), accumulate);
    return;
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

bool mm_tril_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const PrefetchRows* next) {
#if DK_AVX512_CODE
  if (!(fast_gemm_enabled() && usable(a) && usable(b) && usable(out) && out.stride(1) == 1 && b.stride(1) == 1 &&
        out.size(0) == a.size(0) && out.size(1) == b.size(1) && a.size(1) == b.size(0)))
    return false;
  tril_driver(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), a.stride(1), b.data_ptr<float>(),
              b.stride(0), out.data_ptr<float>(), out.stride(0), next);
  return true;
#else
  (void)out, (void)a, (void)b, (void)next;
  return false;
#endif
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  if (!(fast_gemm_enabled() && usable(a) && usable(b))) return at::mm(a, b);
  TORCH_CHECK(a.size(1) == b.size(0), "distkern: mm shapes ", a.sizes(), " and ", b.sizes(), " do not match");
  const int64_t M = a.size(0), N = b.size(1), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  const int64_t nblocks = (M + kMR - 1) / kMR;
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* cp = out.data_ptr<float>();
  // Column panels when the rows are few (B = 64 rows of a backward), row blocks otherwise.
  if (nblocks >= 2 * at::get_num_threads() || N < 2 * kNR) {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * kMR, r1 = std::min(M, b1 * kMR);
      sgemm(r1 - r0, N, K, ap + r0 * a.stride(0), a.stride(0), a.stride(1), bp, b.stride(0), b.stride(1),
            cp + r0 * N, N, false);
    });
  } else {
    const int64_t npanels = (N + kNR - 1) / kNR;
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
      const int64_t c0 = p0 * kNR, c1 = std::min(N, p1 * kNR);
      sgemm(M, c1 - c0, K, ap, a.stride(0), a.stride(1), bp + c0 * b.stride(1), b.stride(0), b.stride(1), cp + c0, N,
            false);
    });
  }
  return out;
}

at::Tensor gram(const at::Tensor& zin) {
  if (!(fast_gemm_enabled() && usable(zin))) {  // at::mm, made symmetric to the bit as promised
    const at::Tensor g = at::mm(zin, zin.t());
    return at::triu(g) + at::triu(g, 1).t();
  }
#if DK_AVX512_CODE
  const at::Tensor z = zin.stride(1) == 1 ? zin : zin.contiguous();
  const int64_t n = z.size(0), K = z.size(1), ldz = z.stride(0);
  if (K == 0) return at::zeros({n, n}, z.options());
  at::Tensor out = at::empty({n, n}, z.options());  // every entry is written: upper tiles, then the mirror
  const float* zp = z.data_ptr<float>();
  float* gp = out.data_ptr<float>();
  constexpr int64_t kT = 4, kKB = 1024;  // 4×4 tiles; K blocks of 1024 (a tile's 8 rows: 32 KiB, in L1)
  const int64_t nt = (n + kT - 1) / kT;
  // row tiles in the order that balances the triangle over contiguous chunks; each thread owns its
  // rows of G, so the K blocks accumulate without races
  const std::vector<int64_t> order = balanced_blocks(nt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t k0 = 0; k0 < K; k0 += kKB) {
      const int64_t kc = std::min(kKB, K - k0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = order[t] * kT;
        const int ri = static_cast<int>(std::min(kT, n - i0));
        for (int64_t j0 = i0; j0 < n; j0 += kT)
          gram_tile(zp, ldz, i0, ri, j0, static_cast<int>(std::min(kT, n - j0)), k0, kc, gp, n, k0 > 0);
      }
    }
  });
  // mirror the upper triangle (the diagonal tiles computed their lower entries too; overwritten so
  // that the result is symmetric to the bit)
  at::parallel_for(1, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < i; ++j) gp[i * n + j] = gp[j * n + i];
  });
  return out;
#else
  return at::mm(zin, zin.t());
#endif
}

}  // namespace cpu
}  // namespace distkern
