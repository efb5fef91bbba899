// How the CUDA tile-product kernels multiply float32 tiles (no torch here; usable in .cu files).
//
//   Fma     float32 FMAs on the CUDA cores: products and sums exact to float32 rounding.
//   Tf32    tensor cores (mma, TF32 inputs: 10-bit mantissas, float32 accumulation), as cuBLAS with
//           torch.backends.cuda.matmul.allow_tf32 — relative error of a product ~1e-3.
//   Tf32x3  tensor cores, fp32-accurate: each operand split a = a_big + a_small (both TF32) and
//           a·b ≈ a_big·b_big + a_big·b_small + a_small·b_big (three mma): float32-level error.
//
// The process-wide setting (set_matmul_mode, Python distkern.set_cuda_matmul) is Auto by default:
// Tf32 when torch allows TF32 in cuBLAS matmuls (torch.backends.cuda.matmul.allow_tf32, or
// torch.set_float32_matmul_precision("high" / "medium")), else Fma — the same precision eager
// PyTorch matmuls get — once kAutoTensorCores is true. float64 always runs on FMAs; the
// tensor-core modes need sm_80 or newer (older devices fall back to Fma). No effect on the CPU.
#pragma once

namespace distkern {
namespace cuda {

enum class MatMode : int { Fma = 0, Tf32 = 1, Tf32x3 = 2 };

// The virtual architecture (as __CUDA_ARCH__: 800, 900, ...) of the code this build runs on CUDA
// device `device`, 0 when it cannot be told (common/arch_probe_kernel.cu; CUDA builds only).
int compiled_arch(int device);

}  // namespace cuda

// Whether Auto may pick the tensor-core kernels. They have run only in the CPU emulation of the
// tests, not yet on a GPU: until their CUDA tests pass on one (benchmarks/gpu_check.sh), Auto stays
// on FMAs — a script that sets torch.set_float32_matmul_precision("high") for its own matmuls must
// not switch distkern to unverified kernels — and "tf32" / "3xtf32" are taken only when asked for.
constexpr bool kAutoTensorCores = false;

// -1 Auto, else a MatMode value.
void set_matmul_mode(int mode);
int matmul_mode_setting();

}  // namespace distkern
