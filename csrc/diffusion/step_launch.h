// Launchers of the fused sampler-step CUDA kernels on raw pointers and a stream (no torch types).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/macros.h"

namespace distkern {
namespace diffusion {

// Pointers are to contiguous (B, n) tensors of one dtype; null when absent. `coefs` holds the 8
// batch-wide coefficients when `per_sample` (B×8 float64 on the device) is null.
struct StepArgs {
  const void* x = nullptr;
  const void* m = nullptr;
  const void* px0 = nullptr;
  const void* noise = nullptr;
  void* out = nullptr;   // prev (forward) / dL/dx (backward)
  void* x0 = nullptr;    // x0 (forward) / dL/dm (backward)
  void* gpx0 = nullptr;  // dL/dprev_x0 (backward)
  const void* grad_prev = nullptr;
  const void* grad_x0 = nullptr;
  const double* per_sample = nullptr;
  double coefs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t B = 0, n = 0, numel = 0;
  int clip_mode = 0;
  double clip_range = 1.0, ratio = 0.995, max_value = 1.0;
  int64_t seed = -1, offset = 0;
  void* scale = nullptr;  // B values of the accumulation type: dynamic-threshold scales (scratch)
};

// prev and x0; with dynamic thresholding, first one block per sample selects its quantile of |x0|
// into `scale`.
cudaError_t launch_sampler_step(DType t, const StepArgs& a, cudaStream_t stream);
// dL/dx, dL/dm, dL/dprev_x0 (clip modes 0 and 1).
cudaError_t launch_sampler_step_backward(DType t, const StepArgs& a, cudaStream_t stream);

}  // namespace diffusion
}  // namespace distkern
