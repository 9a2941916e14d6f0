"""Every bad input raises an error that names the op, the argument and what was received."""
from __future__ import annotations

import pytest
import torch

import chainrule
from chainrule.functional import linear


def test_mismatched_in_features(backend):
    x = torch.randn(4, 5, device=backend.device)
    w = torch.randn(3, 6, device=backend.device)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input's last dimension \(5\) "
                                           r"must equal weight's in_features \(6\)"):
        linear(x, w)


def test_weight_not_2d(backend):
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: weight must be 2-D "
                                           r"\(out_features, in_features\), got a 3-D float32 "
                                           r"tensor of shape \[2, 3, 4\]"):
        linear(torch.randn(2, 4, device=backend.device), torch.randn(2, 3, 4, device=backend.device))


@pytest.mark.parametrize("bias_shape", [(4,), (3, 1), ()], ids=str)
def test_bias_wrong_shape(backend, bias_shape):
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: bias must be 1-D of size "
                                           r"out_features \(3\), got a \d-D float32 tensor of shape"):
        linear(torch.randn(2, 4, device=backend.device), torch.randn(3, 4, device=backend.device),
               torch.randn(bias_shape, device=backend.device))


def test_mixed_dtypes(backend):
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input and weight must have the "
                                           r"same dtype, got input float64 and weight float32"):
        linear(torch.randn(2, 4, dtype=torch.float64, device=backend.device),
               torch.randn(3, 4, device=backend.device))
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: bias and weight must have the "
                                           r"same dtype, got bias bfloat16 and weight float32"):
        linear(torch.randn(2, 4, device=backend.device), torch.randn(3, 4, device=backend.device),
               torch.randn(3, dtype=torch.bfloat16, device=backend.device))


def test_mixed_devices():
    x = torch.randn(2, 4)
    if torch.cuda.is_available():
        w = torch.randn(3, 4, device="cuda")
        call = torch.ops.chainrule.linear_forward.default
    else:
        # Without a second real device, hand the CPU kernel a meta tensor: the check is the same.
        w = torch.randn(3, 4, device="meta")
        def call(*args):
            return torch.ops.chainrule.linear_forward.default._op_dk(torch._C.DispatchKey.CPU, *args)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input and weight must be on "
                                           r"the same device, got input on cpu and weight on"):
        call(x, w, None, "none", False)


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"chainrule.functional.linear: unknown activation 'tanh'; "
                                         r"expected one of None, 'relu', 'gelu', 'gelu_tanh', 'silu'"):
        linear(torch.randn(2, 4), torch.randn(3, 4), activation="tanh")
    with pytest.raises(ValueError, match=r"chainrule.nn.Linear: unknown activation 'GELU'"):
        chainrule.nn.Linear(4, 3, activation="GELU")
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: unknown activation 'tanh'"):
        torch.ops.chainrule.linear_forward(torch.randn(2, 4), torch.randn(3, 4), None, "tanh", False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_dtypes(backend, dtype):
    x = torch.ones(2, 4, dtype=dtype, device=backend.device)
    w = torch.ones(3, 4, dtype=dtype, device=backend.device)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input must be a floating-point "
                                           r"tensor \(float64, float32, bfloat16 or float16\), got a "
                                           r"2-D \w+ tensor of shape \[2, 4\]"):
        linear(x, w)


def test_zero_dim_input():
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input must have at least 1 "
                                           r"dimension \(..., in_features\), got a 0-D"):
        linear(torch.tensor(1.0), torch.randn(3, 1))


def test_backward_shape_mismatch():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: grad_output must have shape "
                                           r"\[2, 3\] \(input's shape with out_features last\), got "
                                           r"a 2-D float32 tensor of shape \[2, 5\]"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 5), x, w, None, "none", False,
                                            [True, True, False])
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: activation 'gelu' needs "
                                           r"pre_activation of shape \[2, 3\], got None"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 3), x, w, None, "gelu", False,
                                            [True, True, False])


def test_accumulate_buffer_mismatch():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_weight must "
                                           r"have weight's shape \[3, 4\], got a 2-D float32 tensor"):
        torch.ops.chainrule.linear_backward_accumulate(torch.randn(2, 3), x, w, None, "none", True,
                                                       torch.zeros(4, 3), None)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_weight must "
                                           r"have weight's dtype float32, got a 2-D float64 tensor"):
        torch.ops.chainrule.linear_backward_accumulate(torch.randn(2, 3), x, w, None, "none", True,
                                                       torch.zeros(3, 4, dtype=torch.float64), None)


def test_adam_list_mismatch():
    p = [torch.zeros(3), torch.zeros(2)]
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: grads must have one tensor per param "
                                           r"\(2\), got 1"):
        chainrule.ops.adam_(p, [torch.zeros(3)], p, p, [], steps, [], lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                            maximize=False, decoupled_weight_decay=False)
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: exp_avgs\[1\] must have params\[1\]'s "
                                           r"shape \[2\], got a 1-D float32 tensor of shape \[3\]"):
        chainrule.ops.adam_(p, [torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(3)],
                            p, [], steps, [], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
                            eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False)
