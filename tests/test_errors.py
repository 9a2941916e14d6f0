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


# ---- more bad inputs: ops ------------------------------------------------------------------------

def _on_cpu_kernel(op):
    """Calls `op`'s CPU kernel directly, so that a meta tensor can stand for a second device on a
    machine without a GPU (the dispatcher would otherwise route by the meta tensor)."""
    def call(*args, **kwargs):
        return op._op_dk(torch._C.DispatchKey.CPU, *args, **kwargs)
    return call


def test_bias_on_another_device():
    call = _on_cpu_kernel(torch.ops.chainrule.linear_forward.default)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: bias and weight must be on "
                                           r"the same device, got bias on meta and weight on cpu"):
        call(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, device="meta"), "none", False)


def test_complex_weight(backend):
    x = torch.randn(2, 4, device=backend.device)
    w = torch.randn(3, 4, dtype=torch.complex64, device=backend.device)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: weight must be a floating-"
                                           r"point tensor .* got a 2-D complex64 tensor of shape "
                                           r"\[3, 4\]"):
        linear(x, w)


def test_integer_bias(backend):
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: bias must be a floating-"
                                           r"point tensor .* got a 1-D int64 tensor of shape \[3\]"):
        linear(torch.randn(2, 4, device=backend.device), torch.randn(3, 4, device=backend.device),
               torch.ones(3, dtype=torch.int64, device=backend.device))


def test_weight_1d():
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: weight must be 2-D "
                                           r"\(out_features, in_features\), got a 1-D float32 "
                                           r"tensor of shape \[4\]"):
        linear(torch.randn(2, 4), torch.randn(4))


def test_grad_output_wrong_dtype():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: grad_output and weight must "
                                           r"have the same dtype, got grad_output float64 and "
                                           r"weight float32"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 3, dtype=torch.float64), x, w, None,
                                            "none", False, [True, True, False])


def test_pre_activation_wrong_shape_and_dtype():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: activation 'silu' needs "
                                           r"pre_activation of shape \[2, 3\], got a 2-D float32 "
                                           r"tensor of shape \[3, 2\]"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 3), x, w, torch.randn(3, 2), "silu",
                                            False, [True, True, False])
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: pre_activation and weight "
                                           r"must have the same dtype, got pre_activation bfloat16 "
                                           r"and weight float32"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 3), x, w,
                                            torch.randn(2, 3, dtype=torch.bfloat16), "relu", False,
                                            [True, True, False])


def test_unknown_activation_in_backward():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward: unknown activation 'RELU'; "
                                           r"expected one of None, 'relu', 'gelu', 'gelu_tanh', "
                                           r"'silu'"):
        torch.ops.chainrule.linear_backward(torch.randn(2, 3), x, w, None, "RELU", False,
                                            [True, True, False])


def test_accumulate_buffer_layout(backend):
    x, w = torch.randn(2, 4, device=backend.device), torch.randn(3, 4, device=backend.device)
    transposed = torch.zeros(4, 3, device=backend.device).t()
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_weight must "
                                           r"be contiguous, got strides \[1, 3\]"):
        torch.ops.chainrule.linear_backward_accumulate(torch.randn(2, 3, device=backend.device), x,
                                                       w, None, "none", True, transposed, None)


def test_accumulate_bias_buffer(backend):
    x, w = torch.randn(2, 4, device=backend.device), torch.randn(3, 4, device=backend.device)
    gw = torch.zeros(3, 4, device=backend.device)
    dy = torch.randn(2, 3, device=backend.device)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_bias must "
                                           r"be 1-D of size out_features \(3\), got a 1-D float32 "
                                           r"tensor of shape \[4\]"):
        torch.ops.chainrule.linear_backward_accumulate(dy, x, w, None, "none", True, gw,
                                                       torch.zeros(4, device=backend.device))
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_bias must "
                                           r"have weight's dtype float32, got a 1-D float16 tensor"):
        torch.ops.chainrule.linear_backward_accumulate(
            dy, x, w, None, "none", True, gw,
            torch.zeros(3, dtype=torch.float16, device=backend.device))
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_bias must "
                                           r"be contiguous, got strides \[2\]"):
        torch.ops.chainrule.linear_backward_accumulate(
            dy, x, w, None, "none", True, gw, torch.zeros(6, device=backend.device)[::2])


def test_accumulate_buffer_on_another_device():
    call = _on_cpu_kernel(torch.ops.chainrule.linear_backward_accumulate.default)
    with pytest.raises(RuntimeError, match=r"chainrule.linear_backward_accumulate: grad_weight must "
                                           r"be on weight's device cpu, got a 2-D float32 tensor "
                                           r"of shape \[3, 4\] on meta"):
        call(torch.randn(2, 3), torch.randn(2, 4), torch.randn(3, 4), None, "none", True,
             torch.zeros(3, 4, device="meta"), None)


