// AVX-512 φ for the CPU kernel-sum tiles (see phi_cpu.h for why and the contract). Each kind below is
// kernel_math.h's phi written on 16 lanes, in the same order of operations where it matters: r² and its
// clamp, the NaN rules, the zero subgradients at r = 0.
#include "kernel_sum/phi_cpu.h"

#include <cmath>

#include "common/avx512_math.h"
#include "common/cpu_gemm.h"
#include "common/macros.h"

namespace distkern {
namespace kernel_sum {
#if DK_AVX512_CODE
namespace {

// An integer exponent 0..16 (the range kernel_math.h's dk_pow_kernel squares), else -1.
int small_integer(double e) {
  return e >= 0 && e <= 16 && e == std::floor(e) ? static_cast<int>(e) : -1;
}

}  // namespace
#endif

bool phi_avx512_takes(const Params& kp) {
#if DK_AVX512_CODE
  if (!cpu::avx512_enabled()) return false;  // AVX-512F present, its kernel chosen
  if (kp.kind == kPolynomial) return small_integer(kp.p[2]) >= 0;
  if (kp.kind == kPolynomialD) return small_integer(kp.p[2] - 1) >= 0;
  return kp.kind >= 0 && kp.kind < kNumKinds;
#else
  (void)kp;
  return false;
#endif
}

#if DK_AVX512_CODE
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's avx512fintrin.h builds max/min/sqrt/scalef/roundscale on _mm512_undefined_ps and then
// warns that it "may be used uninitialized" once inlined here (a known false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// a^e for an integer e ≥ 0 by repeated squaring, as dk_pow_kernel does on the CPU.
inline __m512 vipow(__m512 a, int e) {
  __m512 r = _mm512_set1_ps(1.0f), b = a;
  while (e > 0) {
    if (e & 1) r = _mm512_mul_ps(r, b);
    b = _mm512_mul_ps(b, b);
    e >>= 1;
  }
  return r;
}

// φ of one kind on 16 lanes of r² (distance kinds) or x·y (polynomial kinds).
template <int Kind>
inline __m512 vphi(const Params& kp, __m512 r2, __m512 dot) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  __m512 s = zero;
  if constexpr (Kind == kGaussian || Kind == kGaussianD) {
    for (int i = 0; i < kp.ns; ++i) {
      const __m512 p = _mm512_set1_ps(static_cast<float>(kp.p[i]));
      const __m512 e = avx512::vexp(_mm512_mul_ps(_mm512_sub_ps(zero, r2), p));
      s = Kind == kGaussian ? _mm512_add_ps(s, e) : _mm512_fnmadd_ps(p, e, s);
    }
    return s;
  } else if constexpr (Kind == kLaplacian || Kind == kLaplacianD) {
    const __m512 r = _mm512_sqrt_ps(r2);
    for (int i = 0; i < kp.ns; ++i) {
      const __m512 p = _mm512_set1_ps(static_cast<float>(kp.p[i]));
      const __m512 e = avx512::vexp(_mm512_mul_ps(_mm512_sub_ps(zero, r), p));
      s = Kind == kLaplacian ? _mm512_add_ps(s, e) : _mm512_fnmadd_ps(p, e, s);
    }
    if constexpr (Kind == kLaplacian) {
      return s;
    } else {
      // subgradient 0 at r = 0; a NaN r² is "not ≤ 0" and stays NaN
      const __mmask16 pos = _mm512_cmp_ps_mask(r2, zero, _CMP_NLE_UQ);
      return _mm512_maskz_div_ps(pos, s, _mm512_add_ps(r, r));
    }
  } else if constexpr (Kind == kIMQ || Kind == kIMQD) {
    for (int i = 0; i < kp.ns; ++i) {
      const __m512 p = _mm512_set1_ps(static_cast<float>(kp.p[i]));
      const __m512 b = _mm512_add_ps(one, _mm512_mul_ps(r2, p));
      if constexpr (Kind == kIMQ) {
        s = _mm512_add_ps(s, _mm512_div_ps(one, _mm512_sqrt_ps(b)));
      } else {
        const __m512 h = _mm512_mul_ps(_mm512_set1_ps(0.5f), p);
        s = _mm512_sub_ps(s, _mm512_div_ps(h, _mm512_mul_ps(b, _mm512_sqrt_ps(b))));
      }
    }
    return s;
  } else if constexpr (Kind == kPolynomial || Kind == kPolynomialD) {
    const __m512 base = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(static_cast<float>(kp.p[0])), dot),
                                      _mm512_set1_ps(static_cast<float>(kp.p[1])));
    if constexpr (Kind == kPolynomial) {
      return vipow(base, small_integer(kp.p[2]));
    } else {
      const __m512 c = _mm512_set1_ps(static_cast<float>(kp.p[2]) * static_cast<float>(kp.p[0]));
      return _mm512_mul_ps(c, vipow(base, small_integer(kp.p[2] - 1)));
    }
  } else if constexpr (Kind == kDistance) {
    return _mm512_sqrt_ps(r2);
  } else {  // kDistanceD: 1/(2r), 0 at r = 0, NaN for a NaN r²
    const __mmask16 pos = _mm512_cmp_ps_mask(r2, zero, _CMP_NLE_UQ);
    return _mm512_maskz_div_ps(pos, _mm512_set1_ps(0.5f), _mm512_sqrt_ps(r2));
  }
}

