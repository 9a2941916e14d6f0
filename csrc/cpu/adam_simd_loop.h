// The SIMD inner loop of the CPU Adam kernel, written once for every instruction set.
//
// Include this only from an ISA translation unit (adam_avx512.cpp, adam_avx2.cpp) that has
//   1. set `#pragma GCC target(...)` before any include,
//   2. included chainrule/common.h and declared, in namespace chainrule::math, fma() and sqrt()
//      for its GCC vector type (vfmadd / vsqrtps: correctly rounded, like fmaf / sqrtf),
//   3. and only then included chainrule/adam_math.h,
// so that adam_update_element<Vector> sees those overloads (qualified names in a template bind at
// its definition). The update is then the very function the scalar and CUDA paths call, applied
// lane by lane by the vector instructions: +, -, *, / and the comparison select of GCC's vector
// extensions are IEEE single-precision operations per lane, so every lane gets the bits
// adam_update_element<float> gives (the build's -ffp-contract=off stops GCC fusing a * b + c).
//
// Isa provides: vec (a GCC vector of `width` floats), set1, load/store for float32, and
// load/store converting bfloat16 and float16 (round to nearest even).
#pragma once

#include "cpu/adam_simd.h"

namespace chainrule::cpu::adam_simd {

// bfloat16 <-> float32 for the scalar tails, as c10::BFloat16 rounds (nearest even, NaN -> 0x7fc0).
inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class Isa>
AdamScalars<typename Isa::vec> broadcast(const AdamScalars<float>& s) {
  AdamScalars<typename Isa::vec> v;
  v.step_size = Isa::set1(s.step_size);
  v.bias_correction2_sqrt = Isa::set1(s.bias_correction2_sqrt);
  v.decay_factor = Isa::set1(s.decay_factor);
  v.weight_decay = Isa::set1(s.weight_decay);
  v.one_minus_beta1 = Isa::set1(s.one_minus_beta1);
  v.beta1_complement_minus_one = Isa::set1(s.beta1_complement_minus_one);
  v.exp_avg_from_grad = s.exp_avg_from_grad;
  v.one_minus_beta2 = Isa::set1(s.one_minus_beta2);
  v.beta2 = Isa::set1(s.beta2);
  v.eps = Isa::set1(s.eps);
  v.inv_grad_scale = Isa::set1(s.inv_grad_scale);
  v.has_grad_scale = s.has_grad_scale;
  v.amsgrad = s.amsgrad;
  v.maximize = s.maximize;
  v.decoupled_weight_decay = s.decoupled_weight_decay;
  v.has_weight_decay = s.has_weight_decay;
  return v;
}

template <class Isa, ParamKind kind>
inline typename Isa::vec load_param_vec(const void* base, int64_t i) {
  if constexpr (kind == ParamKind::float32) {
    return Isa::load(static_cast<const float*>(base) + i);
  } else if constexpr (kind == ParamKind::bfloat16) {
    return Isa::load_bf16(static_cast<const uint16_t*>(base) + i);
  } else {
    return Isa::load_f16(static_cast<const uint16_t*>(base) + i);
  }
}

template <class Isa, ParamKind kind>
inline void store_param_vec(void* base, int64_t i, typename Isa::vec value) {
  if constexpr (kind == ParamKind::float32) {
    Isa::store(static_cast<float*>(base) + i, value);
  } else if constexpr (kind == ParamKind::bfloat16) {
    Isa::store_bf16(static_cast<uint16_t*>(base) + i, value);
  } else {
    Isa::store_f16(static_cast<uint16_t*>(base) + i, value);
  }
}

template <class Isa, ParamKind kind>
inline float load_param_scalar(const void* base, int64_t i) {
  if constexpr (kind == ParamKind::float32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (kind == ParamKind::bfloat16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return Isa::f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <class Isa, ParamKind kind>
inline void store_param_scalar(void* base, int64_t i, float value) {
  if constexpr (kind == ParamKind::float32) {
    static_cast<float*>(base)[i] = value;
  } else if constexpr (kind == ParamKind::bfloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(value);
  } else {
    static_cast<uint16_t*>(base)[i] = Isa::float_to_f16_bits(value);
  }
}

// Template flags turn the per-span choices into straight-line loops.
template <class Isa, ParamKind kind, bool amsgrad, bool has_master>
void update_span_impl(const Span& t, const AdamScalars<float>& s) {
  using V = typename Isa::vec;
  constexpr int width = Isa::width;
  const AdamScalars<V> sv = broadcast<Isa>(s);
  // Local restrict pointers: the stores below cannot then alias the Span, whose fields the
  // compiler would otherwise reload on every iteration (we build with -fno-strict-aliasing).
  void* __restrict param_ptr = t.param;
  const void* __restrict grad_ptr = t.grad;
  float* __restrict exp_avg_ptr = t.exp_avg;
  float* __restrict exp_avg_sq_ptr = t.exp_avg_sq;
  float* __restrict max_exp_avg_sq_ptr = t.max_exp_avg_sq;
  float* __restrict master_ptr = t.master;
  const int64_t numel = t.numel;
  const int64_t vector_end = numel - numel % width;
  int64_t i = 0;
  for (; i < vector_end; i += width) {
    V param = has_master ? Isa::load(master_ptr + i) : load_param_vec<Isa, kind>(param_ptr, i);
    const V grad = load_param_vec<Isa, kind>(grad_ptr, i);
    V exp_avg = Isa::load(exp_avg_ptr + i);
    V exp_avg_sq = Isa::load(exp_avg_sq_ptr + i);
    V max_exp_avg_sq = amsgrad ? Isa::load(max_exp_avg_sq_ptr + i) : exp_avg_sq;
    adam_update_element<V>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, sv);
    Isa::store(exp_avg_ptr + i, exp_avg);
    Isa::store(exp_avg_sq_ptr + i, exp_avg_sq);
    if (amsgrad) Isa::store(max_exp_avg_sq_ptr + i, max_exp_avg_sq);
    if (has_master) Isa::store(master_ptr + i, param);
    store_param_vec<Isa, kind>(param_ptr, i, param);
  }
  for (; i < numel; ++i) {
    float param = has_master ? master_ptr[i] : load_param_scalar<Isa, kind>(param_ptr, i);
    const float grad = load_param_scalar<Isa, kind>(grad_ptr, i);
    float unused = 0.0f;
    float& max_exp_avg_sq = amsgrad ? max_exp_avg_sq_ptr[i] : unused;
    adam_update_element<float>(param, grad, exp_avg_ptr[i], exp_avg_sq_ptr[i], max_exp_avg_sq, s);
    if (has_master) master_ptr[i] = param;
    store_param_scalar<Isa, kind>(param_ptr, i, param);
  }
}

template <class Isa, ParamKind kind>
void update_span_kind(const Span& t, const AdamScalars<float>& s) {
  const bool amsgrad = t.max_exp_avg_sq != nullptr;
  const bool has_master = kind != ParamKind::float32 && t.master != nullptr;
  if (amsgrad) {
    has_master ? update_span_impl<Isa, kind, true, true>(t, s)
               : update_span_impl<Isa, kind, true, false>(t, s);
  } else {
    has_master ? update_span_impl<Isa, kind, false, true>(t, s)
               : update_span_impl<Isa, kind, false, false>(t, s);
  }
}

template <class Isa>
void update_span(const Span& t, const AdamScalars<float>& s) {
  switch (t.kind) {
    case ParamKind::bfloat16: update_span_kind<Isa, ParamKind::bfloat16>(t, s); break;
    case ParamKind::float16: update_span_kind<Isa, ParamKind::float16>(t, s); break;
    default: update_span_kind<Isa, ParamKind::float32>(t, s); break;
  }
}

}  // namespace chainrule::cpu::adam_simd
