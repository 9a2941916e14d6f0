// The interface between the CPU Adam driver (adam.cpp) and its SIMD inner loops
// (adam_avx512.cpp, adam_avx2.cpp, each compiled for its own instruction set).
//
// A Span is a contiguous run of one tensor; the inner loops update it with
// chainrule::adam_update_element evaluated on whole SIMD registers (see adam_simd_loop.h), which
// gives the same float32 bits as the scalar function and as the CUDA kernel.
//
// Only plain C++ and chainrule's own headers here: the ISA translation units must not pull in
// inline functions from torch that would then be compiled for AVX-512 (one definition rule).
#pragma once

#include <cstdint>

#include "chainrule/adam_math.h"

namespace chainrule::cpu::adam_simd {

enum class ParamKind : int32_t { float32 = 0, bfloat16 = 1, float16 = 2 };

struct Span {
  void* param;             // ParamKind elements
  const void* grad;        // same type as param
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;   // nullptr unless amsgrad
  float* master;           // float32 master copy of a bfloat16/float16 param, or nullptr
  int64_t numel;
  ParamKind kind;
};

void update_span_avx512(const Span& span, const AdamScalars<float>& scalars);
void update_span_avx2(const Span& span, const AdamScalars<float>& scalars);

}  // namespace chainrule::cpu::adam_simd
