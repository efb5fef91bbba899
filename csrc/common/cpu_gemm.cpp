// distkern's single-precision products for the CPU paths (see cpu_gemm.h for why and the contract).
//
// Schedule (GotoBLAS order, sized for a 48 KiB L1 / 1 MiB L2): for each block of ≤ 512 columns and
// each K block of 256, the B block is read in place when its rows are contiguous (else packed once,
// zero-padded to NR columns); for each MR-row block of A, A is packed k-major (MR × 256 floats, in
// L1) and the MR×NR micro-kernel runs over the column panels. One of two micro-kernels, chosen at run
// time (Kern below):
//   AVX-512F  12×32: 24 zmm accumulators; per k 2 vector loads of B, 12 broadcasts of A, 24 FMAs
//             (0.23 bytes of L1 traffic per FLOP).
//   AVX2+FMA   6×16: 12 of the 16 ymm registers accumulate, 2 hold B, 1 the broadcast; per k 2 loads,
//             6 broadcasts, 12 FMAs (0.33 bytes per FLOP) — two FMA pipes kept busy by 12 independent
//             chains of 4-5 cycles' latency.
// Two variants of the driver: a lower-triangular B (tril_driver: A packed once, B's panels outermost,
// each from its diagonal) and z·zᵀ (gram tiles: dot products along the rows of z, upper-triangle tiles
// only).
#include "common/cpu_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
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

constexpr int kMR = 12;       // AVX-512: rows of the register tile (broadcasts)
constexpr int kNR = 32;       // AVX-512: columns of the register tile (two 16-float vectors)
constexpr int kMR2 = 6;       // AVX2: rows of the register tile
constexpr int kNR2 = 16;      // AVX2: columns of the register tile (two 8-float vectors)
constexpr int64_t kKC = 256;  // K block: a packed row block of A (≤ 12 × 256 floats) stays in L1
constexpr int64_t kNC = 512;  // column block: a B block (256 × 512 floats) stays in L2
constexpr int64_t kPrefetchRows = 24;  // software prefetch distance along B's rows

// The cursor of a PrefetchRows stream: the next line to fetch, row by row.
struct StreamCursor {
  const PrefetchRows* s = nullptr;
  int64_t row = 0, off = 0;  // row of the stream, byte offset within it
  bool done() const { return s == nullptr || row >= s->rows; }
};

using MicroFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, int, bool, StreamCursor*);
// G[i0 + r, j0 + c] (=|+=) Σ_k z_{i0 + r}[k] · z_{j0 + c}[k] over k ∈ [k0, k0 + kc), r < ri ≤ the family's
// gram_rows, c < cj ≤ 4, where z_i = rows[i] (row pointers: z may be stacked from separate tensors)
using GramFn = void (*)(const float* const*, int64_t, int, int64_t, int, int64_t, int64_t, float*, int64_t, bool);

// One micro-kernel family: its register tile, its kernels by row count (index mr ≤ mr_max; with and
// without the PrefetchRows stream), its Gram tile, and the driver's blocking for it:
//   mc       rows of A packed per K block, all of whose MR-row blocks run against one NR-column panel
//            of B before the next panel (BLIS order: the panel, kc × NR, stays in L1 across them). With
//            mc = mr the driver runs each row block across all panels instead (A's block in L1, B's
//            panels from L2), the order the AVX-512 kernel was measured in;
//   gram_rows  rows of a Gram tile (4 or 6; 4 columns);
//   gram_kc  K block of the Gram driver: a block of all rows of z stays in L2 across the row tiles;
//   pack_b   pack B (NR-padded, contiguous) when C has more rows than this even where B's rows are
//            contiguous: in place, a panel's rows lie ldb apart and alias in L1 when that is a multiple
//            of 4 KiB, so a panel reused across row blocks does not stay there.
struct Kern {
  int mr, nr;
  const MicroFn* micro;
  const MicroFn* micro_pf;
  GramFn gram;
  int gram_rows;  // the Gram tile's rows (its columns: 4)
  int64_t mc, pack_b, gram_kc;
};

