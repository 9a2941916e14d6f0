"""The fused linear layer as a torch.autograd.Function and a functional API.

    y = activation(input @ weight.T + bias)

Forward runs one op (chainrule.linear_forward) that fuses bias and activation into the GEMM's
epilogue and, when a backward will follow and the activation needs it, keeps the pre-activation
Z = input @ weight.T + bias: one extra (..., out_features) tensor in the input's dtype, traded for
not recomputing a GEMM in backward. Backward runs one op that applies act'(Z), reduces the bias
gradient and runs both gradient GEMMs.

accumulate_grad=True: when weight.grad already holds a gradient (the second and later micro-batches
of gradient accumulation), backward adds dW and db into that .grad in the kernel, clears .grad and
hands the same tensor to autograd as the gradient, which AccumulateGrad installs back without a
copy (torch steals a gradient nobody else references). No temporary dW is allocated, and every hook
still runs: post-accumulate-grad hooks, DDP's reducer and FSDP2's post-backward see .grad as they
would with torch.nn.Linear. When .grad is None the fresh dW is returned the ordinary way (autograd
installs it without a copy either). A parameter with tensor hooks (register_hook) gets the ordinary
path, so its hooks receive this backward's gradient alone, as in torch. accumulate_grad applies to
loss.backward() on leaf parameters; the gradient is returned in the ordinary way when the backward
is torch.autograd.grad(...) (the engine cannot accumulate there), under create_graph=True, for
non-leaf weights, and under torch.compile. When backward(inputs=...) leaves the weight out, its
gradient is not computed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _C, ops

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def activation_op_name(activation: Optional[str], op: str = "chainrule.functional.linear") -> str:
    """The activation as the ops spell it ("none" for None); raises ValueError for unknown ones."""
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of None, 'relu', 'gelu', "
            f"'gelu_tanh', 'silu'")
    return activation


def _native_activation(z: Tensor, activation: str) -> Tensor:
    """The activation built from native differentiable ops: the double-backward path."""
    if activation == "none":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def _will_accumulate(node) -> Optional[bool]:
    """Whether the current backward will run this AccumulateGrad node: True for loss.backward(),
    False when backward(inputs=...) leaves it out, None under torch.autograd.grad()."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return None


