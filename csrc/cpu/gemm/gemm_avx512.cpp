// AVX-512 micro-kernels: fp32 (vfmadd231ps) and bf16 (vdpbf16ps, fp32 accumulation), 14 x 32
// tiles. This file alone is compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq
// -mavx512bf16 -mfma; it is entered only after cpu/isa.cpp found those features.
//
// 14 x 32: 28 zmm accumulators + 2 zmm for the B row + the A value broadcast from memory
// ({1to16} operand) = 30 of the 32 zmm registers. Per k: 2 loads of B, 14 broadcasts,
// 28 FMAs, so the two FMA pipes stay ahead of the load ports.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// GCC 12 warns about the _mm512_undefined_* values inside its own intrinsic headers
// (-Wmaybe-uninitialized false positives); nothing of ours is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "chainrule/activation.h"
#include "cpu/gemm/gemm_kernels.h"

namespace chainrule::cpu::gemm {
namespace avx512 {

#include "cpu/gemm/simd_avx512.h"
#include "cpu/gemm/simd_math.h"

inline __mmask16 lanes(int n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max(n, 0)) - 1u);
}

struct CommonF32Io {
  using V = VecF512;
  static __m512 load_f32(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static void store_f32(float* p, __m512 v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
  static float reduce_add(__m512 v) { return _mm512_reduce_add_ps(v); }
};

constexpr int kMr = 14;
constexpr int kNr = 32;

// 16 x 16 fp32 transpose in registers: r[i][j] -> r[j][i] (unpack pairs, then quads, then
// 128-bit lanes twice).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

struct KernelF32 : CommonF32Io {
  using In = float;
  static constexpr int MR = kMr, NR = kNr, KU = 1;

  // B micro-panel from a transposed view (the weight in the forward: column c of B is row j0 + c
  // of W, contiguous in k): 16 x 16 register transposes instead of one strided store per value.
  // Writes every unit of the panel (zeros past nr).
  static void pack_b_transposed(const float* b, int64_t ld, int64_t p0, int64_t kc, int64_t j0,
                                int nr, uint32_t* panel) {
    float* dst = reinterpret_cast<float*>(panel);
    for (int64_t k0 = 0; k0 < kc; k0 += 16) {
      const int kn = static_cast<int>(std::min<int64_t>(16, kc - k0));
      for (int g = 0; g < NR; g += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = g + i < nr ? _mm512_maskz_loadu_ps(lanes(kn), b + (j0 + g + i) * ld + p0 + k0)
                            : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int t = 0; t < kn; ++t) _mm512_storeu_ps(dst + (k0 + t) * NR + g, r[t]);
      }
    }
  }

  static __m512 load(const float* p, int n) { return load_f32(p, n); }
  static void store(float* p, __m512 v, int n) { store_f32(p, v, n); }
  static __m512 round_to_input(__m512 v) { return v; }

  static void compute(int64_t kcu, const uint32_t* a_panel, const uint32_t* b_panel, float* tile) {
    const float* a = reinterpret_cast<const float*>(a_panel);
    const float* b = reinterpret_cast<const float*>(b_panel);
    __m512 acc[MR][2];
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kcu; ++k) {
      const __m512 b0 = _mm512_loadu_ps(b);
      const __m512 b1 = _mm512_loadu_ps(b + 16);
      _mm_prefetch(reinterpret_cast<const char*>(a + 8 * MR), _MM_HINT_T0);
#pragma GCC unroll 14
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
      a += MR;
      b += NR;
    }
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      _mm512_store_ps(tile + r * NR, acc[r][0]);
      _mm512_store_ps(tile + r * NR + 16, acc[r][1]);
    }
  }
};

struct KernelBF16 : CommonF32Io {
  using In = uint16_t;  // bf16 bits
  static constexpr int MR = kMr, NR = kNr, KU = 2;

  static __m512 widen(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static __m256i narrow(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // round to nearest even
  static __m512 load(const uint16_t* p, int n) { return widen(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static void store(uint16_t* p, __m512 v, int n) { _mm256_mask_storeu_epi16(p, lanes(n), narrow(v)); }
  static __m512 round_to_input(__m512 v) { return widen(narrow(v)); }
  static uint16_t bf16_bits(float rounded) {
    uint32_t bits;
    std::memcpy(&bits, &rounded, sizeof bits);
    return static_cast<uint16_t>(bits >> 16);
  }
  // Units (even k, odd k) from two already-rounded vectors, n lanes.
  static void store_pairs(uint32_t* dst, __m512 even, __m512 odd, int n) {
    __m512i lo = _mm512_cvtepu16_epi32(narrow(even));
    __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow(odd)), 16);
    _mm512_mask_storeu_epi32(dst, lanes(n), _mm512_or_si512(lo, hi));
  }
  // 16 units from rows k (row0) and k + 1 (row1, or zeros when null), n valid columns.
  static void store_pair_rows(uint32_t* dst, const uint16_t* row0, const uint16_t* row1, int n) {
    __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), row0));
    __m512i hi = row1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), row1)), 16)
                      : _mm512_setzero_si512();
    _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
  }

  static void compute(int64_t kcu, const uint32_t* a, const uint32_t* b_panel, float* tile) {
    const __m512i* b = reinterpret_cast<const __m512i*>(b_panel);
    __m512 acc[MR][2];
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kcu; ++k) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 1);
      _mm_prefetch(reinterpret_cast<const char*>(a + 8 * MR), _MM_HINT_T0);
