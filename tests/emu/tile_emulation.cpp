// Runs the tile-product skeleton (csrc/common/tile_gemm.cuh) on the CPU through cuda_emulate.h:
// the FMA kernel (4×4 and 8×8 thread tiles) and the tensor-core kernel (TF32 and 3xTF32), with B
// read along j or along k, triangles, several problems per block, and the per-row guards — each
// against a float64 product. Prints one line per case and "ALL OK", or exits 1.
// Built from the tile header rewritten by cu2cpp.py, with tests/emu/stub first on the include path.
#include "common/tile_gemm.cuh"

#include <random>
#include <string>

using distkern::cuda::Tri;

namespace {

struct ALoad {
  const float* a;
  int64_t K;
  float shift;
  float operator()(int64_t p, int64_t row, int64_t k, float& guard) const {
    const float v = a[row * K + k] + shift * static_cast<float>(p);
    guard += v * v;
    return v;
  }
};

struct BRows {  // B_p[k][j] stored row-major (contiguous along j)
  const float* b;
  int64_t K, N;
  float operator()(int64_t p, int64_t k, int64_t j) const { return b[(p * K + k) * N + j]; }
};

struct BCols {  // the same B_p stored as its transpose (contiguous along k)
  enum { kKContiguous = 1 };
  const float* bt;
  int64_t K, N;
  float operator()(int64_t p, int64_t k, int64_t j) const { return bt[(p * N + j) * K + k]; }
};

struct StoreArgs {
  float* out;    // P×M×N
  float* guard;  // P×M
  int64_t M, N;
};

template <int TR, int TC>
struct Store {
  StoreArgs a;
  struct State {};
  void init(State&) const {}
  void block(State&, const float (&c)[TR][TC], int64_t p, int64_t row_base, int64_t j0, float*, const float*) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < TR; ++i)
      for (int j = 0; j < TC; ++j) {
        const int64_t row = row_base + ty * TR + i, col = j0 + tx * TC + j;
        if (row < a.M && col < a.N) a.out[(p * a.M + row) * a.N + col] = c[i][j];
      }
  }
  void end_problem(State&, int64_t p, int64_t row_base, const float* guard_rows) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < TR; ++i) {
      const int64_t row = row_base + ty * TR + i;
      if (tx == 0 && row < a.M) a.guard[p * a.M + row] = guard_rows[ty * TR + i];
    }
  }
  void finish(State&, int64_t) const {}
};

enum class Kern { Fma4, Fma8, Fma24, Tf32, Tf32x3 };
const char* kname(Kern k) {
  switch (k) {
    case Kern::Fma4: return "fma4x4";
    case Kern::Fma8: return "fma8x8";
    case Kern::Fma24: return "fma2x4";
    case Kern::Tf32: return "tf32";
    case Kern::Tf32x3: return "3xtf32";
  }
  return "?";
}

template <typename BL>
void run(Kern kern, int64_t M, int64_t K, int64_t N, Tri tri, int64_t P, int64_t ppb, const ALoad& a, const BL& b,
         const StoreArgs& e) {
  using namespace distkern::cuda;
  const unsigned gy = static_cast<unsigned>((P + ppb - 1) / ppb);
  if (kern == Kern::Fma4) {
    const Store<4, 4> ep{e};
    emu::launch([&] { tile_gemm_rows_kernel<float, 4, 4, ALoad, BL, Store<4, 4>>(M, K, N, tri, P, ppb, a, b, ep); }, dim3((M + 63) / 64, gy), dim3(256));
  } else if (kern == Kern::Fma24) {
    const Store<2, 4> ep{e};
    emu::launch([&] { tile_gemm_rows_kernel<float, 2, 4, ALoad, BL, Store<2, 4>>(M, K, N, tri, P, ppb, a, b, ep); }, dim3((M + 31) / 32, gy), dim3(256));
  } else if (kern == Kern::Fma8) {
    const Store<8, 8> ep{e};
    emu::launch([&] { tile_gemm_rows_kernel<float, 8, 8, ALoad, BL, Store<8, 8>>(M, K, N, tri, P, ppb, a, b, ep); }, dim3((M + 127) / 128, gy), dim3(256));
  } else {
    const Store<4, 4> ep{e};
    if (kern == Kern::Tf32x3)
      emu::launch([&] { tile_gemm_rows_tc_kernel<4, 4, ALoad, BL, Store<4, 4>, true>(M, K, N, tri, P, ppb, a, b, ep); }, dim3((M + 63) / 64, gy), dim3(256));
    else
      emu::launch([&] { tile_gemm_rows_tc_kernel<4, 4, ALoad, BL, Store<4, 4>, false>(M, K, N, tri, P, ppb, a, b, ep); }, dim3((M + 63) / 64, gy), dim3(256));
  }
}