class LinearFunction(torch.autograd.Function):
    """autograd.Function of the fused linear layer. Arguments of apply():
    (input, weight, bias, activation: str ("none", "relu", ...), accumulate_grad: bool,
    save_pre_activation: bool). Returns (output, pre_activation); use chainrule.functional.linear
    unless you need this layer."""

    @staticmethod
    def forward(ctx, input, weight, bias, activation, accumulate_grad, save_pre_activation):
        # forward(ctx, ...) rather than forward + setup_context: with setup_context,
        # Function.apply binds the arguments through inspect.signature on every call, which
        # costs more than a small layer's whole forward.
        output, pre_activation = ops.linear_forward(input, weight, bias, activation,
                                                    save_pre_activation)
        ctx.mark_non_differentiable(pre_activation)
        # pre_activation never receives a gradient: without this, autograd would fill a zero
        # tensor of the output's size for it on every backward (a full pass over memory).
        ctx.set_materialize_grads(False)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, bias, pre_activation)
        ctx.accumulate_nodes = None
        if accumulate_grad:
            ctx.accumulate_nodes = tuple(
                torch.autograd.graph.get_gradient_edge(p).node
                if p is not None and p.requires_grad and p.is_leaf else None
                for p in (weight, bias))
        return output, pre_activation

    @staticmethod
    def backward(ctx, grad_output, grad_pre_activation):
        if grad_output is None:  # not materialized (set_materialize_grads(False)): no gradient
            return None, None, None, None, None, None
        input, weight, bias, pre_activation = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        activation = ctx.activation
        if torch.is_grad_enabled():
            return LinearFunction._differentiable_backward(ctx, grad_output)
        pre = pre_activation if activation != "none" else None

        if ctx.accumulate_nodes is not None and ctx.accumulate_nodes[0] is not None:
            accumulate_weight = _will_accumulate(ctx.accumulate_nodes[0])
            accumulate_bias = _will_accumulate(ctx.accumulate_nodes[1]) \
                if ctx.accumulate_nodes[1] is not None else False
            if accumulate_weight is not None and accumulate_bias is not None:
                return LinearFunction._accumulating_backward(
                    ctx, grad_output, input, weight, bias, pre, accumulate_weight,
                    accumulate_bias, needs_bias)

        grad_input, grad_weight, grad_bias = ops.linear_backward(
            grad_output, input, weight, pre, activation, ctx.has_bias,
            (needs_input, needs_weight, needs_bias))
        return (grad_input if needs_input else None, grad_weight if needs_weight else None,
                grad_bias if (needs_bias and ctx.has_bias) else None, None, None, None)

    @staticmethod
    def _accumulating_backward(ctx, grad_output, input, weight, bias, pre, accumulate_weight,
                               accumulate_bias, needs_bias):
        needs_input = ctx.needs_input_grad[0]
        if not accumulate_weight:
            # backward(inputs=...) without the weight: dW is not wanted at all.
            grad_input, _, grad_bias = ops.linear_backward(
                grad_output, input, weight, pre, ctx.activation, ctx.has_bias,
                (needs_input, False, needs_bias and not accumulate_bias))
            return (grad_input if needs_input else None, None,
                    grad_bias if (needs_bias and not accumulate_bias and ctx.has_bias) else None,
                    None, None, None)
        # .grad goes on the leaf that the engine's AccumulateGrad node holds: under
        # saved_tensors_hooks (save_on_cpu, offloading) the saved weight is another tensor object.
        weight = ctx.accumulate_nodes[0].variable
        if accumulate_bias:
            bias = ctx.accumulate_nodes[1].variable
        grad_weight_buffer = _accumulation_buffer(weight)
        if grad_weight_buffer is None:
            # Nothing to add into: the fresh dW goes to autograd, which installs it as .grad.
            grad_input, grad_weight, grad_bias = ops.linear_backward(
                grad_output, input, weight, pre, ctx.activation, ctx.has_bias,
                (needs_input, True, needs_bias))
            return (grad_input if needs_input else None, grad_weight,
                    grad_bias if (needs_bias and ctx.has_bias) else None, None, None, None)
        grad_bias_buffer = None
        bias_grad_is_buffer = False
        if accumulate_bias:
            grad_bias_buffer = _accumulation_buffer(bias)
            bias_grad_is_buffer = grad_bias_buffer is not None
            if grad_bias_buffer is None:  # a bias-sized zero buffer costs nothing next to dW
                grad_bias_buffer = torch.zeros_like(bias, memory_format=torch.contiguous_format)
        grad_input = ops.linear_backward_accumulate(
            grad_output, input, weight, pre, ctx.activation, needs_input, grad_weight_buffer,
            grad_bias_buffer)
        # Hand the accumulated tensors to autograd with .grad cleared: AccumulateGrad installs
        # them back without a copy and runs the hooks (quack's fuse_grad_accum does the same).
        weight.grad = None
        grad_bias = None
        if accumulate_bias:
            if bias_grad_is_buffer:
                bias.grad = None
            grad_bias = grad_bias_buffer
        elif needs_bias and ctx.has_bias:
            # The bias is not a leaf being accumulated into: hand autograd its gradient.
            _, _, grad_bias = ops.linear_backward(grad_output, input, weight, pre, ctx.activation,
                                                  True, (False, False, True))
        return (grad_input if needs_input else None, grad_weight_buffer, grad_bias,
                None, None, None)

    @staticmethod
    def _differentiable_backward(ctx, grad_output):
        """create_graph=True: the same gradients, built from native differentiable ops so that
        they can be differentiated again (double backward, gradgradcheck)."""
        input, weight, bias, _ = ctx.saved_tensors
        wanted = [t for t, need in zip((input, weight, bias), ctx.needs_input_grad[:3])
                  if need and t is not None]
        with torch.enable_grad():
            z = F.linear(input, weight, bias)
            y = _native_activation(z, ctx.activation)
            grads = torch.autograd.grad(y, wanted, grad_output, create_graph=True,
                                        allow_unused=True)
        out = []
        it = iter(grads)
        for t, need in zip((input, weight, bias), ctx.needs_input_grad[:3]):
            out.append(next(it) if (need and t is not None) else None)
        return (*out, None, None, None)


