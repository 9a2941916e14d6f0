// Wraps a backend's op functions (ops.h) with the shared argument checks, so every device
// registration validates its inputs the same way, and answers the linear ops with a zero extent
// (empty batch, in_features or out_features = 0) itself (empty_linear.h), so no backend sees one:
//   m.impl("linear_forward", &checked_linear_forward<&cuda::linear_forward>);
#pragma once

#include "checks.h"
#include "empty_linear.h"
#include "ops.h"

namespace chainrule {

template <auto Impl>
std::tuple<at::Tensor, at::Tensor> checked_linear_forward(const at::Tensor& input,
                                                          const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          std::string_view activation,
                                                          bool save_pre_activation) {
  constexpr const char* op = "chainrule.linear_forward";
  Activation act = check_activation(op, activation);
  check_linear_forward(op, input, weight, bias);
  if (empty_linear::applies(input, weight)) {
    return empty_linear::forward(input, weight, bias, act, save_pre_activation);
  }
  return Impl(input, weight, bias, activation, save_pre_activation);
}

template <auto Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, std::string_view activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "chainrule.linear_backward";
  Activation act = check_activation(op, activation);
  check_linear_backward(op, grad_output, input, weight, pre_activation, act);
  if (empty_linear::applies(input, weight)) {
    return empty_linear::backward(grad_output, input, weight, pre_activation, act, has_bias,
                                  output_mask);
  }
  return Impl(grad_output, input, weight, pre_activation, activation, has_bias, output_mask);
}

template <auto Impl>
at::Tensor checked_linear_backward_accumulate(const at::Tensor& grad_output,
                                              const at::Tensor& input, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& pre_activation,
                                              std::string_view activation, bool compute_grad_input,
                                              const at::Tensor& grad_weight,
                                              const std::optional<at::Tensor>& grad_bias) {
  constexpr const char* op = "chainrule.linear_backward_accumulate";
  Activation act = check_activation(op, activation);
  check_linear_backward(op, grad_output, input, weight, pre_activation, act);
  check_gradient_buffers(op, weight, grad_weight, grad_bias);
  if (empty_linear::applies(input, weight)) {
    return empty_linear::backward_accumulate(grad_output, input, weight, pre_activation, act,
                                             compute_grad_input, grad_weight, grad_bias);
  }
  return Impl(grad_output, input, weight, pre_activation, activation, compute_grad_input,
              grad_weight, grad_bias);
}

template <auto Impl>
void checked_adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList state_steps, at::TensorList master_params, double lr,
                  double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                  bool maximize, bool decoupled_weight_decay,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  check_adam("chainrule.adam_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
             state_steps, master_params, amsgrad, grad_scale, found_inf);
  Impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
       beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
       found_inf);
}

template <auto Impl>
void checked_adam_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList state_steps, at::TensorList master_params,
                            const at::Tensor& lr, double beta1, double beta2,
                            double weight_decay, double eps, bool amsgrad, bool maximize,
                            bool decoupled_weight_decay,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  check_adam("chainrule.adam_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
             state_steps, master_params, amsgrad, grad_scale, found_inf);
  check_adam_lr("chainrule.adam_", params, lr);
  Impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
       beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
       found_inf);
}

// Registers a backend namespace's five functions for one dispatch key:
//   TORCH_LIBRARY_IMPL(chainrule, CUDA, m) { CHAINRULE_REGISTER_BACKEND(m, cuda); }
#define CHAINRULE_REGISTER_BACKEND(m, ns)                                                       \
  do {                                                                                          \
    m.impl("linear_forward", &::chainrule::checked_linear_forward<&::chainrule::ns::linear_forward>); \
    m.impl("linear_backward",                                                                   \
           &::chainrule::checked_linear_backward<&::chainrule::ns::linear_backward>);           \
    m.impl("linear_backward_accumulate",                                                        \
           &::chainrule::checked_linear_backward_accumulate<                                    \
               &::chainrule::ns::linear_backward_accumulate>);                                  \
    m.impl("adam_", &::chainrule::checked_adam<&::chainrule::ns::adam_>);                       \
    m.impl("adam_.tensor_lr", &::chainrule::checked_adam_tensor_lr<&::chainrule::ns::adam_tensor_lr_>); \
  } while (0)

}  // namespace chainrule
