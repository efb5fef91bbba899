// C entry point of the emulated anomaly-map kernel (tests/test_kernel_emulation.py, ctypes).
#include "align/anomaly_map_kernel.cu"  // rewritten by cu2cpp.py

// workspace: null (all layers in one block) or L·B·P elements of out's type (a block per layer, then the mean)
extern "C" int emu_anomaly_map(int dtype, int mode, const void* patches, const void* dirs, void* out, int64_t L,
                               int64_t B, int64_t P, int64_t D, int64_t K, int64_t Ld, int64_t Bd, void* workspace) {
  return distkern::align::launch_anomaly_map(static_cast<distkern::DType>(dtype), patches, dirs, out, L, B, P, D, K,
                                             Ld, Bd, static_cast<distkern::cuda::MatMode>(mode), workspace, nullptr);
}

extern "C" int64_t emu_anomaly_map_workspace(int dtype, int mode, int64_t L, int64_t B, int64_t P) {
  return distkern::align::anomaly_map_workspace(static_cast<distkern::DType>(dtype),
                                                static_cast<distkern::cuda::MatMode>(mode), L, B, P);
}