#if DK_AVX512_CODE
// Two lines of a PrefetchRows stream into L2 per call (one call per k of a micro-kernel: the scalar
// ports are idle there). Plain x86-64 code, inlined into either micro-kernel.
struct PrefetchStep {
  const char* base = nullptr;
  const char* pp = nullptr;
  int64_t row = 0, off = 0, len = 0, rows = 0, ld = 0;

  explicit PrefetchStep(const StreamCursor* c) {
    if (c == nullptr || c->s == nullptr) return;
    base = static_cast<const char*>(c->s->base);
    row = c->row, off = c->off, rows = c->s->rows, ld = c->s->ld_bytes, len = c->s->row_bytes;
    pp = base + row * ld + off;
  }
  void two_lines() {
    for (int l = 0; l < 2; ++l) {
      if (row < rows) {
        _mm_prefetch(pp, _MM_HINT_T1);
        off += 64;
        pp += 64;
        if (off >= len) {  // on to the next row's first line
          ++row;
          off = 0;
          pp = base + row * ld;
        }
      }
    }
  }
  void save(StreamCursor* c) const {
    c->row = row;
    c->off = off;
  }
};
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's avx512fintrin.h builds _mm512_reduce_add_ps on _mm512_undefined_pd and then warns that it
// "may be used uninitialized" once inlined (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// C[0:MR, 0:nr] (=|+=) Σ_k ap[k·kMR + r] · bp[k·ldb + j] for k < kc. bp rows are read with masks, so a
// direct (unpacked) B may end anywhere.

// With Pf, two lines of the cursor's stream are prefetched into L2 per k (the scalar ports are idle here).
template <int MR, bool Pf = false>
void micro(const float* ap, const float* bp, int64_t ldb, int64_t kc, float* c, int64_t ldc, int nr, bool acc,
           StreamCursor* pf = nullptr) {
  PrefetchStep ps(Pf ? pf : nullptr);
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
    if constexpr (Pf) ps.two_lines();
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
  if constexpr (Pf) ps.save(pf);
}

constexpr MicroFn kMicro[kMR + 1] = {nullptr,    &micro<1>, &micro<2>, &micro<3>,  &micro<4>,  &micro<5>, &micro<6>,
                                     &micro<7>,  &micro<8>, &micro<9>, &micro<10>, &micro<11>, &micro<12>};
constexpr MicroFn kMicroPf[kMR + 1] = {
    nullptr,           &micro<1, true>,  &micro<2, true>,  &micro<3, true>, &micro<4, true>,
    &micro<5, true>,   &micro<6, true>,  &micro<7, true>,  &micro<8, true>, &micro<9, true>,
    &micro<10, true>,  &micro<11, true>, &micro<12, true>};

