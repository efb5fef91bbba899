// The one torch library of distkern: every op schema lives here, and the Python module _C exposes
// the build facts. Per-op CPU / CUDA files add their kernels with TORCH_LIBRARY_IMPL.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "align/attention.h"
#include "common/cpu_gemm.h"
#include "common/matmul_mode.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef DISTKERN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernel_sum/kernel_sum.h"
#include "mahalanobis/mahalanobis.h"
#include "mahalanobis/mahalanobis_launch.h"
#include "mahalanobis/nearest.h"
#endif

#ifndef DISTKERN_VERSION
#define DISTKERN_VERSION "0+unknown"
#endif
#ifndef DISTKERN_ARCHS
#define DISTKERN_ARCHS ""
#endif

TORCH_LIBRARY(distkern, m) {
  // Squared Mahalanobis distance of each row of x (N, D) to N(mean, Σ) with Σ⁻¹ = W Wᵀ,
  // W = factor (D, R): lower-triangular (D, D) when lower, any (D, R) otherwise. Returns (N,)
  // in float32 (float64 for float64 x).
  m.def("mahalanobis(Tensor x, Tensor mean, Tensor factor, bool lower=True) -> Tensor");
  // Gradients of Σₙ grad[n]·d²[n]: (∂/∂x (N, D) in x's dtype, ∂/∂mean (D,) in float32/float64).
  m.def(
      "mahalanobis_backward(Tensor grad, Tensor x, Tensor mean, Tensor factor, bool lower=True)"
      " -> (Tensor, Tensor)");
  // K Gaussians: x (N, D), means (K, D), factors one shared (D, R) or one per component
  // (K, D, R). Squared distances (N, K); their minimum and argmin over K; or the GMM-style
  // logsumexp_k(bias[k] − d²_k / 2).
  m.def("mahalanobis_k(Tensor x, Tensor means, Tensor factors, bool lower=True) -> Tensor");
  m.def("mahalanobis_k_min(Tensor x, Tensor means, Tensor factors, bool lower=True) -> (Tensor, Tensor)");
  m.def(
      "mahalanobis_k_logsumexp(Tensor x, Tensor means, Tensor factors, Tensor bias, bool lower=True)"
      " -> Tensor");
  // Per-position Gaussians (PaDiM): x (B, P, D), means (P, D), factors (P, D, R) in fp32/fp16/bf16
  // (read in place, never copied). Returns (B, P) squared distances.
  m.def("mahalanobis_pos(Tensor x, Tensor means, Tensor factors, bool lower=True) -> Tensor");
  // Nearest reference by cosine similarity (ResAD): x (N, D), refs (M, D) → (max cosine (N,),
  // argmax (N,) int64), without the N×M similarity matrix.
  m.def("nearest_cosine(Tensor x, Tensor refs) -> (Tensor, Tensor)");
  // Whitening factors L (G, D, D), lower-triangular with (scale·Σ_g + ridge·I)⁻¹ = L Lᵀ, of covariances
  // (or scatter matrices, with scale = 1/n) cov (G, D, D), computed in float64 (csrc/mahalanobis/factor.cpp),
  // returned in dtype (None: float64); with symmetrize, Σ is ½(cov + covᵀ). info (G,) int32: 0, or the order
  // of the leading minor that is not positive definite (L is then NaN on the CPU, undefined on CUDA).
  m.def("whitening_factors(Tensor cov, float ridge=0., bool symmetrize=True, ScalarType? dtype=None, "
        "float scale=1.) -> (Tensor, Tensor)");
  // The same, consuming cov: its contents are undefined afterwards, and on the CPU the memory of each matrix
  // that factorised goes back to the operating system as the op goes (GaussianStats.factor(release=True):
  // PaDiM's factors then take the place of its scatter instead of adding to it).
  m.def("whitening_factors_release_(Tensor(a!) cov, float ridge=0., bool symmetrize=True, ScalarType? dtype=None, "
        "float scale=1.) -> (Tensor, Tensor)");
  // One batch's moments for a single Gaussian's streaming fit (csrc/mahalanobis/moments.cpp): x (N, D) →
  // float64 (Σ x_i (D,), Σ z_i z_iᵀ (D, D), Σ s_i z_i (D,), Σ s_i² ()) for z_i = x_i − mean (rounded to float32
  // unless double_products), s_i = ‖z_i‖², the products in float32 (float64 with double_products).
  m.def("centred_moments(Tensor x, bool double_products=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Kernel sums: K(x, y) @ v without storing K. x (N, D), y (M, D), v (M, C) or None (ones:
  // returns (N,)); kernel ids and params in csrc/kernel_sum/kernel_math.h.
  m.def("kernel_matmul(Tensor x, Tensor y, Tensor? v, int kernel, float[] params) -> Tensor");
  // Dense products of mmd2's small-sample path: z·zᵀ (n, n) and a @ b, float32 / float64, no autograd
  // (csrc/kernel_sum/dense.cpp; on the CPU in float32 through distkern's AVX-512 kernel).
  m.def("dense_gram(Tensor z) -> Tensor");
  m.def("dense_mm(Tensor a, Tensor b) -> Tensor");
  // mmd2's small-sample estimator on the CPU: (value, B (rows, n + m), x and y centred (n, D), (m, D) —
  // (0, D) each for the polynomial kernel, which uses x and y as they are) for kernel id and params as
  // kernel_matmul's, estimator 0 biased / 1 unbiased / 2 ustat; and the gradient rows from B and [x; y].
  m.def(
      "dense_mmd(Tensor x, Tensor y, int kernel, float[] params, int estimator, bool need_x, bool need_y)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dense_mmd_grad(Tensor b, Tensor x, Tensor y, int row0, bool dot) -> Tensor");
  // Fused diffusion sampler step (csrc/diffusion/step_math.h): per element, x0 = a·x + b·m + g·n,
  // clipped (clip_mode 0 none, 1 clamp to ±clip_range, 2 dynamic thresholding at quantile `ratio`
  // of |x0| per sample, scale clamped to [1, max_value]), prev = p·x0 + r·x + w·m + u·prev_x0 + s·n.
  // Coefficients: 8 floats, or a (B, 8) float64 table for per-sample timesteps. Noise n: the tensor,
  // or drawn in the kernel from (seed, offset) when seed >= 0, else 0. Returns (prev, x0), (B, ...).
  m.def(
      "sampler_step(Tensor sample, Tensor model_output, Tensor? prev_x0, Tensor? noise, float[] coefs,"
      " Tensor? per_sample, int clip_mode=0, float clip_range=1.0, float ratio=0.995, float max_value=1.0,"
      " int seed=-1, int offset=0) -> (Tensor, Tensor)");
  // Its gradients w.r.t. (sample, model_output, prev_x0) from those w.r.t. (prev, x0).
  m.def(
      "sampler_step_backward(Tensor grad_prev, Tensor? grad_x0, Tensor sample, Tensor model_output,"
      " Tensor? noise, float[] coefs, Tensor? per_sample, int clip_mode=0, float clip_range=1.0, int seed=-1,"
      " int offset=0) -> (Tensor, Tensor, Tensor)");
  // Gaussian N(mean, U diag(lam) Uᵀ), U (D, r) orthonormal: the optimal denoiser at sigma, or (with
  // sigma_to) the closed-form probability-flow map from sigma to sigma_to. x (B, ...), sigma scalar
  // or (B,). See csrc/diffusion/gaussian.cpp.
  m.def(
      "gaussian_lowrank(Tensor x, Tensor mean, Tensor U, Tensor lam, Tensor sigma, Tensor? sigma_to=None)"
      " -> Tensor");
  // Anomaly map of CLIP-style zero-shot detection: patches (L, B, P, D), prompt-pair directions
  // d = τ(t̂₁ − t̂₀) as (K, D), (L, K, D) or (L, B, K, D) → (B, P), the mean over layers and pairs of
  // σ(x̂ · d) = softmax over each (normal, abnormal) pair of the temperature-scaled cosines.
  m.def("anomaly_map(Tensor patches, Tensor dirs) -> Tensor");
  // Attention with keys = values = x (the token-space form of prompt_align's cross-modal attention,
  // csrc/align/attention.cpp): q (B, M, D), x (B, P, D), mask (B, P) bool or None → (softmax(q xᵀ) x
  // (B, M, D), row log-sum-exp (B, M)), streamed over P in tiles with an online softmax.
  m.def("shared_kv_attention(Tensor q, Tensor x, Tensor? mask=None, int tile=256) -> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = DISTKERN_VERSION;
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
#ifdef DISTKERN_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  d["cuda_archs"] = DISTKERN_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_max_threads"] = 1;
#endif
  d["intraop_threads"] = at::get_num_threads();
  d["compiler"] = __VERSION__;
  d["cpu_gemm"] = distkern::cpu::gemm_isa();  // which CPU product kernel runs here (avx512 / avx2 / none)
  d["cpu_math"] = distkern::cpu::math_isa_name();  // the lanes of the CPU φ / sigmoid (avx512 / avx2 / none)
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "distkern compiled kernels (ops are registered under torch.ops.distkern)";
  m.def("build_info", &build_info, "Facts about how this module was built");
  m.def("set_fused_attention", &distkern::align::set_fused_attention,
        "Use the fused CUDA kernel for shared_kv_attention (opt-in until it has run on a GPU; also "
        "DISTKERN_FUSED_ATTENTION=1). No effect on the CPU.");
  m.def("fused_attention", &distkern::align::fused_attention_enabled);
  m.def("set_matmul_mode", &distkern::set_matmul_mode,
        "How the CUDA tile-product kernels multiply float32 tiles: -1 auto (TF32 when torch allows it "
        "for cuBLAS), 0 FMA, 1 TF32 tensor cores, 2 3xTF32 tensor cores. No effect on the CPU.");
  m.def("matmul_mode", &distkern::matmul_mode_setting);
  m.def("cpu_fast_gemm", &distkern::cpu::fast_gemm_enabled,
        "Whether the CPU float32 products run on distkern's own micro-kernel (AVX-512F or AVX2+FMA present "
        "and DISTKERN_CPU_GEMM not 0), else through torch's BLAS");
  m.def("cpu_avx512", &distkern::cpu::avx512_enabled,
        "Whether distkern's AVX-512 product kernel runs (and with it the AVX-512 φ / sigmoid lanes); "
        "DISTKERN_CPU_GEMM=avx2 or 0 turns it off");
  m.def("cpu_math_isa", &distkern::cpu::math_isa_name,
        "Which vector lanes the CPU φ of the kernel sums and the anomaly map's sigmoid run on: 'avx512', "
        "'avx2' or 'none' (scalar; DISTKERN_CPU_GEMM=0)");
  m.def("cpu_gemm_isa", &distkern::cpu::gemm_isa, "Which CPU product kernel runs: 'avx512', 'avx2' or 'none'");
  m.attr("auto_tensor_cores") = distkern::kAutoTensorCores;
#ifdef DISTKERN_WITH_CUDA
  m.def("set_cuda_tile_config", &distkern::mahalanobis::set_tile_config,
        "Thread tiles of the CUDA tile-product kernels: 0 auto, 1 always 4x4 (64x64 blocks), "
        "2 always 8x8 (128x128 blocks, float32). For tests and benchmarks.");
  m.def("cuda_tile_config", &distkern::mahalanobis::tile_config);
  m.def("set_kernel_sum_schedule", &distkern::kernel_sum::set_schedule,
        "kernel_matmul's CUDA schedule: 0 auto (the x·y products by cuBLAS in bounded panels from D >= 256), "
        "1 distkern's tile kernels at every D, 2 cuBLAS panels at every D. For tests and benchmarks.");
  m.def("kernel_sum_schedule", &distkern::kernel_sum::schedule);
  m.def("set_mahalanobis_schedule", &distkern::mahalanobis::set_schedule,
        "mahalanobis' and mahalanobis_pos' CUDA forward schedule: 0 auto (the products by cuBLAS in bounded "
        "panels from D >= 512 with float32 accumulation; for mahalanobis_pos with float32 factors and B >= 16), "
        "1 distkern's tile kernel, 2 cuBLAS panels wherever they apply. For tests and benchmarks.");
  m.def("mahalanobis_schedule", &distkern::mahalanobis::schedule);
  m.def("set_nearest_schedule", &distkern::nearest::set_schedule,
        "nearest_cosine's CUDA schedule: 0 auto (the products by cuBLAS in bounded panels from D >= 128 "
        "on 2^20 pairs or more), 1 distkern's fused tile kernel at every D, 2 cuBLAS panels at every D. "
        "For tests and benchmarks.");
  m.def("nearest_schedule", &distkern::nearest::schedule);
#endif
}
