// Vector lanes for distkern's CPU math (φ of the kernel sums, the anomaly map's sigmoid), in AVX-512F and
// in AVX2+FMA, where DK_AVX512_CODE. Each primitive is compiled for its instruction set whatever the
// file's flags (a target attribute) and inlines into callers compiled for it. The math on top of them
// (exp, sigmoid: common/simd_lanes.inc; φ, the sigmoid sums: their users' .inc files) is written once, on
// a lane type `L`, and compiled once per set by common/simd_targets.inc; those functions run only where
// cpu::math_isa() names their set. Both sets give the same bits: the same operations in the same order,
// each correctly rounded (e·2ⁿ included: scalef in AVX-512, an exact and a rounded multiplication in AVX2).
#pragma once

#include "common/macros.h"

#if DK_AVX512_CODE
#include <immintrin.h>

#include <cstdint>

#define DK_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define DK_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

namespace distkern {
namespace simd {

// 16 float32 lanes, masks in k registers.
struct Avx512 {
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  DK_AVX512 static V set1(float a) { return _mm512_set1_ps(a); }
  DK_AVX512 static V zero() { return _mm512_setzero_ps(); }
  DK_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  DK_AVX512 static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  DK_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  DK_AVX512 static V div(V a, V b) { return _mm512_div_ps(a, b); }
  DK_AVX512 static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  // max / min return their second operand when either is NaN (as the SSE/AVX instructions do)
  DK_AVX512 static V max(V a, V b) { return _mm512_max_ps(a, b); }
  DK_AVX512 static V min(V a, V b) { return _mm512_min_ps(a, b); }
  DK_AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a·b + c
  DK_AVX512 static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c − a·b
  DK_AVX512 static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // e·2ⁿ for integral n (gradual underflow, overflow to inf), one rounding
  DK_AVX512 static V scale2(V e, V n) { return _mm512_scalef_ps(e, n); }
  DK_AVX512 static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  DK_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  DK_AVX512 static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  // lanes [0, n) of a mask, n < W
  DK_AVX512 static M first(int64_t n) { return static_cast<M>((1u << n) - 1u); }
  DK_AVX512 static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }  // 0 elsewhere
  DK_AVX512 static void store(float* p, M m, V a) { _mm512_mask_storeu_ps(p, m, a); }
  DK_AVX512 static V keep(M m, V a) { return _mm512_maskz_mov_ps(m, a); }  // a where m, 0 elsewhere
  DK_AVX512 static V keep_div(M m, V a, V b) { return _mm512_maskz_div_ps(m, a, b); }
  DK_AVX512 static M gt_or_nan(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ); }  // not a ≤ b
  DK_AVX512 static unsigned lt_bits(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }  // a < b, bit per lane
};

// 8 float32 lanes, masks as all-ones / all-zeros lanes.
struct Avx2 {
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  DK_AVX2 static V set1(float a) { return _mm256_set1_ps(a); }
  DK_AVX2 static V zero() { return _mm256_setzero_ps(); }
  DK_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  DK_AVX2 static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  DK_AVX2 static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  DK_AVX2 static V div(V a, V b) { return _mm256_div_ps(a, b); }
  DK_AVX2 static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  DK_AVX2 static V max(V a, V b) { return _mm256_max_ps(a, b); }
  DK_AVX2 static V min(V a, V b) { return _mm256_min_ps(a, b); }
  DK_AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  DK_AVX2 static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  DK_AVX2 static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // e·2ⁿ for integral n in [−150, 128] (what exp's reduction gives) and e in [½, 2]: n = h + l with h, l ≥
  // −75, so 2ʰ and 2ˡ are normal floats; e·2ʰ is exact, and ·2ˡ rounds once, to the subnormals and to inf
  // as scalef does. A NaN n (from a NaN x) comes with a NaN e.
  DK_AVX2 static V scale2(V e, V n) {
    const __m256i k = _mm256_cvtps_epi32(n);
    const __m256i h = _mm256_srai_epi32(k, 1), l = _mm256_sub_epi32(k, h);
    const __m256i bias = _mm256_set1_epi32(127);
    const V ph = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    const V pl = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(l, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(e, ph), pl);
  }
  DK_AVX2 static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  DK_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  DK_AVX2 static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  DK_AVX2 static M first(int64_t n) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), iota));
  }
  // masked lanes are neither read nor written (no fault past the end of an array)
  DK_AVX2 static V load(const float* p, M m) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  DK_AVX2 static void store(float* p, M m, V a) { _mm256_maskstore_ps(p, _mm256_castps_si256(m), a); }
  DK_AVX2 static V keep(M m, V a) { return _mm256_and_ps(m, a); }
  DK_AVX2 static V keep_div(M m, V a, V b) { return _mm256_and_ps(m, _mm256_div_ps(a, b)); }
  DK_AVX2 static M gt_or_nan(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NLE_UQ); }
  DK_AVX2 static unsigned lt_bits(V a, V b) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
  }
};

