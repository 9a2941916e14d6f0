// The C++ entry points of every op, one set per backend.
//
// The schemas live in registration.cpp; each backend implements the functions below in its own
// namespace (chainrule::cpu, chainrule::emulated, chainrule::cuda) with exactly these signatures,
// and the dispatcher registration for its device calls them after the shared argument checks
// (checks.h). Semantics are documented once, in registration.cpp.
#pragma once

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace chainrule {

#define CHAINRULE_DECLARE_BACKEND_OPS                                                             \
  std::tuple<at::Tensor, at::Tensor> linear_forward(                                              \
      const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,   \
      std::string_view activation, bool save_pre_activation);                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(                                 \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,           \
      const std::optional<at::Tensor>& pre_activation, std::string_view activation,               \
      bool has_bias, std::array<bool, 3> output_mask);                                            \
  at::Tensor linear_backward_accumulate(                                                          \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,           \
      const std::optional<at::Tensor>& pre_activation, std::string_view activation,               \
      bool compute_grad_input, const at::Tensor& grad_weight,                                     \
      const std::optional<at::Tensor>& grad_bias);                                                \
  void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                \
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,                          \
             at::TensorList state_steps, at::TensorList master_params, double lr, double beta1,   \
             double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,          \
             bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,            \
             const std::optional<at::Tensor>& found_inf);                                         \
  void adam_tensor_lr_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,      \
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,                \
                       at::TensorList state_steps, at::TensorList master_params,                  \
                       const at::Tensor& lr, double beta1, double beta2, double weight_decay,     \
                       double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,      \
                       const std::optional<at::Tensor>& grad_scale,                               \
                       const std::optional<at::Tensor>& found_inf);

namespace cpu { CHAINRULE_DECLARE_BACKEND_OPS }
namespace emulated { CHAINRULE_DECLARE_BACKEND_OPS }
namespace cuda { CHAINRULE_DECLARE_BACKEND_OPS }

#undef CHAINRULE_DECLARE_BACKEND_OPS

}  // namespace chainrule
