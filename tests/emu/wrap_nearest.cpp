// C entry point of the emulated nearest-reference tile kernel (tests/test_kernel_emulation.py, ctypes).
#include "mahalanobis/nearest_kernel.cu"  // rewritten by cu2cpp.py

extern "C" int emu_nearest(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* rhat,
                           const void* inv_norm, void* out, int64_t* idx, int64_t N, int64_t D, int64_t M) {
  return distkern::nearest::launch_nearest(static_cast<distkern::DType>(xt), x, sx0, sx1, rhat, inv_norm, out, idx, N,
                                           D, M, static_cast<distkern::cuda::MatMode>(mode), nullptr);
}