// Gram tiles in dot-product form (GramFn; missing rows read row 0 of the tile and are not stored). Rows
// of z are contiguous along k, so no transposition is needed: 8 vector loads per 16 FMAs, then one
// horizontal sum per entry per K block.
void gram_tile(const float* const* z, int64_t i0, int ri, int64_t j0, int cj, int64_t k0, int64_t kc, float* g,
               int64_t ldg, bool acc) {
  const float* a[4];
  const float* b[4];
  for (int r = 0; r < 4; ++r) {
    a[r] = z[i0 + (r < ri ? r : 0)] + k0;
    b[r] = z[j0 + (r < cj ? r : 0)] + k0;
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


#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The first n ∈ [0, 8] lanes set (maskload / maskstore touch no memory outside them).
inline __m256i lane_mask(int n) {
  static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The AVX2 micro-kernel: the AVX-512 one's contract on a 6×16 tile (ap k-major with stride kMR2).
template <int MR, bool Pf = false>
void micro2(const float* ap, const float* bp, int64_t ldb, int64_t kc, float* c, int64_t ldc, int nr, bool acc,
            StreamCursor* pf = nullptr) {
  PrefetchStep ps(Pf ? pf : nullptr);
  const bool full = nr >= kNR2;
  const __m256i m0 = lane_mask(std::min(nr, 8)), m1 = lane_mask(std::max(0, std::min(nr - 8, 8)));
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm256_setzero_ps();
    c1[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    // a 16-float row of B spans at most two lines: fetch both, ~24 rows ahead (see the AVX-512 kernel)
    _mm_prefetch(reinterpret_cast<const char*>(bp + (k + kPrefetchRows) * ldb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bp + (k + kPrefetchRows) * ldb + 15), _MM_HINT_T0);
    if constexpr (Pf) ps.two_lines();
    const float* brow = bp + k * ldb;
    __m256 b0, b1;
    if (full) {
      b0 = _mm256_loadu_ps(brow);
      b1 = _mm256_loadu_ps(brow + 8);
    } else {
      b0 = _mm256_maskload_ps(brow, m0);
      b1 = _mm256_maskload_ps(brow + 8, m1);
    }
    const float* a = ap + k * kMR2;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (full) {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, c0[r]);
      _mm256_storeu_ps(cr + 8, c1[r]);
    } else {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_maskload_ps(cr, m0));
        c1[r] = _mm256_add_ps(c1[r], _mm256_maskload_ps(cr + 8, m1));
      }
      _mm256_maskstore_ps(cr, m0, c0[r]);
      _mm256_maskstore_ps(cr + 8, m1, c1[r]);
    }
  }
  if constexpr (Pf) ps.save(pf);
}

// Gram tiles on AVX2 (GramFn), 6 rows × 4 columns, three rows at a time: 12 accumulators, 7 loads per 12
// FMAs (a 4×4 tile two rows at a time needed 6 per 8, and ran at 43–56 GFLOP/s a core where MKL's square
// product ran at 73). Missing rows and columns read the tile's first one and are not stored.
void gram_tile2(const float* const* z, int64_t i0, int ri, int64_t j0, int cj, int64_t k0, int64_t kc, float* g,
                int64_t ldg, bool acc) {
  const float* b[4];
  for (int c = 0; c < 4; ++c) b[c] = z[j0 + (c < cj ? c : 0)] + k0;
  for (int r0 = 0; r0 < ri; r0 += 3) {
    const float* a[3];
    for (int q = 0; q < 3; ++q) a[q] = z[i0 + (r0 + q < ri ? r0 + q : r0)] + k0;
    __m256 s[3][4];
    for (int q = 0; q < 3; ++q)
      for (int c = 0; c < 4; ++c) s[q][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      __m256 av[3];
      for (int q = 0; q < 3; ++q) av[q] = _mm256_loadu_ps(a[q] + k);
      for (int c = 0; c < 4; ++c) {
        const __m256 bv = _mm256_loadu_ps(b[c] + k);
        for (int q = 0; q < 3; ++q) s[q][c] = _mm256_fmadd_ps(av[q], bv, s[q][c]);
      }
    }
    if (k < kc) {
      const __m256i m = lane_mask(static_cast<int>(kc - k));
      __m256 av[3];
      for (int q = 0; q < 3; ++q) av[q] = _mm256_maskload_ps(a[q] + k, m);
      for (int c = 0; c < 4; ++c) {
        const __m256 bv = _mm256_maskload_ps(b[c] + k, m);
        for (int q = 0; q < 3; ++q) s[q][c] = _mm256_fmadd_ps(av[q], bv, s[q][c]);
      }
    }
    for (int q = 0; q < 3 && r0 + q < ri; ++q)
      for (int c = 0; c < cj; ++c) {
        const float v = hsum(s[q][c]);
        float* dst = g + (i0 + r0 + q) * ldg + j0 + c;
        *dst = acc ? *dst + v : v;
      }
  }
}

#pragma GCC pop_options

