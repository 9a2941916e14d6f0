// The CPU Adam inner loop for AVX2 + FMA + F16C: 8 floats per register. See adam_simd_loop.h for
// why this file's includes come in this order.
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "chainrule/common.h"

namespace chainrule::math {
typedef float float_x8 __attribute__((vector_size(32)));
// vfmadd / vsqrtps round once per lane, exactly as fmaf / sqrtf.
inline __attribute__((always_inline)) float_x8 fma(float_x8 a, float_x8 b, float_x8 c) {
  return (float_x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
inline __attribute__((always_inline)) float_x8 sqrt(float_x8 a) {
  return (float_x8)_mm256_sqrt_ps((__m256)a);
}
}  // namespace chainrule::math

#include "chainrule/adam_math.h"
#include "cpu/adam_simd_loop.h"

namespace chainrule::cpu::adam_simd {

namespace {

struct Avx2 {
  using vec = math::float_x8;
  static constexpr int width = 8;
  static vec set1(float x) { return (vec)_mm256_set1_ps(x); }
  static vec load(const float* p) { return (vec)_mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, (__m256)v); }
  static vec load_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (vec)_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Round to nearest even as c10::BFloat16 does; NaN becomes 0x7fc0.
  static void store_bf16(uint16_t* p, vec v) {
    const __m256i bits = _mm256_castps_si256((__m256)v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // Pack the eight 32-bit values (each < 65536) to 16 bits: packus works per 128-bit lane.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded),
                                            _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static vec load_f16(const uint16_t* p) {
    return (vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, vec v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static float f16_bits_to_float(uint16_t bits) { return _cvtsh_ss(bits); }
  static uint16_t float_to_f16_bits(float x) {
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
};

}  // namespace

void update_span_avx2(const Span& span, const AdamScalars<float>& scalars) {
  update_span<Avx2>(span, scalars);
}

}  // namespace chainrule::cpu::adam_simd
