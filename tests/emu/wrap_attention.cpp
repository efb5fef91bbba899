// C entry point of the emulated fused shared-K/V attention kernel (tests/test_kernel_emulation.py, ctypes).
#include "align/attention_kernel.cu"  // rewritten by cu2cpp.py

extern "C" int emu_attention(int dtype, const void* q, const void* x, const bool* mask, void* out, float* lse,
                             int64_t B, int64_t M, int64_t P, int64_t D) {
  return distkern::align::launch_shared_kv_attention(static_cast<distkern::DType>(dtype), q, x, mask, out, lse, B, M,
                                                     P, D, nullptr);
}