constexpr MicroFn kMicro2[kMR2 + 1] = {nullptr, &micro2<1>, &micro2<2>, &micro2<3>, &micro2<4>, &micro2<5>,
                                       &micro2<6>};
constexpr MicroFn kMicro2Pf[kMR2 + 1] = {nullptr,         &micro2<1, true>, &micro2<2, true>, &micro2<3, true>,
                                         &micro2<4, true>, &micro2<5, true>, &micro2<6, true>};
const Kern kAvx512{kMR, kNR, kMicro, kMicroPf, &gram_tile, 4, kMR, INT64_MAX, 1024};
// 6×16 reuses each B value for 6 rows only: from L2 that is 3 FLOP a byte, which starved the FMA pipes
// (~45 % of peak on a Zen 3 core); with the panel in L1 across 16 row blocks (96 rows, A's 96 KiB block in
// L2, each A value used 16 times) it is 8.
// Gram K blocks of 2048: each tile pass then streams its 7 rows for 256 steps, where blocks of 512 (chosen so
// that MMD-DDM's 128 rows × 512 floats stay in a Zen 3 core's 512 KiB L2) paid a horizontal sum per entry and
// the prefetchers' ramp every 64. Blocks of 512 / 1024 / 2048, switched per call in one process (2-core Zen 3
// EPYC): z of 128 × 2048 1.00 / 0.86 / 0.85 of the time, 512 × 2048 1.00 / 0.89 / 0.83, 1024 × 1024 1.00 /
// 0.83 / 0.82, 128 × 8192 1.00 / 0.91 / 0.91, 256 × 768 1.00 / 0.91 / 0.92; MMD-DDM's whole step 1.00 / 0.98 /
// 0.96.
const Kern kAvx2{kMR2, kNR2, kMicro2, kMicro2Pf, &gram_tile2, 6, 96, 2 * kMR2, 2048};

// ap[k·mrs + r] = a[r·sam + k·sak] for r < mr, k < kc: a block of A, k-major with stride mrs (the
// kernel's row tile), as the micro-kernel broadcasts it.
void pack_a(const float* a, int64_t sam, int64_t sak, int mr, int mrs, int64_t kc, float* ap) {
  if (sam == 1) {  // A's columns contiguous (A = Zᵀ): mr consecutive floats per k
    for (int64_t k = 0; k < kc; ++k) std::memcpy(ap + k * mrs, a + k * sak, sizeof(float) * mr);
    return;
  }
  for (int r = 0; r < mr; ++r) {
    const float* src = a + r * sam;
    if (sak == 1) {
      for (int64_t k = 0; k < kc; ++k) ap[k * mrs + r] = src[k];
    } else {
      for (int64_t k = 0; k < kc; ++k) ap[k * mrs + r] = src[k * sak];
    }
  }
}

