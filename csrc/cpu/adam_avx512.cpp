// The CPU Adam inner loop for AVX-512 (F/BW/VL/DQ): 16 floats per register. See adam_simd_loop.h
// for why this file's includes come in this order.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_ps initialises itself, GCC bug
// 105593); nothing in this file is uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "chainrule/common.h"

namespace chainrule::math {
typedef float float_x16 __attribute__((vector_size(64)));
// vfmadd / vsqrtps round once per lane, exactly as fmaf / sqrtf.
inline __attribute__((always_inline)) float_x16 fma(float_x16 a, float_x16 b, float_x16 c) {
  return (float_x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
inline __attribute__((always_inline)) float_x16 sqrt(float_x16 a) {
  return (float_x16)_mm512_sqrt_ps((__m512)a);
}
}  // namespace chainrule::math

#include "chainrule/adam_math.h"
#include "cpu/adam_simd_loop.h"

namespace chainrule::cpu::adam_simd {

namespace {

struct Avx512 {
  using vec = math::float_x16;
  static constexpr int width = 16;
  static vec set1(float x) { return (vec)_mm512_set1_ps(x); }
  static vec load(const float* p) { return (vec)_mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, (__m512)v); }
  static vec load_bf16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vec)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // Round to nearest even as c10::BFloat16 does; NaN becomes 0x7fc0.
  static void store_bf16(uint16_t* p, vec v) {
    const __m512i bits = _mm512_castps_si512((__m512)v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
  }
  static vec load_f16(const uint16_t* p) {
    return (vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, vec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static float f16_bits_to_float(uint16_t bits) { return _cvtsh_ss(bits); }
  static uint16_t float_to_f16_bits(float x) {
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
};

}  // namespace

void update_span_avx512(const Span& span, const AdamScalars<float>& scalars) {
  update_span<Avx512>(span, scalars);
}

}  // namespace chainrule::cpu::adam_simd
