// AVX2 + FMA fp32 micro-kernel, 6 x 16 tiles: 12 ymm accumulators + 2 for the B row + 1
// broadcast = 15 of the 16 ymm registers (the classic Haswell sgemm shape). This file alone is
// compiled with -mavx2 -mfma; it is entered only after cpu/isa.cpp found those features.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

#include "chainrule/activation.h"
#include "cpu/gemm/gemm_kernels.h"

namespace chainrule::cpu::gemm {
namespace avx2 {

#include "cpu/gemm/simd_avx2.h"
#include "cpu/gemm/simd_math.h"

inline __m256i lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

constexpr int kMr = 6;
constexpr int kNr = 16;

struct KernelF32 {
  using In = float;
  using V = VecF256;
  static constexpr int MR = kMr, NR = kNr, KU = 1;
  static __m256 load_f32(const float* p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n));
  }
  static void store_f32(float* p, __m256 v, int n) {
    if (n >= 8) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, lanes(n), v);
  }
  static __m256 load(const float* p, int n) { return load_f32(p, n); }
  static void store(float* p, __m256 v, int n) { store_f32(p, v, n); }
  static __m256 round_to_input(__m256 v) { return v; }
  static float reduce_add(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static void compute(int64_t kcu, const uint32_t* a_panel, const uint32_t* b_panel, float* tile) {
    const float* a = reinterpret_cast<const float*>(a_panel);
    const float* b = reinterpret_cast<const float*>(b_panel);
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kcu; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b);
      const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
      a += MR;
      b += NR;
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      _mm256_store_ps(tile + r * NR, acc[r][0]);
      _mm256_store_ps(tile + r * NR + 8, acc[r][1]);
    }
  }
};

#include "cpu/gemm/gemm_driver.h"

template <class Io>
void activation_map_impl(Activation activation, bool derivative, const float* in, float* out,
                         int64_t n) {
  using V = typename Io::V;
  chainrule::dispatch_activation(activation, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    for (int64_t i = 0; i < n; i += V::width) {
      const int w = static_cast<int>(std::min<int64_t>(V::width, n - i));
      auto v = Io::load_f32(in + i, w);
      v = derivative ? simd_activation_derivative<A, V>(v) : simd_activation_forward<A, V>(v);
      Io::store_f32(out + i, v, w);
    }
  });
}

// kc x nr B micro-panel = 32 KiB, mc x kc A block = 96 x 512 fp32 = 192 KiB in L2 (as tuned, on
// the Zen 4's 1 MiB; run() fits the A block and nc to other caches: blocking_for in gemm.h).
constexpr Blocking kF32Blocking{kMr, kNr, /*kc=*/512, /*mc=*/kMr * 16, /*nc=*/kNr * 256,
                                /*a_block_bytes=*/192 << 10};

static_assert(kF32Blocking.mc <= Driver<KernelF32>::kMaxPanels * kMr);

void run_f32(const Problem& p, const Blocking& bl, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, bool owns, const Workspace& ws) {
  run_block<KernelF32>(p, bl, m0, m1, n0, n1, owns, ws);
}

// gemv (gemv_kernel.h): 2 weight rows x up to 4 input rows = 8 ymm accumulators, 4 input
// vectors and the weight vector, 13 of the 16 ymm registers; for 5-8 input rows, 1 weight row
// (8 accumulators and 8 input vectors, the weight vector reloaded from L1 if it is spilled).
struct GemvIo {
  using V = VecF256;
  static constexpr int kRows = 2;
  static __m256 load_f32(const float* p, int n) { return KernelF32::load_f32(p, n); }
  static __m256 load_bf16(const uint16_t* p, int n) {
    __m128i bits;
    if (n >= 8) {
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t tail[8] = {};
      std::memcpy(tail, p, sizeof(uint16_t) * static_cast<size_t>(std::max(n, 0)));
      bits = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static float reduce_add(__m256 v) { return KernelF32::reduce_add(v); }
};

#include "cpu/gemm/gemv_kernel.h"  // gemv_f32, gemv_bf16 on GemvIo

}  // namespace avx2

GemvFn avx2_gemv(ElementType type) {
  return type == ElementType::float32 ? &avx2::gemv_f32 : &avx2::gemv_bf16;
}

void avx2_activation_map(Activation activation, bool derivative, const float* in, float* out,
                          int64_t n) {
  avx2::activation_map_impl<avx2::KernelF32>(activation, derivative, in, out, n);
}

const KernelSet* avx2_kernels(ElementType type) {
  static const KernelSet f32{avx2::kF32Blocking, &avx2::run_f32};
  return type == ElementType::float32 ? &f32 : nullptr;
}

}  // namespace chainrule::cpu::gemm