// The driver (plain C++; only the micro-kernels need AVX2 / AVX-512): rows [0, M) of C.
void gemm_driver(const Kern& kern, int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak,
                 const float* b, int64_t sbk, int64_t sbn, float* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(c + i * ldc, 0, sizeof(float) * N);
    return;
  }
  const int MR = kern.mr, NR = kern.nr;
  const int64_t MC = kern.mc;  // a multiple of MR
  thread_local std::vector<float> abuf, bbuf;
  abuf.resize(static_cast<size_t>(std::max<int64_t>(MC, MR) * kKC));
  const bool direct_b = sbn == 1 && M <= kern.pack_b;
  if (!direct_b) bbuf.resize(kKC * kNC);  // kNC is a multiple of both NR
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const bool acc = accumulate || k0 > 0;
      const float* bp;
      int64_t ldb;
      if (direct_b) {
        bp = b + k0 * sbk + jc;
        ldb = sbk;
      } else {  // pack B[k0:k0+kc, jc:jc+nc] panel by panel: each NR-column panel kc × NR contiguous
        float* dst = bbuf.data();  // (zero-padded), so that it occupies consecutive L1 lines
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t w = std::min<int64_t>(NR, nc - jr);
          float* panel = dst + jr * kc;
          for (int64_t k = 0; k < kc; ++k) {
            const float* src = b + (k0 + k) * sbk + (jc + jr) * sbn;
            float* row = panel + k * NR;
            if (sbn == 1) {
              std::memcpy(row, src, sizeof(float) * w);
            } else {
              for (int64_t j = 0; j < w; ++j) row[j] = src[j * sbn];
            }
            for (int64_t j = w; j < NR; ++j) row[j] = 0.f;
          }
        }
        bp = dst;
        ldb = NR;
      }
      for (int64_t ic = 0; ic < M; ic += MC) {  // pack up to MC rows of A, MR-row blocks k-major
        const int64_t mc = std::min(MC, M - ic);
        for (int64_t i = 0; i < mc; i += MR)
          pack_a(a + (ic + i) * sam + k0 * sak, sam, sak, static_cast<int>(std::min<int64_t>(MR, mc - i)), MR, kc,
                 abuf.data() + i * kc);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
          const float* panel = direct_b ? bp + jr : bp + jr * kc;
          for (int64_t i = 0; i < mc; i += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mc - i));
            kern.micro[mr](abuf.data() + i * kc, panel, ldb, kc, c + (ic + i) * ldc + jc + jr, ldc, nr, acc, nullptr);
          }
        }
      }
    }
  }
}

// C = A·B with B lower-triangular (B[k, j] = 0 for k < j, rows contiguous): each NR-column panel
// starting at column jr runs over k ≥ jr only. A is packed once, all of it (MR-row blocks, k-major),
// and the panels are the outer loop, so that each panel of B — streamed from memory when B is one of
// PaDiM's P factors — is read once and reused from L1/L2 by every row block (the triangular
// products of mahalanobis*: tens of rows, K = D).
void tril_driver(const Kern& kern, int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak,
                 const float* b, int64_t sbk, float* c, int64_t ldc, const PrefetchRows* next) {
  StreamCursor cur;
  cur.s = next != nullptr && next->base != nullptr && next->rows > 0 ? next : nullptr;
  const int MR = kern.mr, NR = kern.nr;
  thread_local std::vector<float> abuf;
  const int64_t nblk = (M + MR - 1) / MR, kk = std::max<int64_t>(K, 1);
  abuf.resize(static_cast<size_t>(nblk * MR * kk));
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t i0 = blk * MR;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - i0));
    pack_a(a + i0 * sam, sam, sak, mr, MR, K, abuf.data() + blk * MR * kk);
  }
  for (int64_t jr = 0; jr < N; jr += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, N - jr));
    const int64_t k0 = std::min(jr, K);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * MR;
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - i0));
      float* ct = c + i0 * ldc + jr;
      if (k0 >= K) {  // the panel lies wholly above B's diagonal
        for (int r = 0; r < mr; ++r) std::memset(ct + r * ldc, 0, sizeof(float) * nr);
        continue;
      }
      (cur.done() ? kern.micro : kern.micro_pf)[mr](abuf.data() + blk * MR * kk + k0 * MR, b + k0 * sbk + jr, sbk,
                                                    K - k0, ct, ldc, nr, false, &cur);
    }
  }
}
#endif  // DK_AVX512_CODE

// The micro-kernel family this process uses for its products, or nullptr (torch's BLAS); the one for the
// triangular products that stream a factor from memory (mm_tril_out with `next`: PaDiM's per-position
// factors); and the one for gram. DISTKERN_CPU_GEMM=0 turns all off; DISTKERN_CPU_GEMM=avx2 takes the AVX2
// kernel for all, even where AVX-512F is present (tests cover it that way). Otherwise AVX-512F takes all
// where the CPU has it. Without AVX-512 the AVX2 kernel takes the streamed triangular products and gram
// only. The streamed products ran 1.4–1.9× torch's BLAS (Zen 3, B = 32, P = 3136 / 400, D = 100 / 550),
// the next factor's lines fetched while the current one is multiplied, which a BLAS call cannot overlap;
// gram computes the upper triangle only, where BLAS computes the square: 1.2–2× at::mm's gram from
// 64×16 to 1024×1024 (mmd2's small path; 0.44 against 0.61 ms at MMD-DDM's 128×2048). On the other
// products MKL's own AVX2 sgemm was as fast or faster (0.5–0.9× for this kernel in the ops' benchmarks),
// so they stay with it (benchmarks/README.md, "CPU products").
enum class Use { Products, StreamedTril, Gram };

