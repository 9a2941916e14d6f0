"""Drop-in modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional

__all__ = ["Linear"]


class Linear(torch.nn.Linear):
    """torch.nn.Linear with the activation fused into the layer, forward and backward.

    Same parameters, initialisation and state_dict keys as torch.nn.Linear, so checkpoints load
    both ways. activation: None, "relu", "gelu" (exact erf), "gelu_tanh" or "silu".
    accumulate_grad=True makes backward add the weight and bias gradients into an existing .grad
    in place, keeping every gradient hook (see chainrule.functional).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activation: Optional[str] = None, accumulate_grad: bool = False,
                 device=None, dtype=None) -> None:
        functional.activation_op_name(activation, "chainrule.nn.Linear")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation
        self.accumulate_grad = accumulate_grad

    def forward(self, input: Tensor) -> Tensor:
        return functional.linear(input, self.weight, self.bias, self.activation,
                                 accumulate_grad=self.accumulate_grad)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.accumulate_grad:
            text += ", accumulate_grad=True"
        return text
