// Which virtual architecture the kernels running on a device were compiled for. A build whose
// arch list lacks the device's own code runs PTX JIT-compiled from an older virtual arch (e.g.
// "7.5+PTX" on an A100): the tensor-core tile kernels are compiled out below sm_80, so the launchers
// must not pick them there even though the device has tensor cores.
#include <cuda_runtime.h>

#include "common/matmul_mode.h"

namespace distkern {
namespace cuda {
namespace {

__global__ void arch_probe_kernel() {}

}  // namespace

int compiled_arch(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return 0;
  if (prev != device && cudaSetDevice(device) != cudaSuccess) return 0;
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, arch_probe_kernel);
  if (prev != device) cudaSetDevice(prev);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the caller falls back to the FMA kernels
    return 0;
  }
  return attr.ptxVersion * 10;  // e.g. 80 → 800, as __CUDA_ARCH__
}

}  // namespace cuda
}  // namespace distkern