const Kern* select_kernel(Use use) {
#if DK_AVX512_CODE
  const char* env = std::getenv("DISTKERN_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return nullptr;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return avx2 ? &kAvx2 : nullptr;
  if (__builtin_cpu_supports("avx512f")) return &kAvx512;
  return avx2 && use != Use::Products ? &kAvx2 : nullptr;
#else
  (void)use;
  return nullptr;
#endif
}

const Kern* kernel() {
  static const Kern* const k = select_kernel(Use::Products);
  return k;
}

const Kern* streamed_tril_kernel() {
  static const Kern* const k = select_kernel(Use::StreamedTril);
  return k;
}

const Kern* gram_kernel() {
  static const Kern* const k = select_kernel(Use::Gram);
  return k;
}

// Row blocks in an order that balances the triangle of gram across contiguous chunks:
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

// a · [b0; b1] through at::mm (b1 undefined: a · b0; a's first b0.size(0) columns multiply b0, the rest b1),
// with few rows and many columns split over the threads by columns. torch's BLAS (MKL) threads a product
// over its rows: for MMD-DDM's backward, (64 × 128)·(128 × 2048), the second core then adds little
// (measured 0.5 ms on one core, 0.4 on two); column slices of ≥ 256, one BLAS call each inside the
// parallel region (where it runs single-threaded), keep both busy.
// The operands are detached: the slices' products run on the pool's threads, where grad mode is on (it is
// thread-local), and an out= product refuses an operand that requires grad there (mmd2's samples do).
at::Tensor blas_mm(const at::Tensor& a_in, const at::Tensor& b0_in, const at::Tensor& b1_in) {
  const at::Tensor a = a_in.detach(), b0 = b0_in.detach(), b1 = b1_in.defined() ? b1_in.detach() : b1_in;
  const int64_t K0 = b0.size(0), K1 = b1.defined() ? b1.size(0) : 0;
  auto product = [&](at::Tensor& out, int64_t c0, int64_t w) {
    at::mm_out(out, a.narrow(1, 0, K0), b0.narrow(1, c0, w));
    if (K1 > 0) out.addmm_(a.narrow(1, K0, K1), b1.narrow(1, c0, w));
  };
  const int64_t threads = at::get_num_threads(), N = b0.size(1);
  constexpr int64_t kMinCols = 256;
  const bool split = threads > 1 && !at::in_parallel_region() && a.size(0) < 64 * threads && N >= 2 * kMinCols &&
                     a.size(1) >= 32;
  const int64_t parts = split ? std::min(threads, N / kMinCols) : 1;
  const int64_t width = (N + parts - 1) / parts;
  at::Tensor out = at::empty({a.size(0), N}, a.options());
  auto slice = [&](int64_t p) {
    const int64_t c0 = p * width, w = std::min(width, N - c0);
    at::Tensor o = out.narrow(1, c0, w);
    product(o, c0, w);
  };
  if (parts == 1) {
    slice(0);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) slice(p);
    });
  }
  return out;
}

// Row pointers of [x; y] (row-major rows, unit column stride)
std::vector<const float*> stacked_rows(const at::Tensor& x, const at::Tensor& y) {
  std::vector<const float*> rows;
  for (const at::Tensor* t : {&x, &y}) {
    if (!t->defined()) continue;
    const float* p = t->data_ptr<float>();
    for (int64_t i = 0; i < t->size(0); ++i) rows.push_back(p + i * t->stride(0));
  }
  return rows;
}

}  // namespace

