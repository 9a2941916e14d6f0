// Standalone check and micro-benchmark of the CPU GEMM (csrc/cpu/gemm), without Python.
//   tests/cpu_gemm/build.sh && /tmp/chainrule_gemm_check [bench]
// Checks every layout, activation and ISA against a double-precision reference on tile-edge
// shapes, the vector activations against activation.h, and (with "bench") times 2048^3.
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <ATen/Parallel.h>

#include "chainrule/activation.h"
#include "cpu/gemm/gemm.h"
#include "cpu/isa.h"

using namespace chainrule;
using namespace chainrule::cpu;

static uint16_t to_bf16(float f) {
  uint32_t b; std::memcpy(&b, &f, 4);
  b += 0x7fff + ((b >> 16) & 1);
  return uint16_t(b >> 16);
}
static float from_bf16(uint16_t h) { uint32_t b = uint32_t(h) << 16; float f; std::memcpy(&f, &b, 4); return f; }

template <Activation A> double act_ref(double z, bool d) {
  return d ? activation_derivative<A, double>(z) : activation_forward<A, double>(z);
}
static double act_any(Activation a, double z, bool d) {
  return dispatch_activation(a, [&](auto c) { return act_ref<decltype(c)::value>(z, d); });
}
static float act_any_f(Activation a, float z, bool d) {
  return dispatch_activation(a, [&](auto c) {
    constexpr Activation A = decltype(c)::value;
    return d ? activation_derivative<A, float>(z) : activation_forward<A, float>(z);
  });
}

static int failures = 0;

