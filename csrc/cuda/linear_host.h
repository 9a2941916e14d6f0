// The linear layer's ops on top of the CUDA kernels, written once for both ways of running them:
// csrc/cuda/linear.cu (CUDA tensors, <<<>>> on the current stream) and csrc/emulated/linear.cpp
// (CPU tensors, chainrule::emu::launch). The code only touches tensors through ATen calls that
// work on either device (views, empty, contiguous), and hands raw pointers to the kernels through
// the Launcher (see linear_plan.h).
//
//   forward:  Z = X W^T + b,  Y = act(Z)                   one GEMM, epilogue fused
//   backward: dZ = dY * act'(Z), db = sum_rows dZ          one pass (linear_bias_grad.cuh)
//             dX = dZ W                                    GEMM (grad_input role)
//             dW = dZ^T X  or  dW += dZ^T X                GEMM (grad_weight role)
// When the activation is none, dZ is dY itself and the pass runs only if db is wanted.
#pragma once

#include <array>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "chainrule/activation.h"
#include "cuda/linear_plan.h"

namespace chainrule::linear_host {

using linear_plan::DType;
using linear_plan::GemmRole;

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::float64;
    case at::kFloat: return DType::float32;
    case at::kBFloat16: return DType::bfloat16;
    case at::kHalf: return DType::float16;
    default: break;
  }
  TORCH_CHECK(false, "chainrule.linear: unsupported dtype ", t.scalar_type(),
              " (float64, float32, bfloat16 or float16)");
}

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// (rows, features) view of an (..., features) tensor whose features are unit-stride; copies only
// when no such view exists. Rows may have any stride (even 0, for an expanded input).
inline at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor rows = t.reshape({-1, t.size(-1)});
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

// Leading dimension for the kernels. With a single row it is never multiplied by a row index, so
// any value that keeps the alignment test honest will do.
inline int64_t leading_dim(const at::Tensor& rows) {
  return rows.size(0) > 1 ? rows.stride(0) : (rows.size(1) + 7) / 8 * 8;
}

