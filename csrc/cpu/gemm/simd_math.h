// Vectorised exp / erf / tanh and the fused activations, written once over a small SIMD wrapper
// `V` (simd_avx512.h, simd_avx2.h) and compiled separately for each ISA.
//
// The activation formulas below mirror activation_forward / activation_derivative in
// chainrule/activation.h operation for operation (same association, no contraction, since the
// scalar header is compiled with -ffp-contract=off); only exp/erf/tanh are replaced by
// polynomials. tests/cpu_gemm/gemm_check.cpp (against our scalar functions) and
// tests/test_cpu_isa.py (against torch's float ops) hold every activation and derivative to the
// exact (double) value: within 3e-7 resp. 4e-7 relative to max(1, |value|), about 3 ulp, or twice
// the float reference's own error where the formula itself is ill-conditioned.
//
//   exp:  Cody-Waite reduction x = n ln2 + r, Cephes expf polynomial on |r| <= ln2/2, scale 2^n.
//   erf:  |x| < 1:     x * P(x^2), least-squares fit on Chebyshev nodes (degree 7 in x^2);
//         1 <= |x| < 4: 1 - exp(-x^2) * Q(1/x - 0.625), Q fitted to erfc(x) e^{x^2} (degree 10);
//         |x| >= 4:    +-1 (erf(4) rounds to 1 in float).
//   tanh: |x| < 0.625: x + x^3 P(x^2) (degree 6);  else sign(x) (1 - 2 / (exp(2|x|) + 1)).
// This file is included only inside an ISA namespace (see gemm_avx512.cpp): every function is
// compiled with that TU's -m flags and never shared across ISAs.
#pragma once

template <class V>
struct SimdMath {
  using R = typename V::reg;

  static R horner(R x, const float* c, int n) {
    R r = V::set1(c[n - 1]);
    for (int i = n - 2; i >= 0; --i) r = V::fma(r, x, V::set1(c[i]));
    return r;
  }

  static R exp(R x) {
    const R hi = V::set1(88.7228390f), lo = V::set1(-88.7228390f);
    R xc = V::min(V::max(x, lo), hi);
    R n = V::round(V::mul(xc, V::set1(1.44269504088896341f)));
    R r = V::fma(n, V::set1(-0.693359375f), xc);
    r = V::fma(n, V::set1(2.12194440e-4f), r);
    static const float c[6] = {5.0000001201E-1f, 1.6666665459E-1f, 4.1665795894E-2f,
                               8.3334519073E-3f, 1.3981999507E-3f, 1.9875691500E-4f};
    R p = horner(r, c, 6);
    R r2 = V::mul(r, r);
    R y = V::add(V::fma(p, r2, r), V::set1(1.0f));
    // 2^n in two steps so n = 128 (x near 88.72) does not overflow the exponent field.
    R half_n = V::round_down(V::mul(n, V::set1(0.5f)));
    y = V::mul(V::mul(y, V::pow2(half_n)), V::pow2(V::sub(n, half_n)));
    y = V::select(V::lt(x, lo), V::set1(0.0f), y);
    y = V::select(V::gt(x, hi), V::set1(__builtin_inff()), y);
    return V::select(V::isnan(x), x, y);
  }

  static R erf(R x) {
    static const float small[8] = {1.128379225730896f,      -0.37612637877464294f,
                                   0.11283782869577408f,    -0.026865437626838684f,
                                   0.005221053492277861f,   -0.0008484396385028958f,
                                   0.00011268253729213029f, -9.673591193859465e-06f};
    static const float large[11] = {0.3059529960155487f,    0.3822837769985199f,
                                    -0.1723947674036026f,   0.043766919523477554f,
                                    0.023330483585596085f,  -0.0469425730407238f,
                                    0.04322211816906929f,   -0.026924626901745796f,
                                    0.004619344137609005f,  0.026025233790278435f,
                                    -0.03335385024547577f};
    R a = V::abs(x);
    R s = V::mul(a, a);
    R y_small = V::mul(a, horner(s, small, 8));
    R ac = V::min(V::max(a, V::set1(1.0f)), V::set1(4.0f));
    R u = V::sub(V::div(V::set1(1.0f), ac), V::set1(0.625f));
    R q = horner(u, large, 11);
    R y_large = V::sub(V::set1(1.0f), V::mul(exp(V::mul(V::neg(ac), ac)), q));
    R y = V::select(V::lt(a, V::set1(1.0f)), y_small, y_large);
    y = V::select(V::lt(a, V::set1(4.0f)), y, V::set1(1.0f));
    y = V::copysign(y, x);
    return V::select(V::isnan(x), x, y);
  }