// positive: every entry in [0.5, 1.5) and no shift, so a long K loop's partial sums only grow — where
// truncating adds (the tensor cores' accumulation, as cuda_emulate.h models it) bias the result most
bool check(Kern kern, bool kmajor, int64_t M, int64_t K, int64_t N, Tri tri, int64_t P, int64_t ppb, std::mt19937& rng,
           bool positive = false) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  auto nd = [&](std::mt19937& g) { return positive ? uniform(g) : normal(g); };
  std::vector<float> A(M * K), B(P * K * N), Bt(P * N * K);
  for (auto& v : A) v = nd(rng);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) {
        float v = nd(rng);
        if ((tri == Tri::Lower && k < j) || (tri == Tri::Upper && k > j)) v = 0.f;
        B[(p * K + k) * N + j] = v;
        Bt[(p * N + j) * K + k] = v;
      }
  const float shift = positive ? 0.f : 0.25f;
  std::vector<float> out(P * M * N, NAN), guard(P * M, NAN);
  const ALoad a{A.data(), K, shift};
  const StoreArgs e{out.data(), guard.data(), M, N};
  if (kmajor)
    run(kern, M, K, N, tri, P, ppb, a, BCols{Bt.data(), K, N}, e);
  else
    run(kern, M, K, N, tri, P, ppb, a, BRows{B.data(), K, N}, e);
  // float64 reference; the error is measured against Σ_k |a||b| (the scale TF32 rounds at)
  // (a K = 2048 sum of positive terms: float32's own rounding reaches ~2.4e-6 with FMAs)
  const double tol = kern == Kern::Tf32 ? 2e-3 : (positive ? 5e-6 : 2e-6);
  double worst = 0, worst_g = 0;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t r = 0; r < M; ++r) {
      double g = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double v = static_cast<double>(A[r * K + k] + shift * static_cast<float>(p));
        g += v * v;
      }
      if (tri != Tri::Upper) worst_g = std::max(worst_g, std::abs(guard[p * M + r] - g) / std::max(g, 1e-30));
      for (int64_t j = 0; j < N; ++j) {
        double s = 0, scale = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double av = static_cast<double>(A[r * K + k] + shift * static_cast<float>(p));
          const double bv = B[(p * K + k) * N + j];
          s += av * bv;
          scale += std::abs(av * bv);
        }
        const double o = out[(p * M + r) * N + j];
        const double err = std::isfinite(o) ? std::abs(o - s) / std::max(scale, 1e-30) : 1e30;
        worst = std::max(worst, err);
      }
    }
  const bool ok = worst < tol && worst_g < 1e-5;
  const char* tn = tri == Tri::None ? "none" : tri == Tri::Lower ? "lower" : "upper";
  std::printf("%-7s B=%s M=%lld K=%lld N=%lld tri=%s P=%lld ppb=%lld%s: err %.2e guard err %.2e %s\n", kname(kern),
              kmajor ? "k-major" : "j-major", (long long)M, (long long)K, (long long)N, tn, (long long)P,
              (long long)ppb, positive ? " positive" : "", worst, worst_g, ok ? "ok" : "FAIL");
  // TF32 must round (else the tensor-core emulation would not be exercising the conversion)
  if (kern == Kern::Tf32 && K >= 16 && worst < 1e-6) {
    std::printf("  FAIL: TF32 result is float32-exact\n");
    return false;
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(argc > 1 ? std::atoi(argv[1]) : 1234);
  bool ok = true;
  struct Shape { int64_t M, K, N, P, ppb; };
  const Shape shapes[] = {{1, 1, 1, 1, 1}, {63, 31, 65, 1, 1}, {130, 100, 150, 3, 2}, {64, 64, 64, 2, 1}, {200, 33, 7, 1, 1}};
  for (Kern kern : {Kern::Fma4, Kern::Fma8, Kern::Fma24, Kern::Tf32, Kern::Tf32x3})
    for (bool kmajor : {false, true})
      for (const Shape& s : shapes) ok &= check(kern, kmajor, s.M, s.K, s.N, Tri::None, s.P, s.ppb, rng);
  for (Kern kern : {Kern::Fma4, Kern::Fma8, Kern::Fma24, Kern::Tf32x3, Kern::Tf32})
    for (bool kmajor : {false, true})
      for (Tri tri : {Tri::Lower, Tri::Upper})
        for (int64_t D : {70, 129}) ok &= check(kern, kmajor, 90, D, D, tri, 2, 2, rng);
  // a long K loop of positive products: float32 accuracy must not depend on where the sum is kept
  for (Kern kern : {Kern::Fma4, Kern::Tf32x3}) ok &= check(kern, true, 64, 2048, 64, Tri::None, 1, 1, rng, true);
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
