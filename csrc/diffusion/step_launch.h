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
  // Dynamic thresholding over select_blocks > 1 blocks a sample (see select_blocks_for): select_ws is
  // then a zeroed workspace of B × kSelectWords 64-bit words (per-sample histogram and select state).
  int64_t select_blocks = 1;
  void* select_ws = nullptr;
};

// The dynamic-thresholding select: one block per sample up to kSelectMultiMin elements a sample (or
// from 512 samples on, which fill the GPU alone), else G blocks a sample that meet in a global
// histogram, ~16K elements each, ~512 blocks in all at most.
constexpr int64_t kSelectWords = 264;
constexpr int64_t kSelectMultiMin = int64_t(1) << 17;
inline int64_t select_blocks_for(int64_t B, int64_t n) {
  if (n < kSelectMultiMin || B <= 0 || B > 65535) return 1;
  const int64_t by_size = (n + 16383) / 16384, by_grid = B < 512 ? 512 / B : 1;
  return by_size < by_grid ? by_size : by_grid;
}

// prev and x0; with dynamic thresholding, first the select (one block, or select_blocks blocks, per
// sample) writes each sample's quantile-derived limit into `scale`.
cudaError_t launch_sampler_step(DType t, const StepArgs& a, cudaStream_t stream);
// dL/dx, dL/dm, dL/dprev_x0 (clip modes 0 and 1).
cudaError_t launch_sampler_step_backward(DType t, const StepArgs& a, cudaStream_t stream);

}  // namespace diffusion
}  // namespace distkern
