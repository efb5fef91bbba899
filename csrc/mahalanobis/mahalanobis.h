// Torch-side declarations shared by the CPU and CUDA files of the Mahalanobis op.
#pragma once

#include <ATen/ATen.h>

namespace distkern {
namespace mahalanobis {

// Checked inputs: mean (D) and factor (D×R) converted once to the accumulation type and made
// contiguous (D and D·R values: cheap next to the N·D·R work of the op).
struct Inputs {
  at::Tensor mean;    // (D,) acc type, contiguous
  at::Tensor factor;  // (D, R) acc type, contiguous; lower triangle only when lower
  int64_t N, D, R;
  at::ScalarType acc;
};

Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& mean,
               const at::Tensor& factor, bool lower);

// grad (N,) → acc type, contiguous.
at::Tensor prepare_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                        const Inputs& in);

}  // namespace mahalanobis
}  // namespace distkern
