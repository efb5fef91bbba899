// Nearest reference by cosine similarity: torch-side declarations shared by the CPU and CUDA files.
#pragma once

#include <ATen/ATen.h>

namespace distkern {
namespace nearest {

struct Inputs {
  at::Tensor rhat;      // (M, D) references / max(‖r‖, eps), accumulation type, contiguous
  at::Tensor inv_norm;  // (N,) 1 / max(‖x_n‖, eps), accumulation type
  int64_t N, D, M;
  at::ScalarType acc;
};

// eps = 1e-12 as torch.nn.functional.normalize.
Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& refs);

// The CUDA schedule (nearest_cuda.cpp; Schedule in nearest_launch.h): 0 automatic, 1 the fused tile kernel
// at every D, 2 Gram panels at every D. Process-wide; for tests and benchmarks.
void set_schedule(int64_t schedule);
int64_t schedule();

}  // namespace nearest
}  // namespace distkern
