#include "empty_linear.h"

#include <vector>

#include <ATen/ATen.h>

namespace chainrule::empty_linear {

namespace {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out = sizes.vec();
  out.back() = last;
  return out;
}

at::Tensor activation_forward(const at::Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::none: return z.clone();
    case Activation::relu: return at::relu(z);
    case Activation::gelu: return at::gelu(z, "none");
    case Activation::gelu_tanh: return at::gelu(z, "tanh");
    case Activation::silu: return at::silu(z);
  }
  return z.clone();
}

// dZ = dY * act'(Z), in the accumulation type.
at::Tensor activation_backward(const at::Tensor& grad_output,
                               const std::optional<at::Tensor>& pre_activation,
                               Activation activation) {
  const at::ScalarType acc = accumulate_type(grad_output.scalar_type());
  at::Tensor dy = grad_output.to(acc);
  if (activation == Activation::none) return dy;
  at::Tensor z = pre_activation->to(acc);
  switch (activation) {
    case Activation::relu: return at::threshold_backward(dy, z, 0);
    case Activation::gelu: return at::gelu_backward(dy, z, "none");
    case Activation::gelu_tanh: return at::gelu_backward(dy, z, "tanh");
    case Activation::silu: return at::silu_backward(dy, z);
    case Activation::none: break;
  }
  return dy;
}

// Sum of dZ over every leading (row) dimension, in the accumulation type: shape (N,).
at::Tensor row_sums(const at::Tensor& grad_pre) {
  if (grad_pre.dim() == 1) return grad_pre.clone();
  std::vector<int64_t> dims(grad_pre.dim() - 1);
  for (size_t i = 0; i < dims.size(); ++i) dims[i] = static_cast<int64_t>(i);
  return grad_pre.sum(dims);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           Activation activation, bool save_pre_activation) {
  const auto out_sizes = with_last_dim(input.sizes(), weight.size(0));
  at::Tensor pre = at::zeros(out_sizes, input.options());
  if (bias.has_value() && pre.numel() > 0) pre.add_(*bias);
  at::Tensor output = activation_forward(pre, activation);
  const bool keep_pre = save_pre_activation && activation != Activation::none;
  return {output, keep_pre ? pre : at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, Activation activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  at::Tensor grad_input = output_mask[0] ? at::zeros(input.sizes(), input.options())
                                         : at::empty({0}, input.options());
  at::Tensor grad_weight = output_mask[1] ? at::zeros(weight.sizes(), weight.options())
                                          : at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (has_bias && output_mask[2]) {
    grad_bias = row_sums(activation_backward(grad_output, pre_activation, activation))
                    .to(weight.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor backward_accumulate(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& weight,
                               const std::optional<at::Tensor>& pre_activation,
                               Activation activation, bool compute_grad_input,
                               const at::Tensor& grad_weight,
                               const std::optional<at::Tensor>& grad_bias) {
  // dW += dZ^T X adds nothing: one of its factors is empty. db += sum(dZ) is not empty when
  // in_features = 0, and is added in float32 (float64) and rounded once, as the kernels do.
  if (grad_bias.has_value() && grad_output.numel() > 0) {
    at::Tensor sums = row_sums(activation_backward(grad_output, pre_activation, activation));
    const_cast<at::Tensor&>(*grad_bias).copy_(grad_bias->to(sums.scalar_type()) + sums);
  }
  return compute_grad_input ? at::zeros(input.sizes(), input.options())
                            : at::empty({0}, input.options());
}

}  // namespace chainrule::empty_linear