bool fast_gemm_enabled() { return kernel() != nullptr; }

bool avx512_enabled() {
#if DK_AVX512_CODE
  return kernel() == &kAvx512;
#else
  return false;
#endif
}

// The lanes follow the kernels' one decision (select_kernel): gram's kernel is the AVX2 one exactly where
// AVX2+FMA runs and AVX-512 does not (or DISTKERN_CPU_GEMM=avx2), and none with DISTKERN_CPU_GEMM=0.
Isa math_isa() {
  if (avx512_enabled()) return Isa::Avx512;
  return gram_kernel() != nullptr ? Isa::Avx2 : Isa::None;
}

const char* math_isa_name() {
  switch (math_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::None: break;
  }
  return "none";
}

const char* gemm_isa() {
  if (kernel() == nullptr) return "none";
  return avx512_enabled() ? "avx512" : "avx2";
}

bool sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t sbk,
           int64_t sbn, float* c, int64_t ldc, bool accumulate) {
#if DK_AVX512_CODE
  const Kern* kern = kernel();
  if (kern == nullptr) return false;
  gemm_driver(*kern, M, N, K, a, sam, sak, b, sbk, sbn, c, ldc, accumulate);
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
  const Kern* kern = next != nullptr && next->base != nullptr ? streamed_tril_kernel() : kernel();
  if (!(kern != nullptr && usable(a) && usable(b) && usable(out) && out.stride(1) == 1 && b.stride(1) == 1 &&
        out.size(0) == a.size(0) && out.size(1) == b.size(1) && a.size(1) == b.size(0)))
    return false;
  tril_driver(*kern, a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), a.stride(1),
              b.data_ptr<float>(), b.stride(0), out.data_ptr<float>(), out.stride(0), next);
  return true;
#else
  (void)out, (void)a, (void)b, (void)next;
  return false;
#endif
}

namespace {

// a · [b0; b1] (b1 undefined: a · b0)
at::Tensor mm_parts(const at::Tensor& a, const at::Tensor& b0, const at::Tensor& b1) {
  const int64_t K0 = b0.size(0), K1 = b1.defined() ? b1.size(0) : 0;
  TORCH_CHECK(a.size(1) == K0 + K1 && (K1 == 0 || b1.size(1) == b0.size(1)), "distkern: mm shapes ", a.sizes(),
              " and ", b0.sizes(), (K1 > 0 ? " stacked on " : ""), (K1 > 0 ? b1.sizes() : b0.sizes()),
              " do not match");
  if (!(fast_gemm_enabled() && usable(a) && usable(b0) && (K1 == 0 || usable(b1)))) return blas_mm(a, b0, b1);
  const int64_t M = a.size(0), N = b0.size(1);
  const int64_t MR = kernel()->mr, NR = kernel()->nr;
  at::Tensor out = at::empty({M, N}, a.options());
  if (K0 + K1 == 0) return out.zero_();
  const int64_t nblocks = (M + MR - 1) / MR;
  const float* ap = a.data_ptr<float>();
  float* cp = out.data_ptr<float>();
  // C[r0:r1, c0:c1] = A[r0:r1, :] · B[:, c0:c1] over the parts of B, the second accumulating
  auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    int64_t k = 0;
    for (const at::Tensor* b : {&b0, &b1}) {
      if (!b->defined() || b->size(0) == 0) continue;
      sgemm(r1 - r0, c1 - c0, b->size(0), ap + r0 * a.stride(0) + k * a.stride(1), a.stride(0), a.stride(1),
            b->data_ptr<float>() + c0 * b->stride(1), b->stride(0), b->stride(1), cp + r0 * N + c0, N, k > 0);
      k += b->size(0);
    }
  };
  // Row blocks, or column panels when the rows are few (B = 64 rows of a backward) or do not split evenly: in
  // row blocks the first thread's share is ceil(nblocks / T) whole blocks, where in column panels every thread
  // runs all M rows on ceil(npanels / T) of the panels (M = 64 on 2 threads: 3 blocks of 12 rows against 2.67
  // blocks' worth; 194 → 172 µs for 64 × 128 by 128 × 2048).
  const int64_t T = std::max(1, at::get_num_threads()), npanels = (N + NR - 1) / NR;
  const double row_cost = static_cast<double>((nblocks + T - 1) / T);
  const double col_cost = static_cast<double>(M) / MR * static_cast<double>((npanels + T - 1) / T) / npanels;
  if (N < 2 * NR || (nblocks >= 2 * T && row_cost <= 1.03 * col_cost)) {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0_, int64_t b1_) { block(b0_ * MR, std::min(M, b1_ * MR), 0, N); });
  } else {
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) { block(0, M, p0 * NR, std::min(N, p1 * NR)); });
  }
  return out;
}

