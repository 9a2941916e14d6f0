// Fused linear layer on the `emulated_cuda` backend: the CUDA kernels of csrc/cuda/kernels/
// compiled by the host compiler against the CUDA emulator (csrc/emu/) and run on CPU tensors.
//
// Everything but the launch is shared with the CUDA launcher (csrc/cuda/linear.cu): the op bodies
// are csrc/cuda/linear_host.h and the kernel choice is csrc/cuda/linear_plan.h.
#include "cuda/linear_host.h"
#include "checks.h"
#include "ops.h"

namespace chainrule::emulated {

namespace {

struct EmulatedLauncher {
  template <typename Params>
  void operator()(const char* name, void (*kernel)(Params), dim3 grid, dim3 block,
                  size_t smem_bytes, const Params& params) const {
    // The twin of csrc/cuda/linear.cu's opt-in; the emulator, like a GPU, refuses a launch over
    // 48 KiB without it.
    if (smem_bytes > linear_plan::kDefaultMaxDynamicSharedBytes) {
      emu::set_max_dynamic_shared_memory(kernel, smem_bytes);
    }
    emu::launch(name, kernel, grid, block, smem_bytes, params);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::string_view activation,
                                                  bool save_pre_activation) {
  const Activation act = check_activation("chainrule.linear_forward", activation);
  EmulatedLauncher launch;
  return linear_host::forward(launch, input, weight, bias, act, save_pre_activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, std::string_view activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  const Activation act = check_activation("chainrule.linear_backward", activation);
  EmulatedLauncher launch;
  return linear_host::backward(launch, grad_output, input, weight, pre_activation, act, has_bias,
                               output_mask);
}

at::Tensor linear_backward_accumulate(const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& pre_activation,
                                      std::string_view activation, bool compute_grad_input,
                                      const at::Tensor& grad_weight,
                                      const std::optional<at::Tensor>& grad_bias) {
  const Activation act = check_activation("chainrule.linear_backward_accumulate", activation);
  EmulatedLauncher launch;
  return linear_host::backward_accumulate(launch, grad_output, input, weight, pre_activation, act,
                                          compute_grad_input, grad_weight, grad_bias);
}

}  // namespace chainrule::emulated
