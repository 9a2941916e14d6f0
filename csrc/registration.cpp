// Every op's schema, in one place. Kernels register per device (cpu/register.cpp, cuda/*.cu);
// python/chainrule/ops.py pairs each op with its fake (meta) kernel for torch.compile.
//
// linear_forward(input (..., K), weight (N, K), bias (N)?, activation, save_pre_activation)
//   output         = act(input @ weight^T + bias), shape (..., N)
//   pre_activation = input @ weight^T + bias when activation != "none" and save_pre_activation,
//                    else an empty tensor of shape (0,). Saving it costs one (..., N) tensor in
//                    the input's dtype; recomputing it in backward would cost a third GEMM.
// linear_backward(grad_output, input, weight, pre_activation?, activation, has_bias, output_mask)
//   dZ = grad_output * act'(pre_activation); grad_input = dZ @ weight, grad_weight = dZ^T @ input,
//   grad_bias = sum of dZ over rows. An output whose output_mask bit is false (grad_bias also when
//   not has_bias) is an empty tensor of shape (0,).
// linear_backward_accumulate(..., compute_grad_input, grad_weight!, grad_bias!?)
//   as linear_backward, but grad_weight += dZ^T @ input and grad_bias += sum(dZ) in place (fp32
//   math, written in the buffer's dtype): what AccumulateGrad would do, without a temporary.
//   Returns grad_input, or an empty (0,) tensor when not compute_grad_input.
// adam_(params!, grads, exp_avgs!, exp_avg_sqs!, max_exp_avg_sqs!, state_steps!, master_params!,
//       lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
//       grad_scale?, found_inf?)
//   One Adam/AdamW step over every tensor in the lists (csrc/include/chainrule/adam_math.h).
//   Each state_steps[i] (float32, one element, on the params' device) is advanced by one and
//   the new value is used for bias correction. grads are divided by grad_scale when given. When
//   found_inf is given and nonzero nothing changes, state_steps included. max_exp_avg_sqs is []
//   unless amsgrad; master_params is [] or float32 copies of bfloat16/float16 params, which are
//   then updated in float32 and rounded into params. The .tensor_lr overload takes lr as a
//   one-element tensor on the params' device, read by the kernel (no host synchronisation).
#include <torch/library.h>

TORCH_LIBRARY(chainrule, m) {
  m.def(
      "linear_forward(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "bool save_pre_activation) -> (Tensor output, Tensor pre_activation)");
  m.def(
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? pre_activation, "
      "str activation, bool has_bias, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_backward_accumulate(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor? pre_activation, str activation, bool compute_grad_input, Tensor(a!) grad_weight, "
      "Tensor(b!)? grad_bias) -> Tensor grad_input");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "Tensor(f!)[] master_params, *, float lr, float beta1, float beta2, float weight_decay, "
      "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "adam_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "Tensor(f!)[] master_params, *, Tensor lr, float beta1, float beta2, float weight_decay, "
      "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}
