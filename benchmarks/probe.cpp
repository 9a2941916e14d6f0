// Machine probe for chainrule's benchmarks: measured peaks that every "% of peak" column uses.
//
//   probe fma  THREADS SECONDS   -> fp32 and bf16 multiply-add throughput (GFLOP/s), all threads
//   probe rmw  THREADS N REPEATS -> bandwidth (GB/s) of an Adam-like read-modify-write over N floats
//
// Compiled at run time by harness.py with g++ -O3 -march=native, so the widest vector unit of the
// machine it runs on is used. The FMA loop keeps 12 independent accumulators in flight per thread,
// more than latency (4 cycles) x FMA ports (2) needs, so it is throughput-bound, not latency-bound.
// Flops are counted as 2 per multiply-add lane (the convention GEMM GFLOP/s figures use); a bf16
// dot-product instruction (vdpbf16ps) does 2 multiply-adds per fp32 lane.
#include <immintrin.h>
#include <time.h>  // clock_gettime(CLOCK_THREAD_CPUTIME_ID)

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kAccumulators = 12;

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {
  // A store and a scalar sum: _mm512_reduce_add_ps trips a -Wuninitialized false positive in
  // GCC 12's own header.
  alignas(64) float t[16];
  _mm512_store_ps(t, a);
  float s = 0;
  for (float x : t) s += x;
  return s;
}
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec a) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a);
  float s = 0;
  for (float x : t) s += x;
  return s;
}
#else
#error "probe.cpp needs AVX2+FMA or AVX-512"
#endif

// One thread's FMA loop: returns multiply-adds done (per lane counted).
double fp32_fma_loop(long iterations, float* sink) {
  Vec acc[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) acc[i] = vset(0.001f * static_cast<float>(i));
  const Vec a = vset(0.999999f), b = vset(1e-7f);
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kAccumulators; ++i) acc[i] = vfma(acc[i], a, b);
  }
  float s = 0;
  for (int i = 0; i < kAccumulators; ++i) s += vsum(acc[i]);
  *sink = s;
  return static_cast<double>(iterations) * kAccumulators * kLanes;
}

#if defined(__AVX512BF16__)
constexpr bool kHasBf16 = true;
double bf16_dot_loop(long iterations, float* sink) {
  __m512 acc[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-4f), _mm512_set1_ps(1e-4f));
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kAccumulators; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  float s = 0;
  for (int i = 0; i < kAccumulators; ++i) s += vsum(acc[i]);
  *sink = s;
  return static_cast<double>(iterations) * kAccumulators * 16 * 2;  // 2 multiply-adds per lane
}
#else
constexpr bool kHasBf16 = false;
double bf16_dot_loop(long, float* sink) {
  *sink = 0;
  return 0;
}
#endif

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Rate {
  double wall_gflops = 0;  // what all threads achieved together, by the wall clock
  double cpu_gflops = 0;   // per thread by its own CPU time, summed: the hardware's rate when the
                           // machine is shared with other work (each core's time-slices count)
};

// Runs loop on every thread at once for `iterations`; the rates of that one trial.
template <typename Loop>
Rate run_trial(Loop loop, int threads, long iterations) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> madds(threads), cpu_seconds(threads);
  std::vector<float> sinks(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      double c0 = thread_cpu_seconds();
      madds[t] = loop(iterations, &sinks[t]);
      cpu_seconds[t] = thread_cpu_seconds() - c0;
    });
  }
  while (ready.load() != threads) {
  }
  auto t0 = Clock::now();
  go.store(true);
  for (auto& th : pool) th.join();
  double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  double total = 0;
  Rate rate;
  for (int t = 0; t < threads; ++t) {
    total += madds[t] + 0 * sinks[t];
    rate.cpu_gflops += 2.0 * madds[t] / cpu_seconds[t] / 1e9;
  }
  rate.wall_gflops = 2.0 * total / dt / 1e9;
  return rate;
}

