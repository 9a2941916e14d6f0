// Argument checks shared by every backend. Each message names the op, the argument and what was
// received: "chainrule.linear_forward: weight must be 2-D, got a 3-D tensor of shape [2, 3, 4]".
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "chainrule/activation.h"

namespace chainrule {

Activation check_activation(const char* op, std::string_view activation);

void check_linear_forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias);

// Checks grad_output and pre_activation against input and weight (after check_linear_forward).
void check_linear_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& pre_activation,
                           Activation activation);

void check_gradient_buffers(const char* op, const at::Tensor& weight,
                            const at::Tensor& grad_weight,
                            const std::optional<at::Tensor>& grad_bias);

void check_adam(const char* op, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                at::TensorList master_params, bool amsgrad,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf);

// A tensor lr (adam_.tensor_lr): one floating-point element on the params' device.
void check_adam_lr(const char* op, at::TensorList params, const at::Tensor& lr);

}  // namespace chainrule