// float64 lanes (the whitening factors' batched Cholesky and inverse, one matrix a lane): the arithmetic they
// need, each operation correctly rounded in both sets, so a lane's results do not depend on the set.
struct Avx512d {
  using V = __m512d;
  static constexpr int W = 8;
  DK_AVX512 static V set1(double a) { return _mm512_set1_pd(a); }
  DK_AVX512 static V zero() { return _mm512_setzero_pd(); }
  DK_AVX512 static V add(V a, V b) { return _mm512_add_pd(a, b); }
  DK_AVX512 static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  DK_AVX512 static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  DK_AVX512 static V div(V a, V b) { return _mm512_div_pd(a, b); }
  DK_AVX512 static V sqrt(V a) { return _mm512_sqrt_pd(a); }
  DK_AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }  // a·b + c
  DK_AVX512 static V load(const double* p) { return _mm512_load_pd(p); }     // 64-byte aligned
  DK_AVX512 static void store(double* p, V a) { _mm512_store_pd(p, a); }
};

struct Avx2d {
  using V = __m256d;
  static constexpr int W = 4;
  DK_AVX2 static V set1(double a) { return _mm256_set1_pd(a); }
  DK_AVX2 static V zero() { return _mm256_setzero_pd(); }
  DK_AVX2 static V add(V a, V b) { return _mm256_add_pd(a, b); }
  DK_AVX2 static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  DK_AVX2 static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  DK_AVX2 static V div(V a, V b) { return _mm256_div_pd(a, b); }
  DK_AVX2 static V sqrt(V a) { return _mm256_sqrt_pd(a); }
  DK_AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  DK_AVX2 static V load(const double* p) { return _mm256_load_pd(p); }  // 32-byte aligned
  DK_AVX2 static void store(double* p, V a) { _mm256_store_pd(p, a); }
};

// The same float64 operations on 2 lanes (SSE registers, VEX-encoded FMA) and on 1 (a scalar), for the last
// matrices of a batch that fill no whole AVX2 group: a lane's arithmetic, hence its bits, is the same at every
// width.
struct Fma2d {
  using V = __m128d;
  static constexpr int W = 2;
  DK_AVX2 static V set1(double a) { return _mm_set1_pd(a); }
  DK_AVX2 static V zero() { return _mm_setzero_pd(); }
  DK_AVX2 static V add(V a, V b) { return _mm_add_pd(a, b); }
  DK_AVX2 static V sub(V a, V b) { return _mm_sub_pd(a, b); }
  DK_AVX2 static V mul(V a, V b) { return _mm_mul_pd(a, b); }
  DK_AVX2 static V div(V a, V b) { return _mm_div_pd(a, b); }
  DK_AVX2 static V sqrt(V a) { return _mm_sqrt_pd(a); }
  DK_AVX2 static V fmadd(V a, V b, V c) { return _mm_fmadd_pd(a, b, c); }
  DK_AVX2 static V load(const double* p) { return _mm_load_pd(p); }  // 16-byte aligned
  DK_AVX2 static void store(double* p, V a) { _mm_store_pd(p, a); }
};

struct Fma1d {
  using V = double;
  static constexpr int W = 1;
  DK_AVX2 static V set1(double a) { return a; }
  DK_AVX2 static V zero() { return 0.0; }
  DK_AVX2 static V add(V a, V b) { return a + b; }
  DK_AVX2 static V sub(V a, V b) { return a - b; }
  DK_AVX2 static V mul(V a, V b) { return a * b; }
  DK_AVX2 static V div(V a, V b) { return a / b; }
  DK_AVX2 static V sqrt(V a) { return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(a))); }
  DK_AVX2 static V fmadd(V a, V b, V c) { return _mm_cvtsd_f64(_mm_fmadd_sd(_mm_set_sd(a), _mm_set_sd(b), _mm_set_sd(c))); }
  DK_AVX2 static V load(const double* p) { return *p; }
  DK_AVX2 static void store(double* p, V a) { *p = a; }
};

}  // namespace simd
}  // namespace distkern
#endif  // DK_AVX512_CODE
