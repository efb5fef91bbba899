// C entry point of the emulated kernel_matmul tile kernel (tests/test_kernel_emulation.py, ctypes).
#include "kernel_sum/kernel_sum_kernel.cu"  // rewritten by cu2cpp.py

extern "C" int emu_kernel_matmul(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const float* center,
                                 const float* yc, const float* yy, const float* v, float* out, int64_t N, int64_t M,
                                 int64_t D, int64_t C, int kind, int ns, const double* p) {
  distkern::kernel_sum::Params kp;
  kp.kind = kind;
  kp.ns = ns;
  for (int i = 0; i < distkern::kernel_sum::kMaxParams; ++i) kp.p[i] = p[i];
  return distkern::kernel_sum::launch_kernel_matmul(static_cast<distkern::DType>(xt), x, sx0, sx1, center, yc, yy, v,
                                                    out, N, M, D, C, kp, static_cast<distkern::cuda::MatMode>(mode),
                                                    nullptr);
}