inline int checked_int(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " = ", v,
              " exceeds the kernels' 2^31 - 1 limit per dimension");
  return static_cast<int>(v);
}

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The 16-byte cp.async path of the tensor-core GEMM needs both operands' base addresses and row
// pitches to be multiples of 16 bytes; otherwise the kernel copies element by element.
inline kernels::GemmParams gemm_params(const at::Tensor& a, int64_t lda, const at::Tensor& b,
                                       int64_t ldb, const at::Tensor& c, int64_t ldc, int64_t m,
                                       int64_t n, int64_t k) {
  kernels::GemmParams p{};
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.c = c.mutable_data_ptr();
  p.lda = lda;
  p.ldb = ldb;
  p.ldc = ldc;
  p.m = checked_int("chainrule.linear", "GEMM M", m);
  p.n = checked_int("chainrule.linear", "GEMM N", n);
  p.k = checked_int("chainrule.linear", "GEMM K", k);
  p.k_per_split = p.k;
  p.splits = 1;
  const int64_t elem = a.element_size();
  p.operands_aligned16 = aligned(p.a, 16) && aligned(p.b, 16) && (lda * elem) % 16 == 0 &&
                         (ldb * elem) % 16 == 0;
  p.output_pairs_aligned = aligned(p.c, 2 * elem) && ldc % 2 == 0;
  return p;
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out = sizes.vec();
  out.back() = last;
  return out;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> forward(Launcher& launch, const at::Tensor& input,
                                           const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           Activation activation, bool save_pre_activation) {
  const int64_t N = weight.size(0);
  const int64_t K = weight.size(1);
  const at::Tensor x = as_rows(input);
  const at::Tensor w = as_rows(weight);
  const int64_t M = x.size(0);
  const bool keep_pre = save_pre_activation && activation != Activation::none;
  at::Tensor output = at::empty({M, N}, input.options());
  at::Tensor pre = keep_pre ? at::empty({M, N}, input.options()) : at::Tensor();
  at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();

  kernels::GemmParams p = gemm_params(x, leading_dim(x), w, leading_dim(w), output, N, M, N, K);
  p.bias = bias_contiguous.defined() ? bias_contiguous.const_data_ptr() : nullptr;
  if (keep_pre) {
    p.pre_activation = pre.mutable_data_ptr();
    p.ld_pre_activation = N;
    p.output_pairs_aligned =
        p.output_pairs_aligned && aligned(p.pre_activation, 2 * input.element_size());
  }
  linear_plan::launch_gemm(launch, dtype_of(weight), GemmRole::forward, activation, p);

  const auto out_sizes = with_last_dim(input.sizes(), N);
  return {output.view(out_sizes), keep_pre ? pre.view(out_sizes) : at::empty({0}, input.options())};
}

// The backward shared by linear_backward and linear_backward_accumulate: writes (or adds) dW and
// db into the given buffers and returns dX (or an empty tensor).
template <class Launcher>
at::Tensor backward_into(Launcher& launch, const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight,
                         const std::optional<at::Tensor>& pre_activation, Activation activation,
                         bool compute_grad_input, const at::Tensor* grad_weight,
                         const at::Tensor* grad_bias, bool accumulate) {
  const int64_t N = weight.size(0);
  const int64_t K = weight.size(1);
  const DType dtype = dtype_of(weight);
  const at::Tensor dy = as_rows(grad_output);
  const at::Tensor x = as_rows(input);
  const at::Tensor w = as_rows(weight);
  const int64_t M = dy.size(0);

  // dZ and db in one pass.
  at::Tensor dz = dy;
  if (activation != Activation::none || grad_bias != nullptr) {
    kernels::BiasGradParams p{};
    p.grad_output = dy.const_data_ptr();
    p.ld_grad_output = leading_dim(dy);
    p.m = checked_int("chainrule.linear_backward", "rows", M);
    p.n = checked_int("chainrule.linear_backward", "out_features", N);
    if (activation != Activation::none) {
      const at::Tensor z = as_rows(*pre_activation);
      dz = at::empty({M, N}, dy.options());
      p.pre_activation = z.const_data_ptr();
      p.ld_pre_activation = leading_dim(z);
      p.grad_pre_activation = dz.mutable_data_ptr();
      p.ld_grad_pre_activation = N;
    }
    const linear_plan::BiasGradSlicing slicing = linear_plan::plan_bias_grad(M);
    p.rows_per_slice = slicing.rows_per_slice;
    p.slices = slicing.slices;
    at::Tensor partial_sums;
    if (grad_bias != nullptr) {
      p.grad_bias = grad_bias->mutable_data_ptr();
      p.accumulate = accumulate;
      if (p.slices > 1) {
        partial_sums = at::empty({p.slices, N}, dy.options().dtype(accumulate_type(dy.scalar_type())));
        p.partial_sums = partial_sums.mutable_data_ptr();
      }
    }
    linear_plan::launch_bias_grad(launch, dtype, activation, p);
  }

  if (grad_weight != nullptr) {
    // dW[N, K] = dZ^T . X: A = dZ read MN-major, B = X read MN-major, reduction over the M rows.
    kernels::GemmParams p =
        gemm_params(dz, leading_dim(dz), x, leading_dim(x), *grad_weight, K, N, K, M);
    p.accumulate = accumulate;
    const linear_plan::SplitK split = linear_plan::plan_split_k(dtype, GemmRole::grad_weight, N, K, M);
    at::Tensor partial_sums;
    if (split.splits > 1) {
      p.splits = split.splits;
      p.k_per_split = split.k_per_split;
      partial_sums = at::empty({split.splits, N, K},
                               dz.options().dtype(accumulate_type(dz.scalar_type())));
      p.partial_sums = partial_sums.mutable_data_ptr();
    }
    linear_plan::launch_gemm(launch, dtype, GemmRole::grad_weight, Activation::none, p);
  }
  if (!compute_grad_input) return at::empty({0}, input.options());
  // dX[M, K] = dZ . W: A = dZ K-major, B = W MN-major, reduction over the N output features.
  at::Tensor grad_input = at::empty({M, K}, input.options());
  kernels::GemmParams p = gemm_params(dz, leading_dim(dz), w, leading_dim(w), grad_input, K, M, K, N);
  linear_plan::launch_gemm(launch, dtype, GemmRole::grad_input, Activation::none, p);
  return grad_input.view(input.sizes());
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    Launcher& launch, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& pre_activation,
    Activation activation, bool has_bias, std::array<bool, 3> output_mask) {
  at::Tensor grad_weight = output_mask[1]
                               ? at::empty(weight.sizes(), weight.options())
                               : at::empty({0}, weight.options());
  const bool want_bias = has_bias && output_mask[2];
  at::Tensor grad_bias = at::empty({want_bias ? weight.size(0) : 0}, weight.options());
  at::Tensor grad_input = backward_into(launch, grad_output, input, weight, pre_activation,
                                        activation, output_mask[0],
                                        output_mask[1] ? &grad_weight : nullptr,
                                        want_bias ? &grad_bias : nullptr, /*accumulate=*/false);
  return {grad_input, grad_weight, grad_bias};
}

template <class Launcher>
at::Tensor backward_accumulate(Launcher& launch, const at::Tensor& grad_output,
                               const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& pre_activation,
                               Activation activation, bool compute_grad_input,
                               const at::Tensor& grad_weight,
                               const std::optional<at::Tensor>& grad_bias) {
  return backward_into(launch, grad_output, input, weight, pre_activation, activation,
                       compute_grad_input, &grad_weight, grad_bias ? &*grad_bias : nullptr,
                       /*accumulate=*/true);
}

}  // namespace chainrule::linear_host
