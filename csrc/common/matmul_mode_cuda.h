// The matmul mode a CUDA launch uses for a tensor on a device (torch side; *_cuda.cpp only).
#pragma once

#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <atomic>

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
  const int dev = like.get_device();
  if (at::cuda::getDeviceProperties(dev)->major < 8) return cuda::MatMode::Fma;
  static std::atomic<int> arch[64] = {};  // per device: 0 unknown, else compiled arch (or -1)
  int a = dev >= 0 && dev < 64 ? arch[dev].load(std::memory_order_relaxed) : 0;
  if (a == 0) {
    a = cuda::compiled_arch(dev);
    if (a == 0) a = -1;
    if (dev >= 0 && dev < 64) arch[dev].store(a, std::memory_order_relaxed);
  }
  if (a < 800) return cuda::MatMode::Fma;
  return static_cast<cuda::MatMode>(mode);
}

}  // namespace distkern
