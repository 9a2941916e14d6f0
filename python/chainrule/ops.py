"""Typed wrappers of the chainrule custom ops and their fake kernels.

The schemas are declared once in csrc/registration.cpp. The fake kernels below tell FakeTensor
(and so torch.compile) the shapes and dtypes each op produces without running it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

_ops = torch.ops.chainrule


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def linear_forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                   save_pre_activation: bool) -> tuple[Tensor, Tensor]:
    return _ops.linear_forward(input, weight, bias, activation, save_pre_activation)


def linear_backward(grad_output: Tensor, input: Tensor, weight: Tensor,
                    pre_activation: Optional[Tensor], activation: str, has_bias: bool,
                    output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return _ops.linear_backward(grad_output, input, weight, pre_activation, activation, has_bias,
                                list(output_mask))


def linear_backward_accumulate(grad_output: Tensor, input: Tensor, weight: Tensor,
                               pre_activation: Optional[Tensor], activation: str,
                               compute_grad_input: bool, grad_weight: Tensor,
                               grad_bias: Optional[Tensor]) -> Tensor:
    return _ops.linear_backward_accumulate(grad_output, input, weight, pre_activation, activation,
                                           compute_grad_input, grad_weight, grad_bias)


def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
          state_steps: Sequence[Tensor], master_params: Sequence[Tensor], *,
          lr: Union[float, Tensor], beta1: float, beta2: float, weight_decay: float, eps: float,
          amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
          grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    op = _ops.adam_.tensor_lr if isinstance(lr, Tensor) else _ops.adam_.default
    op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr=lr,
       beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
       maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
       found_inf=found_inf)


# ---- fake kernels -------------------------------------------------------------------------------

@torch.library.register_fake("chainrule::linear_forward")
def _linear_forward_fake(input, weight, bias, activation, save_pre_activation):
    torch._check(weight.dim() == 2, lambda: "chainrule.linear_forward: weight must be 2-D")
    torch._check(input.shape[-1] == weight.shape[1],
                 lambda: "chainrule.linear_forward: input's last dimension must equal in_features")
    out_shape = (*input.shape[:-1], weight.shape[0])
    output = input.new_empty(out_shape)
    keep = save_pre_activation and activation != "none"
    return output, (input.new_empty(out_shape) if keep else _empty(input))


@torch.library.register_fake("chainrule::linear_backward")
def _linear_backward_fake(grad_output, input, weight, pre_activation, activation, has_bias,
                          output_mask):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) \
        if output_mask[0] else _empty(input)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) \
        if output_mask[1] else _empty(weight)
    grad_bias = weight.new_empty((weight.shape[0],)) if (has_bias and output_mask[2]) \
        else _empty(weight)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("chainrule::linear_backward_accumulate")
def _linear_backward_accumulate_fake(grad_output, input, weight, pre_activation, activation,
                                     compute_grad_input, grad_weight, grad_bias):
    if compute_grad_input:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    return _empty(input)


@torch.library.register_fake("chainrule::adam_")
def _adam_fake(*args, **kwargs):
    return None


@torch.library.register_fake("chainrule::adam_.tensor_lr")
def _adam_tensor_lr_fake(*args, **kwargs):
    return None