// layout 0: forward X(m,k)·W(n,k)ᵀ ; 1: dgrad dZ(m,k)·W(k,n) ; 2: wgrad dZ(k,m)ᵀ·X(k,n), accumulate
static void check(CpuIsa isa, gemm::ElementType type, int layout, int64_t m, int64_t n, int64_t k,
                  Activation act, bool bias) {
  std::mt19937 rng(m * 131 + n * 7 + k + layout);
  std::normal_distribution<float> dist(0.f, 1.f);
  const bool bf = type == gemm::ElementType::bfloat16;
  auto q = [&](float v) { return bf ? from_bf16(to_bf16(v)) : v; };
  std::vector<float> a(m * k), b(k * n), pre_in(m * k), c0(m * n), biasv(n);
  for (auto& v : a) v = q(dist(rng));
  for (auto& v : b) v = q(dist(rng));
  for (auto& v : pre_in) v = q(dist(rng));
  for (auto& v : c0) v = q(dist(rng));
  for (auto& v : biasv) v = q(dist(rng));
  gemm::Problem p;
  p.m = m; p.n = n; p.k = k; p.type = type;
  // Storage: A either row-major (m,k) or stored as (k,m); B row-major (k,n) or stored (n,k).
  std::vector<float> a_store(m * k), b_store(k * n), pre_store(m * k);
  const bool a_trans = layout == 2, b_trans = layout == 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t pp = 0; pp < k; ++pp) {
      int64_t idx = a_trans ? pp * m + i : i * k + pp;
      a_store[idx] = a[i * k + pp]; pre_store[idx] = pre_in[i * k + pp];
    }
  for (int64_t pp = 0; pp < k; ++pp)
    for (int64_t j = 0; j < n; ++j) b_store[b_trans ? j * k + pp : pp * n + j] = b[pp * n + j];
  Activation grad_act = layout == 0 ? Activation::none : act;
  Activation fwd_act = layout == 0 ? act : Activation::none;
  std::vector<float> row_sums(m, 0.f);
  // Reference in double.
  std::vector<double> aeff(m * k);
  std::vector<double> ref_rows(m, 0.0);
  for (int64_t i = 0; i < m * k; ++i) {
    double v = a[i];
    if (grad_act != Activation::none) v = q(float(v * act_any_f(grad_act, pre_in[i], true)));
    aeff[i] = v;
  }
  std::vector<double> ref(m * n), ref_pre(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t pp = 0; pp < k; ++pp) ref_rows[i] += aeff[i * k + pp];
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t pp = 0; pp < k; ++pp) s += aeff[i * k + pp] * b[pp * n + j];
      if (layout == 2) s += c0[i * n + j];
      if (layout == 0 && bias) s += biasv[j];
      ref_pre[i * n + j] = s;
      ref[i * n + j] = act_any(fwd_act, s, false);
    }
  }
  std::vector<float> cf = c0, pref(m * n, 0.f);
  std::vector<uint16_t> a16(m * k), b16(k * n), pre16(m * k), c16(m * n), bias16(n), prebf(m * n);
  if (bf) {
    for (int64_t i = 0; i < m * k; ++i) { a16[i] = to_bf16(a_store[i]); pre16[i] = to_bf16(pre_store[i]); }
    for (int64_t i = 0; i < k * n; ++i) b16[i] = to_bf16(b_store[i]);
    for (int64_t i = 0; i < m * n; ++i) c16[i] = to_bf16(c0[i]);
    for (int64_t i = 0; i < n; ++i) bias16[i] = to_bf16(biasv[i]);
  }
  p.a = bf ? (void*)a16.data() : (void*)a_store.data();
  p.a_row_stride = a_trans ? 1 : k; p.a_col_stride = a_trans ? m : 1;
  p.activation_grad = grad_act;
  p.a_pre = bf ? (void*)pre16.data() : (void*)pre_store.data();
  p.a_row_sums = layout == 2 ? row_sums.data() : nullptr;
  p.b = bf ? (void*)b16.data() : (void*)b_store.data();
  p.b_row_stride = b_trans ? 1 : n; p.b_col_stride = b_trans ? k : 1;
  p.c = bf ? (void*)c16.data() : (void*)cf.data();
  p.ldc = n;
  p.accumulate = layout == 2;
  p.bias = (layout == 0 && bias) ? (bf ? (void*)bias16.data() : (void*)biasv.data()) : nullptr;
  p.activation = fwd_act;
  p.pre_activation = (layout == 0 && act != Activation::none) ? (bf ? (void*)prebf.data() : (void*)pref.data()) : nullptr;
  gemm::run(p, isa);
  double tol = bf ? 2e-2 : 2e-5;
  double worst = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    double got = bf ? from_bf16(c16[i]) : cf[i];
    double scale = 1 + std::sqrt(double(k));
    double err = std::abs(got - ref[i]) / scale;
    worst = std::max(worst, err);
    if (p.pre_activation) {
      double gp = bf ? from_bf16(prebf[i]) : pref[i];
      worst = std::max(worst, std::abs(gp - ref_pre[i]) / scale);
    }
  }
  if (layout == 2)
    for (int64_t i = 0; i < m; ++i) worst = std::max(worst, std::abs(row_sums[i] - ref_rows[i]) / (1 + std::sqrt(double(k))));
  if (!(worst <= tol)) {
    ++failures;
    std::printf("FAIL isa=%s type=%d layout=%d m=%ld n=%ld k=%ld act=%s bias=%d worst=%g\n", isa_name(isa),
                int(type), layout, long(m), long(n), long(k), activation_name(act), bias, worst);
  }
}

static void check_activations(CpuIsa isa) {
  const int64_t n = 200001;
  std::vector<float> z(n), out(n);
  for (int64_t i = 0; i < n; ++i) z[i] = -12.f + 24.f * float(i) / float(n - 1);
  z[0] = -100.f; z[1] = 100.f; z[2] = 0.f; z[3] = -0.f; z[4] = 1e-30f; z[5] = -90.f;
  for (int ai = 0; ai < kNumActivations; ++ai) {
    Activation a = static_cast<Activation>(ai);
    for (bool d : {false, true}) {
      gemm::activation_map(isa, a, d, z.data(), out.data(), n);
      // Held to the scalar function's own accuracy: |simd - exact| <= max(2 |scalar - exact|, 3e-7)
      // relative to max(1, |exact|), exact computed in double.
      double worst = 0, worst_scalar = 0, diff = 0; int64_t wi = 0;
      for (int64_t i = 0; i < n; ++i) {
        float s = act_any_f(a, z[i], d);
        double exact = act_any(a, double(z[i]), d);
        double scale = std::max(1.0, std::abs(exact));
        double err = std::abs(double(out[i]) - exact) / scale;
        double err_s = std::abs(double(s) - exact) / scale;
        diff = std::max(diff, std::abs(double(out[i]) - s) / scale);
        if (std::isnan(out[i]) != std::isnan(s)) err = 1e9;
        if (err - std::max(2 * err_s, 3e-7) > worst - std::max(2 * worst_scalar, 3e-7)) { worst = err; worst_scalar = err_s; wi = i; }
      }
      std::printf("  %-7s %-9s %-10s |simd-exact| %.3g vs |scalar-exact| %.3g at z=%g; max |simd-scalar| %.3g\n",
                  isa_name(isa), activation_name(a), d ? "derivative" : "forward", worst, worst_scalar, z[wi], diff);
      if (worst > std::max(2 * worst_scalar, 3e-7)) { ++failures; std::printf("FAIL activation\n"); }
    }
  }
}

