// The process-wide matmul mode of the CUDA tile-product kernels (see matmul_mode.h).
#include "common/matmul_mode.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace distkern {
namespace {

std::atomic<int> g_mode{-1};

}  // namespace

void set_matmul_mode(int mode) {
  TORCH_CHECK_VALUE(mode >= -1 && mode <= 2, "distkern: matmul mode must be -1 (auto), 0 (fma), 1 (tf32) or 2 (3xtf32); got ",
                    mode);
  g_mode.store(mode);
}

int matmul_mode_setting() { return g_mode.load(); }

}  // namespace distkern