def _accumulation_buffer(parameter: Tensor) -> Optional[Tensor]:
    """parameter.grad when backward can add into it in place and hand it to autograd: it exists,
    has the kernel's layout, and no tensor hook is waiting for this backward's gradient alone."""
    grad = parameter.grad
    if grad is None or getattr(parameter, "_backward_hooks", None):
        return None
    if type(grad) is not Tensor or grad.layout != torch.strided:
        return None  # a tensor subclass (DTensor) or a sparse .grad is left to autograd
    if grad.dtype != parameter.dtype or grad.shape != parameter.shape or \
            grad.device != parameter.device or not grad.is_contiguous():
        return None
    return grad


# The floating dtypes chainrule's ops take, by the names its C++ hooks use.
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}
# The first step of every call, in C++ (csrc/cpu/python_hooks.cpp): a valid CPU layer of plain
# tensors (not subclasses such as DTensor) that torch's own F.linear + activation runs at least as
# fast as chainrule's ops (a tiny layer, or one that chainrule would give to ATen's GEMM anyway:
# csrc/cpu/gemm_path.cpp's prefers_torch_ops) comes back computed by those very ops; one of the
# others that needs no gradient comes back from chainrule.linear_forward's CPU kernel, called
# behind the op's checks without the dispatcher (calls_forward_kernel; not while a
# TorchDispatchMode is active); anything else (autocast, a TorchFunctionMode, an unknown
# activation, invalid inputs, whose checks name what is wrong) comes back None and goes on below.
# The same questions asked in Python cost ~2 µs a call.
_first_step = _C._linear_first_step


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None, *, accumulate_grad: bool = False) -> Tensor:
    """activation(input @ weight.T + bias), with the bias and activation fused into the GEMM.

    input (..., in_features), weight (out_features, in_features), bias (out_features) or None;
    activation one of None, "relu", "gelu" (exact erf), "gelu_tanh", "silu". With
    accumulate_grad=True, backward adds the weight and bias gradients into an existing .grad in
    place (see the module docstring).

    On the CPU, a layer that chainrule cannot run faster than torch runs as torch's own F.linear
    + activation: one of at most 2^21 multiply-adds (the call overhead would exceed the work), or
    one the GEMM rule gives to ATen's GEMM in both passes without accumulate_grad (ATen's path
    would run the same ops); CHAINRULE_CPU_GEMM=ours|aten turns this off. A call that needs no
    gradient runs the op without an autograd.Function (on the CPU, in auto mode, its kernel
    without the dispatcher).
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        output = _first_step(input, weight, bias, activation, accumulate_grad)
        if output is not None:
            return output
    act = activation_op_name(activation)
    if torch._C._is_any_autocast_enabled() and isinstance(input, Tensor) and \
            torch.is_autocast_enabled(input.device.type):
        # What autocast does for F.linear: compute in the autocast dtype. The op itself then runs
        # with autocast off, so nothing inside it is cast again.
        device_type = input.device.type
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return linear(input, weight, bias, activation, accumulate_grad=accumulate_grad)
    if accumulate_grad and compiling:
        accumulate_grad = False  # compiled backward graphs return gradients the ordinary way
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if not needs_grad:
        return ops.linear_forward(input, weight, bias, act, False)[0]
    save_pre_activation = act != "none"
    output, _ = LinearFunction.apply(input, weight, bias, act, accumulate_grad,
                                     save_pre_activation)
    return output
