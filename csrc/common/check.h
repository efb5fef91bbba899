// Argument checks with messages that name the op, the argument, what was expected and what was
// given. Torch side only (never included by a .cu file).
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace distkern {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sym_sizes();  // (symbolic sizes under torch.compile print as their expressions)
  return os.str();
}

inline bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Accumulation type: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_kind(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64; got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* shape_doc) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor of shape ",
                    shape_doc, "; got a ", t.dim(), "-D tensor of shape ", shape_str(t));
}

// The device of a CUDA op's guard (c10::cuda::CUDAGuard): the dispatcher runs the CUDA kernel when
// any input is on a GPU, so the tensor the guard takes may still be on the CPU; say so in the op's
// words rather than in the guard's.
inline c10::Device cuda_device_of(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " is on ", t.device(),
                    " but another input is on a CUDA device; move all inputs to the same device");
  return t.device();
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; move them to one device");
}

}  // namespace distkern

#include "common/macros.h"

namespace distkern {

// Torch dtype → the DType a pure-CUDA launcher takes.
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK_TYPE(false, "distkern: unsupported dtype ", t);
  }
}

}  // namespace distkern