def test_module_input_wrong_features():
    layer = chainrule.nn.Linear(4, 3, activation="gelu")
    with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input's last dimension \(5\) "
                                           r"must equal weight's in_features \(4\)"):
        layer(torch.randn(2, 5))


# ---- more bad inputs: the adam_ op ---------------------------------------------------------------

def _adam_call(params, grads=None, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=(),
               steps=None, masters=(), lr=1e-3, amsgrad=False, grad_scale=None, found_inf=None,
               op=None):
    n = len(params)
    grads = grads if grads is not None else [torch.zeros_like(p) for p in params]
    exp_avgs = exp_avgs if exp_avgs is not None else [torch.zeros_like(p, dtype=torch.float32)
                                                      for p in params]
    exp_avg_sqs = exp_avg_sqs if exp_avg_sqs is not None else [
        torch.zeros_like(p, dtype=torch.float32) for p in params]
    steps = steps if steps is not None else [torch.zeros(()) for _ in range(n)]
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(steps), list(masters))
    kwargs = dict(beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=amsgrad,
                  maximize=False, decoupled_weight_decay=False, grad_scale=grad_scale,
                  found_inf=found_inf)
    if op is not None:
        return op(*args, lr=lr, **kwargs)
    chainrule.ops.adam_(*args, lr=lr, **kwargs)


def test_adam_params_on_two_devices():
    """One op call steps one device; the optimizer splits a group that spans devices."""
    op = _on_cpu_kernel(torch.ops.chainrule.adam_.default)
    params = [torch.zeros(3), torch.zeros(2, device="meta")]
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: all params must be on one device, got "
                                           r"params\[1\] on meta and params\[0\] on cpu"):
        _adam_call(params, grads=[torch.zeros(3), torch.zeros(2, device="meta")],
                   exp_avgs=[torch.zeros(3), torch.zeros(2, device="meta")],
                   exp_avg_sqs=[torch.zeros(3), torch.zeros(2, device="meta")],
                   steps=[torch.zeros(()), torch.zeros((), device="meta")], op=op)


def test_adam_integer_param():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: params\[0\] must be a floating-point "
                                           r"tensor .* got a 1-D int32 tensor of shape \[3\]"):
        _adam_call([torch.zeros(3, dtype=torch.int32)], grads=[torch.zeros(3, dtype=torch.int32)])


def test_adam_state_wrong_dtype():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: exp_avg_sqs\[0\] must be float32 for "
                                           r"a bfloat16 param, got a 1-D bfloat16 tensor"):
        _adam_call([torch.zeros(3, dtype=torch.bfloat16)],
                   exp_avg_sqs=[torch.zeros(3, dtype=torch.bfloat16)])


def test_adam_noncontiguous_param():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: params\[0\] must be contiguous, got "
                                           r"strides \[1, 2\]"):
        _adam_call([torch.zeros(3, 2).t()], grads=[torch.zeros(2, 3)],
                   exp_avgs=[torch.zeros(2, 3)], exp_avg_sqs=[torch.zeros(2, 3)])


def test_adam_amsgrad_without_max_exp_avg_sqs():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: max_exp_avg_sqs must have one tensor "
                                           r"per param \(1\), got 0"):
        _adam_call([torch.zeros(3)], amsgrad=True)


def test_adam_step_not_float32_scalar():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: state_steps\[0\] must be a float32 "
                                           r"tensor with one element, got a 0-D int64 tensor"):
        _adam_call([torch.zeros(3)], steps=[torch.zeros((), dtype=torch.int64)])


def test_adam_master_params_for_float32():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: master_params are kept only for "
                                           r"bfloat16/float16 params, got params\[0\] of dtype "
                                           r"float32"):
        _adam_call([torch.zeros(3)], masters=[torch.zeros(3)])


def test_adam_grad_scale_not_scalar():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: grad_scale must be a float32 tensor "
                                           r"with one element, got a 1-D float32 tensor of shape "
                                           r"\[2\]"):
        _adam_call([torch.zeros(3)], grad_scale=torch.ones(2))
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: found_inf must be a float32 tensor "
                                           r"with one element, got a 0-D float64 tensor"):
        _adam_call([torch.zeros(3)], found_inf=torch.zeros((), dtype=torch.float64))


def test_adam_tensor_lr_bad():
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: lr must be a float or a floating-point "
                                           r"tensor with one element, got a 1-D float32 tensor of "
                                           r"shape \[2\]"):
        _adam_call([torch.zeros(3)], lr=torch.ones(2))
    with pytest.raises(RuntimeError, match=r"chainrule.adam_: lr must be a float or a floating-point "
                                           r"tensor with one element, got a 0-D int64 tensor"):
        _adam_call([torch.zeros(3)], lr=torch.tensor(1))


