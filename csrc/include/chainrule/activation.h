// Activations fused into the linear layer's epilogue, and their derivatives.
//
// This is the only place where an activation is written down. The CPU kernels, the CUDA kernels
// and the emulated CUDA kernels all include it, so a forward or backward on any backend computes
// the same function. Math is done in `T` (float for fp32/bf16/fp16 tensors, double for fp64).
//
//   relu(z)      = max(z, 0)                             relu'(z)      = z > 0
//   gelu(z)      = z * Phi(z),  Phi(z) = (1 + erf(z/sqrt2)) / 2
//                                                        gelu'(z)      = Phi(z) + z * phi(z)
//   gelu_tanh(z) = z/2 * (1 + tanh(u)),  u = sqrt(2/pi) * (z + 0.044715 z^3)
//                                                        gelu_tanh'(z) = (1 + tanh u)/2
//                                                                        + z/2 (1 - tanh^2 u) u'(z)
//   silu(z)      = z * s(z),  s = 1 / (1 + exp(-z))      silu'(z)      = s (1 + z (1 - s))
//
// gelu and gelu_tanh follow torch.nn.functional.gelu(approximate="none" | "tanh").
// Non-finite z gives what the formulas give in IEEE arithmetic, which is torch's float64 result:
// NaN stays NaN (relu included), gelu/gelu_tanh/silu(+inf) = +inf, (-inf) = NaN (-inf * 0), and
// every derivative except relu's is NaN at +-inf (inf * 0); relu'(NaN) = 1 (docs/reliability.md).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "chainrule/common.h"

namespace chainrule {

enum class Activation : int32_t { none = 0, relu = 1, gelu = 2, gelu_tanh = 3, silu = 4 };

constexpr int kNumActivations = 5;

// Names used in the op schemas and the Python API ("none" stands for Python's None).
inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::none: return "none";
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::silu: return "silu";
  }
  return "?";
}

// Returns false when `name` is not an activation; `out` is left untouched then.
inline bool parse_activation(const char* name, Activation* out) {
  for (int i = 0; i < kNumActivations; ++i) {
    const char* candidate = activation_name(static_cast<Activation>(i));
    const char* a = name;
    const char* b = candidate;
    while (*a && *a == *b) { ++a; ++b; }
    if (*a == 0 && *b == 0) { *out = static_cast<Activation>(i); return true; }
  }
  return false;
}

namespace detail {
template <typename T> struct ActConst;
template <> struct ActConst<float> {
  static constexpr float inv_sqrt2 = 0.70710678118654752440f;
  static constexpr float inv_sqrt_2pi = 0.39894228040143267794f;  // 1/sqrt(2 pi)
  static constexpr float sqrt_2_over_pi = 0.79788456080286535588f;
  static constexpr float tanh_coeff = 0.044715f;
};
template <> struct ActConst<double> {
  static constexpr double inv_sqrt2 = 0.70710678118654752440;
  static constexpr double inv_sqrt_2pi = 0.39894228040143267794;
  static constexpr double sqrt_2_over_pi = 0.79788456080286535588;
  static constexpr double tanh_coeff = 0.044715;
};
}  // namespace detail

// act(z), with the activation a compile-time constant so the epilogue carries no branch.
template <Activation A, typename T>
CHAINRULE_HOST_DEVICE T activation_forward(T z) {
  using C = detail::ActConst<T>;
  if constexpr (A == Activation::none) {
    return z;
  } else if constexpr (A == Activation::relu) {
    // Written as z <= 0 so that NaN passes through, as torch.relu does.
    return z <= T(0) ? T(0) : z;
  } else if constexpr (A == Activation::gelu) {
    return z * (T(0.5) + T(0.5) * math::erf(z * C::inv_sqrt2));
  } else if constexpr (A == Activation::gelu_tanh) {
    T inner = C::sqrt_2_over_pi * (z + C::tanh_coeff * z * z * z);
    return T(0.5) * z * (T(1) + math::tanh(inner));
  } else {
    static_assert(A == Activation::silu, "unhandled activation");
    return z / (T(1) + math::exp(-z));
  }
}

// act'(z): the factor that turns dL/d(output) into dL/d(pre-activation).
template <Activation A, typename T>
CHAINRULE_HOST_DEVICE T activation_derivative(T z) {
  using C = detail::ActConst<T>;
  if constexpr (A == Activation::none) {
    return T(1);
  } else if constexpr (A == Activation::relu) {
    // torch's threshold_backward(grad, relu(z), 0): 0 where relu(z) <= 0, else the gradient,
    // so a NaN pre-activation passes the gradient through.
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (A == Activation::gelu) {
    T cdf = T(0.5) + T(0.5) * math::erf(z * C::inv_sqrt2);
    T pdf = C::inv_sqrt_2pi * math::exp(T(-0.5) * z * z);
    return cdf + z * pdf;
  } else if constexpr (A == Activation::gelu_tanh) {
    T z2 = z * z;
    T inner = C::sqrt_2_over_pi * (z + C::tanh_coeff * z2 * z);
    T th = math::tanh(inner);
    T d_inner = C::sqrt_2_over_pi * (T(1) + T(3) * C::tanh_coeff * z2);
    return T(0.5) * (T(1) + th) + T(0.5) * z * (T(1) - th * th) * d_inner;
  } else {
    static_assert(A == Activation::silu, "unhandled activation");
    T s = T(1) / (T(1) + math::exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
}

// dL/dz = grad * act'(z), what backward computes per element. relu selects instead of
// multiplying, as torch's threshold_backward does: a non-finite grad where z <= 0 gives 0, not
// inf * 0 = NaN.
template <Activation A, typename T>
CHAINRULE_HOST_DEVICE T activation_grad(T grad, T z) {
  if constexpr (A == Activation::relu) {
    return z <= T(0) ? T(0) : grad;
  } else {
    return grad * activation_derivative<A>(z);
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime activation `a`, turning it
// into a template constant once, at the launcher.
template <typename F>
inline decltype(auto) dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::relu: return f(std::integral_constant<Activation, Activation::relu>{});
    case Activation::gelu: return f(std::integral_constant<Activation, Activation::gelu>{});
    case Activation::gelu_tanh:
      return f(std::integral_constant<Activation, Activation::gelu_tanh>{});
    case Activation::silu: return f(std::integral_constant<Activation, Activation::silu>{});
    case Activation::none: break;
  }
  return f(std::integral_constant<Activation, Activation::none>{});
}

}  // namespace chainrule
