"""torch.library.opcheck on every op: schema (mutation annotations), fake kernels, dispatch."""
from __future__ import annotations

import pytest
import torch

import chainrule  # noqa: F401

ops = torch.ops.chainrule


def linear_samples(dtype):
    x = torch.randn(5, 7, dtype=dtype)
    x3 = torch.randn(2, 3, 7, dtype=dtype)
    w = torch.randn(4, 7, dtype=dtype)
    b = torch.randn(4, dtype=dtype)
    yield ops.linear_forward.default, (x, w, b, "gelu", True)
    yield ops.linear_forward.default, (x3, w, None, "relu", False)
    z = torch.randn(5, 4, dtype=dtype)
    yield ops.linear_backward.default, (torch.randn(5, 4, dtype=dtype), x, w, z, "silu", True,
                                        [True, True, True])
    yield ops.linear_backward.default, (torch.randn(5, 4, dtype=dtype), x, w, None, "none", False,
                                        [False, True, False])
    yield ops.linear_backward_accumulate.default, (torch.randn(5, 4, dtype=dtype), x, w, z,
                                                   "gelu_tanh", True, torch.randn(4, 7, dtype=dtype),
                                                   torch.randn(4, dtype=dtype))
    yield ops.linear_backward_accumulate.default, (torch.randn(5, 4, dtype=dtype), x, w, None,
                                                   "none", False, torch.randn(4, 7, dtype=dtype),
                                                   None)


def adam_samples(dtype):
    shapes = [(3, 5), (7,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    states = [[torch.rand(s, dtype=dtype) for s in shapes] for _ in range(3)]
    steps = [torch.tensor(3.0) for _ in shapes]
    kwargs = dict(beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=True, maximize=False,
                  decoupled_weight_decay=True)
    yield ops.adam_.default, (params, grads, *states, steps, []), dict(lr=1e-2, **kwargs)
    yield ops.adam_.tensor_lr, (params, grads, *states, steps, []), dict(
        lr=torch.tensor(1e-2), grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_linear(dtype):
    for op, args in linear_samples(dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_adam(dtype):
    for op, args, kwargs in adam_samples(dtype):
        torch.library.opcheck(op, args, kwargs)
