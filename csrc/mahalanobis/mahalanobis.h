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

// The single-Gaussian forward's CUDA schedule (mahalanobis_cuda.cpp; Schedule in mahalanobis_launch.h):
// 0 automatic, 1 the tile kernel, 2 Gram panels wherever they apply (float32 accumulation). Process-wide; for
// tests and benchmarks.
void set_schedule(int64_t schedule);
int64_t schedule();

// grad (N,) → acc type, contiguous.
at::Tensor prepare_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                        const Inputs& in);

}  // namespace mahalanobis
}  // namespace distkern

namespace distkern {
namespace mahalanobis {

// Checked inputs of the K-Gaussian ops. factors is either one shared (D, R) factor or one per
// component (K, D, R); for a shared factor the K transformed means are precomputed here
// (K·D·R work, next to the N·D·R + N·R·K of the op):
//   center = mean of the means (D), V = (means − center)·W (K×R), vv = ‖V_k‖² (K),
//   bmat = W·Vᵀ (D×K).
struct KInputs {
  at::Tensor means;    // (K, D) acc, contiguous
  at::Tensor factors;  // (D, R) or (K, D, R) acc, contiguous
  at::Tensor bias;     // (K,) acc or undefined
  bool shared = false;
  at::Tensor center, V, vv, bmat;
  int64_t N, D, R, K;
  at::ScalarType acc;
};

// Checked inputs of the per-position op: x (B, P, D), means (P, D) → acc type, factors (P, D, R)
// kept in their own dtype and NOT copied (at PaDiM's sizes they are gigabytes): fp32/fp16/bf16,
// or float64 with float64 x. Contiguous factors are required for that reason.
struct PosInputs {
  at::Tensor means;  // (P, D) acc, contiguous
  int64_t B, P, D, R;
  at::ScalarType acc;
};

PosInputs prepare_pos(const char* op, const at::Tensor& x, const at::Tensor& means,
                      const at::Tensor& factors, bool lower);

KInputs prepare_k(const char* op, const at::Tensor& x, const at::Tensor& means,
                  const at::Tensor& factors, bool lower, const c10::optional<at::Tensor>& bias);

}  // namespace mahalanobis
}  // namespace distkern
