// kernel_matmul's CUDA launcher: float32 inputs here, float16 / bfloat16 in kernel_sum_f16_kernel.cu /
// kernel_sum_bf16_kernel.cu (the schedules: kernel_sum_tiles.cuh).
#include "kernel_sum/kernel_sum_tiles.cuh"

namespace distkern {
namespace kernel_sum {

cudaError_t launch_kernel_matmul(DType xtype, const void* x, int64_t sx0, int64_t sx1,
                                 const float* center, const float* yc, const float* yy,
                                 const float* v, float* out, int64_t N, int64_t M, int64_t D,
                                 int64_t C, const Params& kp_in, cuda::MatMode mode, const PanelGemm* gemm,
                                 cudaStream_t stream) {
  if (N <= 0 || M <= 0) return cudaSuccess;
  // TF32 products carry ~2⁻¹¹ of the norms in x·y, which the square root of the Laplacian and distance
  // kernels turns into percents of r just beyond float32's refinement radius (2⁻¹⁰ of the norms): refine
  // out to 2⁻⁴ there, which keeps r within ~0.2 % (3xTF32 and FMA products are float32-accurate)
  Params kp = kp_in;
  if (mode == cuda::MatMode::Tf32 && kp.exact_frac < 1.0f / 16) kp.exact_frac = 1.0f / 16;
  if (gemm != nullptr) {
    const PanelPlan& pl = gemm->plan;
    if (gemm->workspace == nullptr || gemm->fn == nullptr || pl.rows <= 0 || pl.cols <= 0 || pl.ld < pl.cols)
      return cudaErrorInvalidValue;
    if (pl.gram && (gemm->gram == nullptr || gemm->xx == nullptr || pl.rows > 65535)) return cudaErrorInvalidValue;
  }
  switch (xtype) {
    case DType::F32: return typed<float>(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, gemm, stream);
    case DType::F16:
      return kernel_matmul_f16(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, gemm, stream);
    case DType::BF16:
      return kernel_matmul_bf16(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, gemm, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kernel_sum
}  // namespace distkern
