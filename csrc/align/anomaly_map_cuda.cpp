// CUDA entry point of the anomaly map: checks, device guard, stream, dtype → launcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "align/anomaly_map.h"
#include "align/anomaly_map_launch.h"
#include "common/check.h"
#include "common/matmul_mode_cuda.h"

namespace distkern {
namespace align {
namespace {

at::Tensor anomaly_map_cuda(const at::Tensor& patches, const at::Tensor& dirs) {
  const c10::cuda::CUDAGuard guard(cuda_device_of("distkern.anomaly_map", "patches", patches));
  MapInputs in = prepare_map("distkern.anomaly_map", patches, dirs);
  TORCH_CHECK_VALUE(in.B <= 65535, "distkern.anomaly_map: at most 65535 images per call on CUDA; got B = ", in.B);
  at::Tensor out = at::empty({in.B, in.P}, in.dirs.options());
  if (in.B == 0 || in.P == 0) return out;
  if (in.D == 0) return out.fill_(0.5);
  const cuda::MatMode mode = matmul_mode_for(in.patches);
  // the FMA kernel's per-layer sums (L·B·P values, 0.7 MiB at Bayes-PFL's B = 32): L times the blocks
  const DType xtype = to_dtype(in.patches.scalar_type());
  const int64_t ws = anomaly_map_workspace(xtype, mode, in.L, in.B, in.P);
  at::Tensor part;
  if (ws > 0) part = at::empty({ws}, out.options());
  C10_CUDA_CHECK(launch_anomaly_map(xtype, in.patches.data_ptr(), in.dirs.data_ptr(),
                                    out.data_ptr(), in.L, in.B, in.P, in.D, in.K, in.Ld, in.Bd, mode,
                                    part.defined() ? part.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distkern, CUDA, m) { m.impl("anomaly_map", &anomaly_map_cuda); }

}  // namespace align
}  // namespace distkern