static double cpu_now() {
  timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static void bench(CpuIsa isa, int64_t m, int64_t n, int64_t k, int layout, Activation act) {
  std::vector<float> a(m * k, 0.5f), b(k * n, 0.25f), c(m * n), pre(m * n), biasv(n, 0.1f);
  gemm::Problem p; p.m = m; p.n = n; p.k = k;
  p.a = a.data(); p.a_row_stride = layout == 2 ? 1 : k; p.a_col_stride = layout == 2 ? m : 1;
  p.b = b.data(); p.b_row_stride = layout == 0 ? 1 : n; p.b_col_stride = layout == 0 ? k : 1;
  p.c = c.data(); p.ldc = n; p.activation = act;
  if (layout == 0 && act != Activation::none) { p.bias = biasv.data(); p.pre_activation = pre.data(); }
  // The machine is shared: besides wall time, report flops per CPU-second of this process (the
  // rate one core sustains while it runs), which other processes do not distort.
  std::vector<double> t, cpu;
  for (int r = 0; r < 7; ++r) {
    double t0 = now(), c0 = cpu_now();
    gemm::run(p, isa);
    t.push_back(now() - t0); cpu.push_back(cpu_now() - c0);
  }
  std::sort(t.begin(), t.end()); std::sort(cpu.begin(), cpu.end());
  const double gf = 2.0 * m * n * k / 1e9;
  std::printf("  %s layout=%d %ldx%ldx%ld act=%s: median %.2f ms  %.1f GFLOP/s wall, %.1f GFLOP per CPU-second\n", isa_name(isa), layout,
              long(m), long(n), long(k), activation_name(act), t[3] * 1e3, gf / t[3], gf / cpu[3]);
}

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "check";
  std::vector<CpuIsa> isas = {CpuIsa::avx512, CpuIsa::avx2};
  if (mode == "bench") {
    int64_t s = argc > 2 ? std::atol(argv[2]) : 2048;
    for (int rep = 0; rep < 2; ++rep)
      for (auto isa : isas) bench(isa, s, s, s, 1, Activation::none);
    bench(CpuIsa::avx512, 4096, 4096, 1024, 0, Activation::gelu);
    bench(CpuIsa::avx512, 4096, 1024, 4096, 1, Activation::none);
    bench(CpuIsa::avx512, 4096, 1024, 4096, 2, Activation::none);
    return 0;
  }
  for (auto isa : isas) check_activations(isa);
  std::vector<int64_t> sizes = {1, 2, 13, 14, 15, 31, 32, 33, 43, 97};
  for (auto isa : isas) {
    for (auto type : {gemm::ElementType::float32, gemm::ElementType::bfloat16}) {
      if (!gemm::supports(isa, type)) continue;
      for (int layout = 0; layout < 3; ++layout)
        for (int64_t m : sizes)
          for (int64_t n : {int64_t(1), int64_t(17), int64_t(33), int64_t(65)})
            for (int64_t k : {int64_t(1), int64_t(3), int64_t(16), int64_t(300), int64_t(600)})
              check(isa, type, layout, m, n, k, Activation(int((m + n + k) % kNumActivations)), (m + k) % 2);
      // Bigger than one cache block in every dimension, threaded.
      for (int layout = 0; layout < 3; ++layout)
        check(isa, type, layout, 301, 4200, 613, Activation::gelu, true);
    }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
