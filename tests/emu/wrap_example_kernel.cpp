// C entry point of the example plugin's emulated kernel (plugins/example_kernel; tests/test_kernel_emulation.py).
#include "standardized_sqdist_kernel.cu"  // rewritten by cu2cpp.py

extern "C" int emu_standardized_sqdist(int xt, const void* x, int64_t sx0, int64_t sx1, const void* mean,
                                       const void* inv_std, void* out, int64_t N, int64_t D) {
  return distkern_example_kernel::launch_standardized_sqdist(static_cast<distkern::DType>(xt), x, sx0, sx1, mean,
                                                             inv_std, out, N, D, nullptr);
}
