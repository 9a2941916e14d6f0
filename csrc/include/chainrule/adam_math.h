// The Adam / AdamW update for one element, and the per-tensor scalars it needs.
//
// This is the only place the update is written. The CPU kernel, the CUDA kernel and the emulated
// CUDA kernel all call these functions, which is what makes a float32 step give the same bits
// on every backend:
//   * every multiply-add that could be contracted is an explicit fma(), and host code is compiled
//     with -ffp-contract=off, so neither compiler fuses anything on its own;
//   * sqrt and division are IEEE correctly rounded on both sides (nvcc's default -prec-sqrt and
//     -prec-div; never --use_fast_math);
//   * beta^step is computed by repeated squaring in double (no pow(), whose last bit differs
//     between libm and CUDA's math library).
//
// The formula is torch.optim.Adam's (single-tensor path, torch/optim/adam.py):
//   g  = grad / grad_scale            (when a GradScaler scale is given)
//   g  = -g                           (maximize)
//   g  = g + weight_decay * p         (Adam's L2 penalty)            or
//   p  = p * (1 - lr * weight_decay)  (AdamW's decoupled decay)
//   m  = m + (1 - beta1) * (g - m)    (torch's exp_avg.lerp_(g, 1 - beta1))
//   v  = beta2 * v + (1 - beta2) * g * g
//   v_max = max(v_max, v)             (amsgrad; the denominator then uses v_max)
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once

#include <cmath>
#include <cstdint>

#include "chainrule/common.h"

namespace chainrule {

// beta^step by repeated squaring: only IEEE multiplies, so host and device agree to the bit.
CHAINRULE_HOST_DEVICE double adam_power(double beta, int64_t step) {
  double result = 1.0;
  double base = beta;
  while (step > 0) {
    if (step & 1) result *= base;
    base *= base;
    step >>= 1;
  }
  return result;
}

// Hyperparameters of one op call (one param group), as the op receives them.
struct AdamOptions {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;  // AdamW
};

// Per-tensor scalars, derived once from the step count and lr; T is the math type
// (float for float32/bfloat16/float16 parameters, double for float64 parameters).
template <typename T>
struct AdamScalars {
  T step_size;         // lr / (1 - beta1^t)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  T decay_factor;      // 1 - lr * weight_decay (AdamW), unused otherwise
  T weight_decay;      // weight_decay (Adam's L2 term), unused for AdamW
  T one_minus_beta1;
  T beta1_complement_minus_one;  // (1 - beta1) - 1, rounded in T as torch's lerp rounds it
  T one_minus_beta2;
  T beta2;
  T eps;
  T inv_grad_scale;    // 1 / grad_scale, or 1
  bool has_grad_scale;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  bool has_weight_decay;
  bool exp_avg_from_grad;  // 1 - beta1 >= 0.5: torch's lerp takes its second branch
};

// `step` is the step number after this update (1 for the first update), as torch counts it.
template <typename T>
CHAINRULE_HOST_DEVICE AdamScalars<T> adam_scalars(const AdamOptions& o, double lr, int64_t step,
                                                  const float* grad_scale) {
  AdamScalars<T> s;
  double bias_correction1 = 1.0 - adam_power(o.beta1, step);
  double bias_correction2 = 1.0 - adam_power(o.beta2, step);
  s.step_size = static_cast<T>(lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<T>(math::sqrt(bias_correction2));
  s.decay_factor = static_cast<T>(1.0 - lr * o.weight_decay);
  s.weight_decay = static_cast<T>(o.weight_decay);
  s.one_minus_beta1 = static_cast<T>(1.0 - o.beta1);
  s.beta1_complement_minus_one = s.one_minus_beta1 - static_cast<T>(1);
  s.exp_avg_from_grad = !(1.0 - o.beta1 < 0.5);
  s.one_minus_beta2 = static_cast<T>(1.0 - o.beta2);
  s.beta2 = static_cast<T>(o.beta2);
  s.eps = static_cast<T>(o.eps);
  s.has_grad_scale = grad_scale != nullptr;
  // Unscaling multiplies by the float reciprocal, as torch's GradScaler does (grad * inv_scale in
  // _amp_foreach_non_finite_check_and_unscale_); exact for the power-of-two scales it uses.
  s.inv_grad_scale = s.has_grad_scale ? static_cast<T>(1.0f / *grad_scale) : T(1);
  s.amsgrad = o.amsgrad;
  s.maximize = o.maximize;
  s.decoupled_weight_decay = o.decoupled_weight_decay;
  s.has_weight_decay = o.weight_decay != 0.0;
  return s;
}

// One element. `param` is the parameter (or its float32 master copy), `exp_avg`/`exp_avg_sq`/
// `max_exp_avg_sq` the states; `max_exp_avg_sq` is read and written only when amsgrad is set.
template <typename T>
CHAINRULE_HOST_DEVICE void adam_update_element(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                                               T& max_exp_avg_sq, const AdamScalars<T>& s) {
  T g = s.has_grad_scale ? grad * s.inv_grad_scale : grad;
  if (s.maximize) g = -g;
  T p = param;
  if (s.has_weight_decay) {
    if (s.decoupled_weight_decay) {
      p = p * s.decay_factor;
    } else {
      g = math::fma(s.weight_decay, p, g);
    }
  }
  // exp_avg.lerp_(g, 1 - beta1), both of torch's branches (aten/src/ATen/native/Lerp.h): with a
  // weight w >= 0.5 it is g + (w - 1)(g - m), exact for beta1 = 0.
  // One fma with its weight and base selected (fewer live registers than two fmas and a select).
  const T lerp_weight = s.exp_avg_from_grad ? s.beta1_complement_minus_one : s.one_minus_beta1;
  const T lerp_base = s.exp_avg_from_grad ? g : exp_avg;
  T m = math::fma(lerp_weight, g - exp_avg, lerp_base);
  T v = math::fma(s.one_minus_beta2 * g, g, s.beta2 * exp_avg_sq);
  T v_used = v;
  if (s.amsgrad) {
    v_used = max_exp_avg_sq > v ? max_exp_avg_sq : v;
    max_exp_avg_sq = v_used;
  }
  T denom = math::sqrt(v_used) / s.bias_correction2_sqrt + s.eps;
  param = math::fma(-s.step_size, m / denom, p);
  exp_avg = m;
  exp_avg_sq = v;
}

}  // namespace chainrule
