// Vector math for distkern's AVX-512 CPU code (where DK_AVX512_CODE): each function is compiled for
// AVX-512F whatever the file's flags, and inlines into callers compiled for it (a
// `#pragma GCC target("avx512f")` region), which run only where cpu::fast_gemm_enabled().
#pragma once

#include "common/macros.h"

#if DK_AVX512_CODE
#include <immintrin.h>

#define DK_AVX512 __attribute__((target("avx512f"), always_inline)) inline

namespace distkern {
namespace avx512 {

// exp(x) for float32 lanes: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two, Cody–Waite), e^r = 1 + r +
// r²·P(r) with Cephes' expf coefficients, then ·2ⁿ by scalef, which underflows gradually to 0 and
// overflows to inf. x is first clamped to [-104, 89] (e^-104 rounds to 0, e^89 to inf), keeping NaN:
// max/min return their second operand when either is NaN.
DK_AVX512 __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, n);
}

// σ(x) = 1 / (1 + e^(−x)) on 16 lanes (0 for x → −∞ through e^(−x) = inf, NaN kept).
DK_AVX512 __m512 vsigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

}  // namespace avx512
}  // namespace distkern
#endif  // DK_AVX512_CODE