// Runs loop on every thread at once, several times; returns the best rates. The first trials
// after an idle spell can run at half the rate on a VM (seen on a 2-core KVM guest: 120 against
// 232 GFLOP/s for every trial of a 0.4 s probe, as if the host first placed both vCPUs on one
// core), so all threads run for a warm-up second first, and trials go on until the best has not
// moved by more than 2 % for 1.5 s (at most 8 s).
template <typename Loop>
Rate run_threads(Loop loop, int threads, double seconds) {
  // Calibrate the iteration count so one trial lasts about seconds / 4.
  float sink = 0;
  long iterations = 1 << 16;
  double per_iteration = 0;
  for (;;) {
    auto t0 = Clock::now();
    loop(iterations, &sink);
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (dt > 0.02) {
      per_iteration = dt / static_cast<double>(iterations);
      iterations = static_cast<long>(iterations * (seconds / 4) / dt) + 1;
      break;
    }
    iterations *= 4;
  }
  run_trial(loop, threads, static_cast<long>(1.0 / per_iteration) + 1);  // warm-up
  Rate best;
  const auto start = Clock::now();
  auto last_gain = start;
  auto since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  for (int trial = 0; trial < 4 || (since(last_gain) < 1.5 && since(start) < 8); ++trial) {
    const Rate r = run_trial(loop, threads, iterations);
    if (r.wall_gflops > best.wall_gflops * 1.02 || r.cpu_gflops > best.cpu_gflops * 1.02) {
      last_gain = Clock::now();
    }
    if (r.wall_gflops > best.wall_gflops) best.wall_gflops = r.wall_gflops;
    if (r.cpu_gflops > best.cpu_gflops) best.cpu_gflops = r.cpu_gflops;
  }
  return best;
}

// Adam-like read-modify-write: reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg,
// exp_avg_sq: 28 bytes per fp32 parameter, the traffic of one fused Adam step.
void rmw_chunk(float* __restrict p, const float* __restrict g, float* __restrict m,
               float* __restrict v, long begin, long end) {
  const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, eps = 1e-8f;
  for (long i = begin; i < end; ++i) {
    float gi = g[i];
    float mi = b1 * m[i] + (1 - b1) * gi;
    float vi = b2 * v[i] + (1 - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * mi * (1.0f - vi) + eps;  // no sqrt or divide: memory-bound on any machine
  }
}

double rmw_bandwidth(int threads, long n, int repeats) {
  std::vector<float> p(n, 1.0f), g(n, 1e-3f), m(n, 0.0f), v(n, 0.0f);
  double best = 0;
  for (int r = 0; r < repeats + 1; ++r) {
    auto t0 = Clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      long begin = n * t / threads, end = n * (t + 1) / threads;
      pool.emplace_back(rmw_chunk, p.data(), g.data(), m.data(), v.data(), begin, end);
    }
    for (auto& th : pool) th.join();
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    double gbs = 28.0 * static_cast<double>(n) / dt / 1e9;
    if (r > 0 && gbs > best) best = gbs;  // the first pass faults the pages in
  }
  volatile float keep = p[n / 2];  // keep the stores observable
  (void)keep;
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 4 && std::strcmp(argv[1], "fma") == 0) {
    int threads = std::atoi(argv[2]);
    double seconds = std::atof(argv[3]);
    Rate fp32 = run_threads(fp32_fma_loop, threads, seconds);
    Rate bf16 = kHasBf16 ? run_threads(bf16_dot_loop, threads, seconds) : Rate{};
    // null: the CPU has no bf16 dot-product instruction
    char bf16_wall[32] = "null", bf16_cpu[32] = "null";
    if (kHasBf16) {
      std::snprintf(bf16_wall, sizeof bf16_wall, "%.3f", bf16.wall_gflops);
      std::snprintf(bf16_cpu, sizeof bf16_cpu, "%.3f", bf16.cpu_gflops);
    }
    std::printf("{\"threads\": %d, \"vector_bits\": %d, \"fp32_wall_gflops\": %.3f, "
                "\"fp32_cpu_gflops\": %.3f, \"bf16_wall_gflops\": %s, \"bf16_cpu_gflops\": %s}\n",
                threads, kLanes * 32, fp32.wall_gflops, fp32.cpu_gflops, bf16_wall, bf16_cpu);
    return 0;
  }
  if (argc >= 5 && std::strcmp(argv[1], "rmw") == 0) {
    int threads = std::atoi(argv[2]);
    long n = std::atol(argv[3]);
    int repeats = std::atoi(argv[4]);
    double gbs = rmw_bandwidth(threads, n, repeats);
    std::printf("{\"threads\": %d, \"floats\": %ld, \"bytes_per_element\": 28, \"gbps\": %.3f}\n",
                threads, n, gbs);
    return 0;
  }
  std::fprintf(stderr, "usage: probe fma THREADS SECONDS | probe rmw THREADS N REPEATS\n");
  return 2;
}
