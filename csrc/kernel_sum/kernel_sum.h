// Torch-side declarations shared by the CPU and CUDA files of kernel_matmul.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernel_sum/kernel_math.h"

namespace distkern {
namespace kernel_sum {

struct Inputs {
  at::Tensor center;  // (D,) acc: mean of y for the distance kernels, zeros for the polynomial
  at::Tensor yc;      // (M, D) acc, contiguous: y − center
  at::Tensor yy;      // (M,) acc: ‖y − center‖²
  at::Tensor v;       // (M, C) acc, contiguous; undefined for v = None (all ones, C = 1)
  Params kp;
  int64_t N, M, D, C;
  at::ScalarType acc;
};

Params make_params(const char* op, int64_t kind, at::ArrayRef<double> params, at::ScalarType acc);

Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& y,
               const c10::optional<at::Tensor>& v, int64_t kind, at::ArrayRef<double> params);

// The CUDA schedule (kernel_sum_cuda.cpp; Schedule in kernel_sum_launch.h): 0 automatic, 1 tiles
// (fused / tile panels) at every D, 2 Gram panels at every D. Process-wide; for benchmarks and tests.
void set_schedule(int64_t schedule);
int64_t schedule();

}  // namespace kernel_sum
}  // namespace distkern