# ---- more bad inputs: chainrule.optim ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), r"chainrule.optim.Adam: invalid learning rate: -0.001"),
    (dict(lr=torch.ones(2)), r"chainrule.optim.Adam: a tensor lr must have one element, got shape "
                             r"\(2,\)"),
    (dict(betas=(1.0, 0.999)), r"chainrule.optim.Adam: invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), r"chainrule.optim.Adam: invalid beta parameter at index 1: -0.1"),
    (dict(betas=(0.9,)), r"chainrule.optim.Adam: betas must be a pair \(beta1, beta2\), got "
                         r"\(0.9,\)"),
    (dict(eps=-1e-8), r"chainrule.optim.Adam: invalid epsilon value: -1e-08"),
    (dict(weight_decay=-0.1), r"chainrule.optim.Adam: invalid weight_decay value: -0.1"),
], ids=["lr", "tensor_lr", "beta1", "beta2", "betas_length", "eps", "weight_decay"])
def test_optimizer_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chainrule.optim.Adam([torch.zeros(3, requires_grad=True)], **kwargs)
    # torch.optim.Adam refuses the same values (its wording without the prefix).
    if "lr" not in kwargs or not isinstance(kwargs["lr"], torch.Tensor):
        with pytest.raises((ValueError, IndexError)):
            torch.optim.Adam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_optimizer_hyperparameters_adamw():
    with pytest.raises(ValueError, match=r"chainrule.optim.AdamW: invalid beta parameter at index 1: "
                                         r"1.0"):
        chainrule.optim.AdamW([torch.zeros(3, requires_grad=True)], betas=(0.9, 1.0))


def test_optimizer_sparse_grad():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.zeros(4, 3).to_sparse()
    opt = chainrule.optim.Adam([p])
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam does not support sparse gradients "
                                           r"\(consider torch.optim.SparseAdam\), got a "
                                           r"torch.sparse_coo grad for param 0 of param group 0"):
        opt.step()


def test_optimizer_complex_param():
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.zeros(3, dtype=torch.complex64)
    opt = chainrule.optim.AdamW([torch.zeros(2, requires_grad=True), p])
    with pytest.raises(RuntimeError, match=r"chainrule.optim.AdamW does not support complex "
                                           r"parameters, got torch.complex64 for param 1 of param "
                                           r"group 0"):
        opt.step()


def _trained(model, opt):
    model(torch.randn(2, model.in_features)).sum().backward()
    opt.step()


def test_optimizer_state_of_another_shape():
    """A state dict saved for a model of another shape loads (torch does not check shapes) and
    the next step names the state key and the parameter."""
    small = chainrule.nn.Linear(4, 3)
    opt_small = chainrule.optim.Adam(small.parameters())
    _trained(small, opt_small)
    large = chainrule.nn.Linear(5, 3)
    opt_large = chainrule.optim.Adam(large.parameters())
    opt_large.load_state_dict(opt_small.state_dict())
    large(torch.randn(2, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam: state\['exp_avg'\] of param 0 of "
                                           r"param group 0 must have the parameter's shape "
                                           r"\(3, 5\), got \(3, 4\)"):
        opt_large.step()


def test_optimizer_state_of_another_dtype():
    p = torch.zeros(3, requires_grad=True)
    opt = chainrule.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["exp_avg_sq"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam: state\['exp_avg_sq'\] of param 0 "
                                           r"of param group 0 must be a floating-point tensor, got "
                                           r"torch.int64"):
        opt.step()


def test_optimizer_state_on_another_device():
    p = torch.zeros(3, requires_grad=True)
    opt = chainrule.optim.Adam([p], amsgrad=True)
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["max_exp_avg_sq"] = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam: state\['max_exp_avg_sq'\] of "
                                           r"param 0 of param group 0 must be on the parameter's "
                                           r"device cpu, got meta"):
        opt.step()


def test_optimizer_state_step_not_scalar():
    p = torch.zeros(3, requires_grad=True)
    opt = chainrule.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step"] = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam: state\['step'\] of param 0 of "
                                           r"param group 0 must be a number or a one-element "
                                           r"tensor, got shape \(2,\)"):
        opt.step()


def test_optimizer_load_state_dict_of_another_group_layout():
    """torch's own check, reached through chainrule's load_state_dict."""
    opt = chainrule.optim.Adam([torch.zeros(3, requires_grad=True)])
    other = chainrule.optim.Adam([torch.zeros(3, requires_grad=True),
                                  torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"loaded state dict contains a parameter group that doesn't "
                                         r"match the size of optimizer's group"):
        opt.load_state_dict(other.state_dict())


def test_optimizer_load_state_dict_with_more_groups():
    """A state dict with more param groups than the optimizer is refused, not cut short."""
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    two_groups = chainrule.optim.Adam([{"params": [p]}, {"params": [q]}])
    opt = chainrule.optim.Adam([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match=r"loaded state dict has a different number of parameter "
                                         r"groups"):
        opt.load_state_dict(two_groups.state_dict())


def test_module_bad_features():
    with pytest.raises(RuntimeError, match=r"Trying to create tensor with negative dimension -1"):
        chainrule.nn.Linear(-1, 3)
