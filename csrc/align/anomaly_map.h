// The anomaly map op (torch side): argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

namespace distkern {
namespace align {

struct MapInputs {
  at::Tensor patches;  // (L, B, P, D) contiguous, its own dtype
  at::Tensor dirs;     // (Ld, Bd, K, D) contiguous in the accumulation type, Ld ∈ {1, L}, Bd ∈ {1, B}
  int64_t L = 0, B = 0, P = 0, D = 0, K = 0, Ld = 1, Bd = 1;
};

// patches (L, B, P, D); dirs (K, D), (L, K, D) or (L, B, K, D).
MapInputs prepare_map(const char* op, const at::Tensor& patches, const at::Tensor& dirs);

}  // namespace align
}  // namespace distkern