  static R tanh(R x) {
    static const float small[7] = {-0.3333333432674408f, 0.13333332538604736f,
                                   -0.0539676770567894f, 0.021860236302018166f,
                                   -0.008792536333203316f, 0.003309516701847315f,
                                   -0.0008648782386444509f};
    R a = V::abs(x);
    R s = V::mul(a, a);
    R y_small = V::fma(V::mul(a, s), horner(s, small, 7), a);
    R e = exp(V::mul(V::set1(2.0f), V::min(a, V::set1(10.0f))));
    R y_large = V::sub(V::set1(1.0f), V::div(V::set1(2.0f), V::add(e, V::set1(1.0f))));
    R y = V::select(V::lt(a, V::set1(0.625f)), y_small, y_large);
    y = V::copysign(y, x);
    return V::select(V::isnan(x), x, y);
  }
};

// Vector twins of chainrule::activation_forward / activation_derivative (float).
template <chainrule::Activation A, class V>
inline typename V::reg simd_activation_forward(typename V::reg z) {
  using M = SimdMath<V>;
  using chainrule::Activation;
  using C = chainrule::detail::ActConst<float>;
  if constexpr (A == Activation::none) {
    return z;
  } else if constexpr (A == Activation::relu) {
    return V::select(V::le(z, V::set1(0.0f)), V::set1(0.0f), z);  // NaN passes, as in torch
  } else if constexpr (A == Activation::gelu) {
    // z * (0.5 + 0.5 * erf(z * inv_sqrt2))
    auto e = M::erf(V::mul(z, V::set1(C::inv_sqrt2)));
    return V::mul(z, V::add(V::set1(0.5f), V::mul(V::set1(0.5f), e)));
  } else if constexpr (A == Activation::gelu_tanh) {
    // inner = sqrt_2_over_pi * (z + tanh_coeff * z * z * z); 0.5 * z * (1 + tanh(inner))
    auto cubic = V::mul(V::mul(V::mul(V::set1(C::tanh_coeff), z), z), z);
    auto inner = V::mul(V::set1(C::sqrt_2_over_pi), V::add(z, cubic));
    return V::mul(V::mul(V::set1(0.5f), z), V::add(V::set1(1.0f), M::tanh(inner)));
  } else {
    static_assert(A == Activation::silu, "unhandled activation");
    // z / (1 + exp(-z))
    return V::div(z, V::add(V::set1(1.0f), M::exp(V::neg(z))));
  }
}

template <chainrule::Activation A, class V>
inline typename V::reg simd_activation_derivative(typename V::reg z) {
  using M = SimdMath<V>;
  using chainrule::Activation;
  using C = chainrule::detail::ActConst<float>;
  if constexpr (A == Activation::none) {
    return V::set1(1.0f);
  } else if constexpr (A == Activation::relu) {
    return V::select(V::le(z, V::set1(0.0f)), V::set1(0.0f), V::set1(1.0f));
  } else if constexpr (A == Activation::gelu) {
    // cdf = 0.5 + 0.5 * erf(z * inv_sqrt2); pdf = inv_sqrt_2pi * exp(-0.5 * z * z); cdf + z * pdf
    auto cdf = V::add(V::set1(0.5f), V::mul(V::set1(0.5f), M::erf(V::mul(z, V::set1(C::inv_sqrt2)))));
    auto pdf = V::mul(V::set1(C::inv_sqrt_2pi), M::exp(V::mul(V::mul(V::set1(-0.5f), z), z)));
    return V::add(cdf, V::mul(z, pdf));
  } else if constexpr (A == Activation::gelu_tanh) {
    auto z2 = V::mul(z, z);
    auto inner = V::mul(V::set1(C::sqrt_2_over_pi),
                        V::add(z, V::mul(V::mul(V::set1(C::tanh_coeff), z2), z)));
    auto th = M::tanh(inner);
    auto d_inner = V::mul(V::set1(C::sqrt_2_over_pi),
                          V::add(V::set1(1.0f), V::mul(V::set1(3.0f * C::tanh_coeff), z2)));
    // 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * d_inner
    auto left = V::mul(V::set1(0.5f), V::add(V::set1(1.0f), th));
    auto right = V::mul(V::mul(V::mul(V::set1(0.5f), z), V::sub(V::set1(1.0f), V::mul(th, th))), d_inner);
    return V::add(left, right);
  } else {
    static_assert(A == Activation::silu, "unhandled activation");
    // s = 1 / (1 + exp(-z)); s * (1 + z * (1 - s))
    auto s = V::div(V::set1(1.0f), V::add(V::set1(1.0f), M::exp(V::neg(z))));
    return V::mul(s, V::add(V::set1(1.0f), V::mul(z, V::sub(V::set1(1.0f), s))));
  }
}

// Vector twin of chainrule::activation_grad: grad * act'(z), relu by selection.
template <chainrule::Activation A, class V>
inline typename V::reg simd_activation_grad(typename V::reg grad, typename V::reg z) {
  if constexpr (A == chainrule::Activation::relu) {
    return V::select(V::le(z, V::set1(0.0f)), V::set1(0.0f), grad);
  } else {
    return V::mul(grad, simd_activation_derivative<A, V>(z));
  }
}
