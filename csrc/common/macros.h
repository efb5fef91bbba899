// Host/device qualifiers shared by the CPU (C++) and CUDA (.cu) builds. No torch here.
#pragma once

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline
#endif

#include <cstdint>

// CPU loops that are bound by the cache bandwidth: GCC builds an AVX2 clone next to the baseline
// (x86-64) one and picks at load time (ifunc), so the wheel stays portable and AVX2 machines move 32
// bytes per load instead of 16.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DK_CPU_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DK_CPU_MULTIVERSION
#endif

// distkern's AVX-512 and AVX2 CPU code (common/cpu_gemm.cpp, common/simd_math.h and their users): x86-64
// GCC on Linux, compiled per function with `#pragma GCC target("avx512f")` or ("avx2,fma") and chosen at
// run time (cpu::gemm_isa, cpu::math_isa), so the build itself needs neither -mavx512f nor -mavx2.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DK_AVX512_CODE 1
#else
#define DK_AVX512_CODE 0
#endif

namespace distkern {

// Element type of a tensor handed to a pure-CUDA launcher (the .cu files see no torch types).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "?";
}

}  // namespace distkern