template <int Kind>
void row(const Params& kp, float* k, int64_t n, float xx, const float* yy, std::vector<int64_t>& refine) {
  constexpr bool dist = Kind != kPolynomial && Kind != kPolynomialD;
  const __m512 vxx = _mm512_set1_ps(xx), zero = _mm512_setzero_ps();
  const __m512 xg = _mm512_set1_ps(xx - xx);
  const __m512 frac = _mm512_set1_ps(kp.exact_frac);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 dot = _mm512_maskz_loadu_ps(m, k + j);
    __m512 r2 = zero;
    if constexpr (dist) {
      // sq_dist: xx + yy − 2·dot + ((xx − xx) + (yy − yy)), clamped at 0 keeping NaN
      const __m512 vyy = _mm512_maskz_loadu_ps(m, yy + j);
      r2 = _mm512_sub_ps(_mm512_add_ps(vxx, vyy), _mm512_add_ps(dot, dot));
      r2 = _mm512_add_ps(r2, _mm512_add_ps(xg, _mm512_sub_ps(vyy, vyy)));
      r2 = _mm512_max_ps(zero, r2);
      // needs_exact_r2: r² < exact_frac · (xx + yy)
      __mmask16 near = _mm512_mask_cmp_ps_mask(m, r2, _mm512_mul_ps(frac, _mm512_add_ps(vxx, vyy)), _CMP_LT_OQ);
      while (near) {
        refine.push_back(j + __builtin_ctz(near));
        near &= static_cast<__mmask16>(near - 1);
      }
    }
    _mm512_mask_storeu_ps(k + j, m, vphi<Kind>(kp, r2, dot));
  }
}

}  // namespace

void phi_row_avx512(const Params& kp, float* k, int64_t n, float xx, const float* yy, std::vector<int64_t>& refine) {
  switch (kp.kind) {
    case kGaussian: return row<kGaussian>(kp, k, n, xx, yy, refine);
    case kLaplacian: return row<kLaplacian>(kp, k, n, xx, yy, refine);
    case kIMQ: return row<kIMQ>(kp, k, n, xx, yy, refine);
    case kPolynomial: return row<kPolynomial>(kp, k, n, xx, yy, refine);
    case kDistance: return row<kDistance>(kp, k, n, xx, yy, refine);
    case kGaussianD: return row<kGaussianD>(kp, k, n, xx, yy, refine);
    case kLaplacianD: return row<kLaplacianD>(kp, k, n, xx, yy, refine);
    case kIMQD: return row<kIMQD>(kp, k, n, xx, yy, refine);
    case kPolynomialD: return row<kPolynomialD>(kp, k, n, xx, yy, refine);
    case kDistanceD: return row<kDistanceD>(kp, k, n, xx, yy, refine);
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
void phi_row_avx512(const Params&, float*, int64_t, float, const float*, std::vector<int64_t>&) {}
#endif  // DK_AVX512_CODE

}  // namespace kernel_sum
}  // namespace distkern
