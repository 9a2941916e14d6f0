// The linear layer's CUDA kernels under the emulator's sanitizer modes, without torch: built by
// tests/test_linear_sanitizers.py with -fsanitize=thread (a missing __syncthreads or cp.async wait
// is a reported data race) and with -fsanitize=address (a load or store past a tensor or past the
// dynamic shared memory is reported at its line). Every GEMM role, both arithmetic paths, tails,
// the unaligned fallback, split-K and the bias-gradient pass run once on small odd shapes and are
// checked against a float64 reference. Exit status 0 when every result matches.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/linear_plan.h"

namespace emu = chainrule::emu;
namespace plan = chainrule::linear_plan;
namespace kernels = chainrule::kernels;
using chainrule::Activation;

namespace {

struct EmulatedLauncher {
  template <typename Params>
  void operator()(const char* name, void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                  const Params& params) const {
    emu::launch(name, kernel, grid, block, smem, params);
  }
};

template <typename T>
T from_double(double v) { return kernels::from_accumulate<T>(static_cast<kernels::accumulate_t<T>>(v)); }
template <typename T>
double to_double(T v) { return static_cast<double>(kernels::to_accumulate(v)); }

template <typename T> plan::DType dtype_of();
template <> plan::DType dtype_of<double>() { return plan::DType::float64; }
template <> plan::DType dtype_of<float>() { return plan::DType::float32; }
template <> plan::DType dtype_of<__nv_bfloat16>() { return plan::DType::bfloat16; }
template <> plan::DType dtype_of<__half>() { return plan::DType::float16; }

template <typename T> double tolerance() { return sizeof(T) == 2 ? 2e-2 : (sizeof(T) == 4 ? 1e-4 : 1e-10); }

int failures = 0;

void expect_close(const char* what, const char* type, double got, double want, double tol) {
  if (std::fabs(got - want) > tol * (1.0 + std::fabs(want))) {
    if (failures++ < 10) std::fprintf(stderr, "MISMATCH %s<%s>: got %g, want %g\n", what, type, got, want);
  }
}

// One GEMM in `role`, as the op layer would call it, with `offset` elements of padding in front
// of every row (offset 1 makes the rows unaligned) and C = A . B checked against float64.
template <typename T>
void check_gemm(const char* type, plan::GemmRole role, int m, int n, int k, int offset, bool accumulate) {
  std::mt19937 rng(m * 131 + n * 7 + k);
  std::normal_distribution<double> normal;
  const bool a_k_major = role != plan::GemmRole::grad_weight;
  const bool b_k_major = role == plan::GemmRole::forward;
  // A is (m, k) read K-major (rows of k) or MN-major (rows of m), likewise B (k, n).
  const int a_rows = a_k_major ? m : k, a_cols = a_k_major ? k : m;
  const int b_rows = b_k_major ? n : k, b_cols = b_k_major ? k : n;
  const int lda = a_cols + offset, ldb = b_cols + offset;
  std::vector<T> a(static_cast<size_t>(a_rows) * lda + offset), b(static_cast<size_t>(b_rows) * ldb + offset);
  for (auto& v : a) v = from_double<T>(normal(rng));
  for (auto& v : b) v = from_double<T>(normal(rng));
  std::vector<T> c(static_cast<size_t>(m) * n), initial(c.size());
  for (size_t i = 0; i < c.size(); ++i) c[i] = initial[i] = from_double<T>(normal(rng));

  kernels::GemmParams p{};
  p.a = a.data() + offset;
  p.b = b.data() + offset;
  p.c = c.data();
  p.lda = lda;
  p.ldb = ldb;
  p.ldc = n;
  p.m = m; p.n = n; p.k = k;
  p.k_per_split = k;
  p.splits = 1;
  p.accumulate = accumulate;
  p.operands_aligned16 = offset == 0 && (lda * sizeof(T)) % 16 == 0 && (ldb * sizeof(T)) % 16 == 0;
  p.output_pairs_aligned = n % 2 == 0;
  const plan::SplitK split = plan::plan_split_k(dtype_of<T>(), role, m, n, k);
  std::vector<kernels::accumulate_t<T>> partial;
  if (split.splits > 1) {
    p.splits = split.splits;
    p.k_per_split = split.k_per_split;
    partial.resize(static_cast<size_t>(split.splits) * m * n);
    p.partial_sums = partial.data();
  }
  EmulatedLauncher launch;
  plan::launch_gemm(launch, dtype_of<T>(), role, Activation::none, p);

  const T* a0 = a.data() + offset;
  const T* b0 = b.data() + offset;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double want = accumulate ? to_double(initial[static_cast<size_t>(i) * n + j]) : 0.0;
      for (int l = 0; l < k; ++l) {
        const double av = to_double(a_k_major ? a0[static_cast<size_t>(i) * lda + l] : a0[static_cast<size_t>(l) * lda + i]);
        const double bv = to_double(b_k_major ? b0[static_cast<size_t>(j) * ldb + l] : b0[static_cast<size_t>(l) * ldb + j]);
        want += av * bv;
      }
      expect_close("gemm", type, to_double(c[static_cast<size_t>(i) * n + j]), want, tolerance<T>() * std::sqrt(k + 1.0));
    }
  }
}

