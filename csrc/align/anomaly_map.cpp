// Argument checks of the anomaly map, shared by its CPU and CUDA entry points.
#include "align/anomaly_map.h"

#include "common/check.h"

namespace distkern {
namespace align {

MapInputs prepare_map(const char* op, const at::Tensor& patches, const at::Tensor& dirs) {
  check_float(op, "patches", patches);
  check_float(op, "dirs", dirs);
  check_dim(op, "patches", patches, 4, "(L, B, P, D): layers, images, patch tokens, features");
  check_same_device(op, "dirs", dirs, "patches", patches);
  MapInputs in;
  in.L = patches.size(0);
  in.B = patches.size(1);
  in.P = patches.size(2);
  in.D = patches.size(3);
  TORCH_CHECK_VALUE(in.L >= 1, op, ": patches must hold at least one layer (the map is a mean over layers); got shape ",
                    shape_str(patches));
  TORCH_CHECK_VALUE(dirs.dim() >= 2 && dirs.dim() <= 4, op,
                    ": dirs must be (K, D), (L, K, D) or (L, B, K, D); got shape ", shape_str(dirs));
  TORCH_CHECK_VALUE(dirs.size(-1) == in.D, op, ": dirs must have the patches' D = ", in.D, " features; got shape ",
                    shape_str(dirs));
  in.K = dirs.size(-2);
  TORCH_CHECK_VALUE(in.K >= 1, op, ": dirs must hold at least one prompt pair; got shape ", shape_str(dirs));
  at::Tensor d = dirs;
  if (dirs.dim() == 2) {
    d = d.unsqueeze(0).unsqueeze(0);
  } else if (dirs.dim() == 3) {
    TORCH_CHECK_VALUE(d.size(0) == in.L, op, ": dirs (L, K, D) must have the patches' L = ", in.L,
                      " layers; got shape ", shape_str(dirs));
    d = d.unsqueeze(1);
  } else {
    TORCH_CHECK_VALUE(d.size(0) == in.L && d.size(1) == in.B, op, ": dirs (L, B, K, D) must match the patches' L = ",
                      in.L, " and B = ", in.B, "; got shape ", shape_str(dirs));
  }
  in.Ld = d.size(0);
  in.Bd = d.size(1);
  in.patches = patches.contiguous();
  in.dirs = d.to(acc_type(patches.scalar_type())).contiguous();
  return in;
}

}  // namespace align
}  // namespace distkern