// G = z·zᵀ for z given by its rows (each K floats, contiguous)
at::Tensor gram_rows(const std::vector<const float*>& rows, int64_t K, const at::TensorOptions& options) {
  const int64_t n = static_cast<int64_t>(rows.size());
  if (K == 0) return at::zeros({n, n}, options);
  at::Tensor out = at::empty({n, n}, options);  // every entry is written: upper tiles, then the mirror
  float* gp = out.data_ptr<float>();
  const Kern& kern = *gram_kernel();
  // TR×4 tiles (TR = 4 or 6); K blocks of the family's gram_kc. A row tile's columns start at the 4-column
  // tile holding its diagonal, so every entry on or above it is computed.
  constexpr int64_t kTC = 4;
  const int64_t TR = kern.gram_rows, KB = kern.gram_kc;
  const int64_t nt = (n + TR - 1) / TR;
  // row tiles in the order that balances the triangle over contiguous chunks; each thread owns its
  // rows of G, so the K blocks accumulate without races
  const std::vector<int64_t> order = balanced_blocks(nt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kc = std::min(KB, K - k0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = order[t] * TR;
        const int ri = static_cast<int>(std::min(TR, n - i0));
        for (int64_t j0 = i0 / kTC * kTC; j0 < n; j0 += kTC)
          kern.gram(rows.data(), i0, ri, j0, static_cast<int>(std::min(kTC, n - j0)), k0, kc, gp, n, k0 > 0);
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
}

// at::mm's Gram of [x; y] (y undefined: of x), made symmetric to the bit as promised
at::Tensor blas_gram(const at::Tensor& x, const at::Tensor& y) {
  const at::Tensor z = y.defined() ? at::cat({x, y}) : x;
  const at::Tensor g = at::mm(z, z.t());
  return at::triu(g) + at::triu(g, 1).t();
}

// [x; y]·[x; y]ᵀ (y undefined: x·xᵀ)
at::Tensor gram_parts(const at::Tensor& x, const at::Tensor& y) {
  if (!(gram_kernel() != nullptr && usable(x) && (!y.defined() || usable(y)))) return blas_gram(x, y);
  auto unit_columns = [](const at::Tensor& t) { return !t.defined() || t.stride(1) == 1 ? t : t.contiguous(); };
  return gram_rows(stacked_rows(unit_columns(x), unit_columns(y)), x.size(1), x.options());
}

}  // namespace

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return mm_parts(a, b, at::Tensor()); }

at::Tensor mm_stacked(const at::Tensor& a, const at::Tensor& top, const at::Tensor& bottom) {
  return mm_parts(a, top, bottom);
}

at::Tensor gram(const at::Tensor& z) { return gram_parts(z, at::Tensor()); }

at::Tensor gram_stacked(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1) && x.scalar_type() == y.scalar_type(),
              "distkern: gram_stacked of ", x.sizes(), " and ", y.sizes());
  return gram_parts(x, y);
}

}  // namespace cpu
}  // namespace distkern