// dZ = dY * silu'(Z) and db = column sums, over several row slices.
template <typename T>
void check_bias_grad(const char* type, int m, int n) {
  std::mt19937 rng(m + n);
  std::normal_distribution<double> normal;
  std::vector<T> dy(static_cast<size_t>(m) * n), z(dy.size()), dz(dy.size()), db(n);
  for (auto& v : dy) v = from_double<T>(normal(rng));
  for (auto& v : z) v = from_double<T>(normal(rng));
  kernels::BiasGradParams p{};
  p.grad_output = dy.data(); p.ld_grad_output = n;
  p.pre_activation = z.data(); p.ld_pre_activation = n;
  p.grad_pre_activation = dz.data(); p.ld_grad_pre_activation = n;
  p.grad_bias = db.data();
  p.m = m; p.n = n;
  const plan::BiasGradSlicing slicing = plan::plan_bias_grad(m);
  p.rows_per_slice = slicing.rows_per_slice;
  p.slices = slicing.slices;
  std::vector<kernels::accumulate_t<T>> partial(static_cast<size_t>(p.slices) * n);
  p.partial_sums = partial.data();
  EmulatedLauncher launch;
  plan::launch_bias_grad(launch, dtype_of<T>(), Activation::silu, p);
  for (int j = 0; j < n; ++j) {
    double sum = 0;
    for (int i = 0; i < m; ++i) {
      const size_t at = static_cast<size_t>(i) * n + j;
      const double want = to_double(dy[at]) * chainrule::activation_derivative<Activation::silu>(to_double(z[at]));
      expect_close("grad_pre_activation", type, to_double(dz[at]), want, tolerance<T>());
      sum += want;
    }
    expect_close("grad_bias", type, to_double(db[j]), sum, tolerance<T>() * std::sqrt(m + 1.0));
  }
}

template <typename T>
void check_all(const char* type) {
  for (int offset : {0, 1}) {
    check_gemm<T>(type, plan::GemmRole::forward, 37, 45, 40, offset, false);
    check_gemm<T>(type, plan::GemmRole::grad_input, 37, 40, 45, offset, false);
    check_gemm<T>(type, plan::GemmRole::grad_weight, 45, 40, 37, offset, true);
  }
  check_gemm<T>(type, plan::GemmRole::grad_weight, 9, 12, 300, 0, true);  // split-K: 4 slices
  check_bias_grad<T>(type, 600, 33);
}

}  // namespace

int main() {
  check_all<double>("float64");
  check_all<float>("float32");
  check_all<__nv_bfloat16>("bfloat16");
  check_all<__half>("float16");
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
