// The matmul mode a CUDA launch uses for a tensor on a device (torch side; *_cuda.cpp only).
#pragma once

#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include "common/matmul_mode.h"

namespace distkern {

// The setting resolved for `like`'s device: Auto follows torch's allow_tf32 for cuBLAS (when
// kAutoTensorCores; else Fma); devices before sm_80 get Fma. (float64 runs on FMAs whatever the mode: the launchers take the tensor-core
// kernel for float32 accumulation only.)
inline cuda::MatMode matmul_mode_for(const at::Tensor& like) {
  int mode = matmul_mode_setting();
  if (mode < 0) mode = (kAutoTensorCores && at::globalContext().allowTF32CuBLAS()) ? 1 : 0;
  if (mode == 0) return cuda::MatMode::Fma;
  if (at::cuda::getDeviceProperties(like.get_device())->major < 8) return cuda::MatMode::Fma;
  return static_cast<cuda::MatMode>(mode);
}

}  // namespace distkern
