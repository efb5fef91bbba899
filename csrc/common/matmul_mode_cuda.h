// The matmul mode a CUDA launch uses for a tensor on a device (torch side; *_cuda.cpp only).
#pragma once

#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <atomic>
#include <optional>

#include "common/matmul_mode.h"

namespace distkern {

// The setting resolved for `like`'s device: Auto follows torch's allow_tf32 for cuBLAS (when
// kAutoTensorCores; else Fma); devices before sm_80, and code compiled for a virtual arch before
// sm_80 (PTX of an older arch JIT-compiled for the device, where the tensor-core kernels are
// compiled out), get Fma. (float64 runs on FMAs whatever the mode: the launchers take the
// tensor-core kernel for float32 accumulation only.)
inline cuda::MatMode matmul_mode_for(const at::Tensor& like) {
  int mode = matmul_mode_setting();
  if (mode < 0) mode = (kAutoTensorCores && at::globalContext().allowTF32CuBLAS()) ? 1 : 0;
  if (mode == 0) return cuda::MatMode::Fma;
  // Per device, asked once: may the tensor-core kernels run there (0 not asked yet, 1 yes, -1 no)?
  static std::atomic<int> tensor_cores[64] = {};
  const int dev = like.get_device();
  int ok = dev >= 0 && dev < 64 ? tensor_cores[dev].load(std::memory_order_relaxed) : 0;
  if (ok == 0) {
    ok = at::cuda::getDeviceProperties(dev)->major >= 8 && cuda::compiled_arch(dev) >= 800 ? 1 : -1;
    if (dev >= 0 && dev < 64) tensor_cores[dev].store(ok, std::memory_order_relaxed);
  }
  return ok > 0 ? static_cast<cuda::MatMode>(mode) : cuda::MatMode::Fma;
}

// The cuBLAS products a CUDA op hands to ATen (panel GEMMs, Gram panels) in distkern's mode: TF32 only in the
// Tf32 mode (and only where torch's allow_tf32 also allows it); in the float32-accurate modes (Fma, Tf32x3)
// torch's global allow_tf32 is switched off for the scope, so it cannot round them.
class CublasPrecisionGuard {
 public:
  explicit CublasPrecisionGuard(cuda::MatMode mode) {
    if (mode != cuda::MatMode::Tf32) guard_.emplace();
  }

 private:
  std::optional<at::NoTF32Guard> guard_;
};

}  // namespace distkern