#pragma GCC unroll 14
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
      a += MR;
      b += 2;
    }
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      _mm512_store_ps(tile + r * NR, acc[r][0]);
      _mm512_store_ps(tile + r * NR + 16, acc[r][1]);
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

// Blocking (see ARCHITECTURE.md, "CPU GEMM"). mc is chosen per call so the packed A block
// (mc x kc) is about 448 KiB, under half of the 1 MiB L2, next to the kc x nr B micro-panel it
// sweeps (1024 x 32 fp32 = 128 KiB); the micro-kernel streams both with the hardware prefetcher.
// nc = 2048 keeps each thread's kc x nc B block at 8 MiB, so the two threads' copies share the
// 32 MiB L3. What matters most on this CPU is a long kc: every k block costs one read-modify-write pass of
// C. Measured on one core, per CPU-second, 2048^3 and 4096x1024x4096: kc/mc = 256/168: 88,
// 512/112: 95-97, 1024/56: 90-106, 1024/112: 95-106 GFLOP/s (peak 110).
// These are the tuning CPU's (Zen 4, kTunedL2Bytes / kTunedL3BytesPerThread); run() fits the A
// block and nc to the caches of the CPU it runs on (blocking_for in gemm.h).
constexpr int64_t kABlockBytes = 448 << 10;
constexpr Blocking kF32Blocking{kMr, kNr, /*kc=*/1024, /*mc=*/kMr * 16, /*nc=*/kNr * 64, kABlockBytes};
// Same bytes per panel as fp32: a packed unit holds two bf16 values. kc = 4096 lets the backward
// GEMMs of a 4096-row batch run in one k block (no fp32 partial sums of C between blocks).
constexpr Blocking kBF16Blocking{kMr, kNr, /*kc=*/4096, /*mc=*/kMr * 16, /*nc=*/kNr * 64, kABlockBytes};
static_assert(kF32Blocking.mc <= Driver<KernelF32>::kMaxPanels * kMr);
static_assert(kBF16Blocking.mc <= Driver<KernelBF16>::kMaxPanels * kMr);

void run_f32(const Problem& p, const Blocking& bl, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, bool owns, const Workspace& ws) {
  run_block<KernelF32>(p, bl, m0, m1, n0, n1, owns, ws);
}
void run_bf16(const Problem& p, const Blocking& bl, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1, bool owns, const Workspace& ws) {
  run_block<KernelBF16>(p, bl, m0, m1, n0, n1, owns, ws);
}

// gemv (gemv_kernel.h): 4 weight rows x up to 4 input rows (2 x up to 8) = 16 zmm accumulators,
// 4 (8) input vectors and the weight vector. bf16 weights are widened exactly (bits << 16), so this needs
// AVX-512F/BW/VL only, not AVX512_BF16.
struct GemvIo {
  using V = VecF512;
  static constexpr int kRows = 4;
  static __m512 load_f32(const float* p, int n) { return CommonF32Io::load_f32(p, n); }
  static __m512 load_bf16(const uint16_t* p, int n) {
    const __m256i bits = _mm256_maskz_loadu_epi16(lanes(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static float reduce_add(__m512 v) { return CommonF32Io::reduce_add(v); }
};

#include "cpu/gemm/gemv_kernel.h"  // gemv_f32, gemv_bf16 on GemvIo

// bf16 on vdpbf16ps (AVX512_BF16): the input rows stay bf16, and one instruction multiplies 32
// values of k of a weight row and an input row, each float lane adding the products of a pair
// of k exactly (bf16 x bf16 fits a float's mantissa) in the order of p: half the instructions of
// widening the weight and two FMAs, where 5-8 input rows make the widened kernel bound by its FMAs.
// Like the GEMM's bf16 kernel, vdpbf16ps reads subnormal inputs as zero.
inline __mmask32 lanes32(int n) {
  return n >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << std::max(n, 0)) - 1u);
}
struct GemvDotBf16 {
  using X = uint16_t;
  using T = uint16_t;
  using XReg = __m512bh;
  using WReg = __m512bh;
  static constexpr int kStepK = 32;
  static __m512bh load_x(const uint16_t* p, int n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(lanes32(n), p);
  }
  static __m512bh load_w(const uint16_t* p, int n) { return load_x(p, n); }
  static __m512 madd(__m512bh w, __m512bh x, __m512 acc) { return _mm512_dpbf16_ps(acc, w, x); }
};
void gemv_bf16_dot(const void* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
                   float* acc, int64_t ldacc) {
  gemv_rows<GemvIo, GemvDotBf16>(x, m, k, w, j0, j1, acc, ldacc);
}

}  // namespace avx512

GemvFn avx512_gemv(ElementType type) {
  return type == ElementType::float32 ? &avx512::gemv_f32 : &avx512::gemv_bf16;
}
GemvFn avx512_gemv_bf16_dot() { return &avx512::gemv_bf16_dot; }

void avx512_activation_map(Activation activation, bool derivative, const float* in, float* out,
                            int64_t n) {
  avx512::activation_map_impl<avx512::CommonF32Io>(activation, derivative, in, out, n);
}

const KernelSet* avx512_kernels(ElementType type) {
  static const KernelSet f32{avx512::kF32Blocking, &avx512::run_f32};
  static const KernelSet bf16{avx512::kBF16Blocking, &avx512::run_bf16};
  return type == ElementType::float32 ? &f32 : &bf16;
}

}  // namespace chainrule::cpu::gemm
