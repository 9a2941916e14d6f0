// Fused linear layer on CUDA devices: the launcher for the kernels in csrc/cuda/kernels/linear_*.cuh.
//
// The op bodies (views, allocations, Params) are csrc/cuda/linear_host.h and the kernel choice is
// csrc/cuda/linear_plan.h, both shared with the emulated twin (csrc/emulated/linear.cpp); this file
// adds what only a real device has: the device guard, the current stream, <<<>>> and the launch
// check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/linear_host.h"
#include "dispatch.h"
#include "ops.h"

namespace chainrule::cuda {

namespace {

struct CudaLauncher {
  cudaStream_t stream;

  template <typename Params>
  void operator()(const char* /*name*/, void (*kernel)(Params), dim3 grid, dim3 block,
                  size_t smem_bytes, const Params& params) const {
    // More than 48 KiB of dynamic shared memory needs the kernel's opt-in (CUDA C++ Programming
    // Guide, "Shared Memory"); the emulator refuses such a launch without it too.
    if (smem_bytes > linear_plan::kDefaultMaxDynamicSharedBytes) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
    }
    kernel<<<grid, block, smem_bytes, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLauncher launcher_for(const at::Tensor& t) {
  return CudaLauncher{at::cuda::getCurrentCUDAStream(t.device().index()).stream()};
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::string_view activation,
                                                  bool save_pre_activation) {
  const Activation act = check_activation("chainrule.linear_forward", activation);
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLauncher launch = launcher_for(input);
  return linear_host::forward(launch, input, weight, bias, act, save_pre_activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, std::string_view activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  const Activation act = check_activation("chainrule.linear_backward", activation);
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLauncher launch = launcher_for(input);
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
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLauncher launch = launcher_for(input);
  return linear_host::backward_accumulate(launch, grad_output, input, weight, pre_activation, act,
                                          compute_grad_input, grad_weight, grad_bias);
}

// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_IMPL(chainrule, CUDA, m) {
  m.impl("linear_forward", &checked_linear_forward<&linear_forward>);
  m.impl("linear_backward", &checked_linear_backward<&linear_backward>);
  m.impl("linear_backward_accumulate",
         &checked_linear_backward_accumulate<&linear_backward_accumulate>);
}

}  // namespace chainrule::cuda
