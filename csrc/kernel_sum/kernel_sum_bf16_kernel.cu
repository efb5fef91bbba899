// kernel_matmul's CUDA schedules for bfloat16 inputs (kernel_sum_tiles.cuh), in a file of their own so
// that they compile beside the float32 ones.
#include "kernel_sum/kernel_sum_tiles.cuh"

namespace distkern {
namespace kernel_sum {

cudaError_t kernel_matmul_bf16(DISTKERN_KSUM_TYPED_ARGS) {
  return typed<__nv_bfloat16>(x, sx0, sx1, center, yc, yy, v, out, N, M, D, C, kp, mode, gemm, stream);
}

}  // namespace kernel_sum
}  // namespace distkern
