// Kernels for CPU tensors. A chainrule op on CPU tensors runs either the CPU kernels
// (chainrule::cpu) or, inside chainrule.backends.emulated_cuda(), the CUDA kernel source executed
// by the emulator (chainrule::emulated); both behind the same argument checks.
#include <torch/library.h>

#include "backend.h"
#include "dispatch.h"

namespace chainrule {
namespace {

bool use_emulator(const char* op) {
  if (host_backend() != HostBackend::emulated_cuda) return false;
  TORCH_CHECK(CHAINRULE_WITH_EMULATOR, op,
              ": the emulated_cuda backend is not built into this chainrule (no CUDA headers were "
              "found at build time)");
  return true;
}

}  // namespace

// The routing functions have the backend signature of ops.h, so the shared registration applies.
namespace host {

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::string_view activation,
                                                  bool save_pre_activation) {
  if (use_emulator("chainrule.linear_forward")) {
    return emulated::linear_forward(input, weight, bias, activation, save_pre_activation);
  }
  return cpu::linear_forward(input, weight, bias, activation, save_pre_activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, std::string_view activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  if (use_emulator("chainrule.linear_backward")) {
    return emulated::linear_backward(grad_output, input, weight, pre_activation, activation,
                                     has_bias, output_mask);
  }
  return cpu::linear_backward(grad_output, input, weight, pre_activation, activation, has_bias,
                              output_mask);
}

at::Tensor linear_backward_accumulate(const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& pre_activation,
                                      std::string_view activation, bool compute_grad_input,
                                      const at::Tensor& grad_weight,
                                      const std::optional<at::Tensor>& grad_bias) {
  if (use_emulator("chainrule.linear_backward_accumulate")) {
    return emulated::linear_backward_accumulate(grad_output, input, weight, pre_activation,
                                                activation, compute_grad_input, grad_weight,
                                                grad_bias);
  }
  return cpu::linear_backward_accumulate(grad_output, input, weight, pre_activation, activation,
                                         compute_grad_input, grad_weight, grad_bias);
}

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           at::TensorList master_params, double lr, double beta1, double beta2,
           double weight_decay, double eps, bool amsgrad, bool maximize,
           bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf) {
  auto impl = use_emulator("chainrule.adam_") ? &emulated::adam_ : &cpu::adam_;
  impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
       beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
       found_inf);
}

void adam_tensor_lr_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, at::TensorList master_params,
                     const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                     double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  auto impl = use_emulator("chainrule.adam_") ? &emulated::adam_tensor_lr_ : &cpu::adam_tensor_lr_;
  impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
       beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
       found_inf);
}

}  // namespace host

// A build without CUDA headers has no emulated kernels; these weak definitions stand in for them
// (use_emulator() has refused before any of them could be reached).
namespace emulated {
#define CHAINRULE_NOT_BUILT TORCH_CHECK(false, "chainrule: the emulated_cuda backend is not built")
[[gnu::weak]] std::tuple<at::Tensor, at::Tensor> linear_forward(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view, bool) {
  CHAINRULE_NOT_BUILT;
}
[[gnu::weak]] std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    std::string_view, bool, std::array<bool, 3>) {
  CHAINRULE_NOT_BUILT;
}
[[gnu::weak]] at::Tensor linear_backward_accumulate(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    std::string_view, bool, const at::Tensor&,
                                                    const std::optional<at::Tensor>&) {
  CHAINRULE_NOT_BUILT;
}
[[gnu::weak]] void adam_(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, at::TensorList, at::TensorList, double, double, double,
                         double, double, bool, bool, bool, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&) {
  CHAINRULE_NOT_BUILT;
}
[[gnu::weak]] void adam_tensor_lr_(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                   at::TensorList, at::TensorList, at::TensorList,
                                   const at::Tensor&, double, double, double, double, bool, bool,
                                   bool, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&) {
  CHAINRULE_NOT_BUILT;
}
#undef CHAINRULE_NOT_BUILT
}  // namespace emulated

}  // namespace chainrule

TORCH_LIBRARY_IMPL(chainrule, CPU, m) { CHAINRULE_REGISTER_BACKEND(m, host); }
