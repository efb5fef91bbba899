// C entry points of the emulated Mahalanobis tile kernels (tests/test_kernel_emulation.py, ctypes).
#include "mahalanobis/mahalanobis_kernel.cu"  // rewritten by cu2cpp.py

using distkern::DType;
using distkern::cuda::MatMode;

extern "C" {

int emu_maha_forward(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* mean, const void* factor,
                     void* out, int64_t N, int64_t D, int64_t R, int lower) {
  return distkern::mahalanobis::launch_forward(static_cast<DType>(xt), x, sx0, sx1, mean, factor, out, N, D, R,
                                               lower != 0, static_cast<MatMode>(mode), nullptr);
}

int emu_maha_backward(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* grad, const void* mean,
                      const void* factor, void* z, void* gx, void* partial, int64_t N, int64_t D, int64_t R,
                      int lower) {
  return distkern::mahalanobis::launch_backward(static_cast<DType>(xt), x, sx0, sx1, grad, mean, factor, z, gx,
                                                partial, N, D, R, lower != 0, static_cast<MatMode>(mode), nullptr);
}

int emu_maha_k(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* means, const void* factors,
               const void* bias, void* out, int64_t* idx, int64_t N, int64_t D, int64_t R, int64_t K, int lower,
               int reduce) {
  return distkern::mahalanobis::launch_k_components(static_cast<DType>(xt), x, sx0, sx1, means, factors, bias, out,
                                                    idx, N, D, R, K, lower != 0,
                                                    static_cast<distkern::mahalanobis::KReduce>(reduce),
                                                    static_cast<MatMode>(mode), nullptr);
}

int emu_maha_pos(int xt, int ft, int mode, const void* x, int64_t sb, int64_t sp, int64_t sd, const void* means,
                 const void* factors, void* out, int64_t B, int64_t P, int64_t D, int64_t R, int lower) {
  return distkern::mahalanobis::launch_positions(static_cast<DType>(xt), static_cast<DType>(ft), x, sb, sp, sd, means,
                                                 factors, out, B, P, D, R, lower != 0, static_cast<MatMode>(mode),
                                                 nullptr);
}
int emu_maha_k_shared(int xt, int mode, const void* x, int64_t sx0, int64_t sx1, const void* center,
                      const void* bmat, const void* zz, const void* vv, const void* bias, void* out, int64_t* idx,
                      int64_t N, int64_t D, int64_t K, int reduce) {
  return distkern::mahalanobis::launch_k_shared(static_cast<DType>(xt), x, sx0, sx1, center, bmat, zz, vv, bias, out,
                                                idx, N, D, K, static_cast<distkern::mahalanobis::KReduce>(reduce),
                                                static_cast<MatMode>(mode), nullptr);
}
}
