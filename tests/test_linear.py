"""The fused linear layer against PyTorch's own ops, on every backend."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import chainrule
from chainrule.functional import linear

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def reference(x, w, b, activation):
    """F.linear followed by the activation, as a user of torch.nn would write it."""
    z = F.linear(x, w, b)
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    return z


def make_inputs(input_shape, out_features, dtype, device, bias=True, requires_grad=True):
    in_features = input_shape[-1]
    x = torch.randn(input_shape, dtype=dtype, device=device)
    w = torch.randn(out_features, in_features, dtype=dtype, device=device) / max(in_features, 1) ** 0.5
    b = torch.randn(out_features, dtype=dtype, device=device) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


# ---- gradcheck / gradgradcheck in float64 (issue 2, acceptance 1) ------------------------------

GRADCHECK_INPUT_SHAPES = [(3,), (0, 5), (2, 3, 5), (7, 1), (4, 9)]


@pytest.mark.parametrize("out_features", [1, 6])
@pytest.mark.parametrize("input_shape", GRADCHECK_INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("accumulate_grad", [False, True], ids=["plain", "accumulate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_gradcheck(backend, activation, bias, accumulate_grad, input_shape, out_features):
    x, w, b = make_inputs(input_shape, out_features, torch.float64, backend.device, bias)
    # Keep relu's kink away from the finite-difference step.
    if activation == "relu":
        with torch.no_grad():
            z = F.linear(x, w, b)
            if b is not None and z.numel():
                b += torch.where(z.abs().amin(dim=tuple(range(z.dim() - 1))) < 1e-3, 0.1, 0.0)
    inputs = (x, w) if b is None else (x, w, b)

    def fn(*args):
        return linear(*args[:2], args[2] if len(args) > 2 else None, activation,
                      accumulate_grad=accumulate_grad)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# ---- agreement with F.linear + activation (issue 2, acceptance 2) -------------------------------

# (M, K, N): every size of the kernels' edge list appears; primes, 1, tile multiples and one past.
SHAPES = [(1, 1, 1), (17, 8, 7), (128, 40, 64), (130, 129, 200), (17, 129, 1), (130, 1, 64),
          (1, 40, 200), (128, 8, 7)]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_matches_torch_float32(backend, activation, bias, shape):
    M, K, N = shape
    x, w, b = make_inputs((M, K), N, torch.float32, backend.device, bias)
    grad_out = torch.randn(M, N, device=backend.device)
    ours = linear(x, w, b, activation)
    theirs = reference(x, w, b, activation)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b), grad_out), _grads(theirs, (x, w, b), grad_out)):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-4)


def _max_error(value, ref):
    return (value.double() - ref).abs().max().item() if value.numel() else 0.0


@pytest.mark.parametrize("shape", [(17, 129, 7), (128, 40, 64), (130, 8, 200)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_within_twice_torch(backend, dtype, activation, shape):
    """Output and every gradient: our error against a float64 reference is at most twice the
    error PyTorch's own ops make against the same reference (plus one ulp-sized floor)."""
    M, K, N = shape
    x, w, b = make_inputs((M, K), N, dtype, backend.device)
    grad_out = torch.randn(M, N, dtype=dtype, device=backend.device)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))

    ref_out = reference(x64, w64, b64, activation)
    ref_grads = _grads(ref_out, (x64, w64, b64), grad_out.double())
    ours = linear(x, w, b, activation)
    ours_grads = _grads(ours, (x, w, b), grad_out)
    theirs = reference(x, w, b, activation)
    theirs_grads = _grads(theirs, (x, w, b), grad_out)

    floor = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for name, o, t, r in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                             [ours, *ours_grads], [theirs, *theirs_grads],
                             [ref_out.detach(), *ref_grads]):
        scale = max(r.abs().max().item(), 1.0)
        ours_err, torch_err = _max_error(o, r), _max_error(t, r)
        assert o.dtype == dtype
        assert ours_err <= 2 * torch_err + floor * scale, \
            f"{name}: chainrule error {ours_err:.3g} vs torch error {torch_err:.3g}"


# ---- shapes and layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("input_shape", [(5,), (0, 5), (2, 3, 5), (2, 0, 5), (4, 1, 3, 5)], ids=str)
def test_shapes_match_torch(backend, input_shape):
    x, w, b = make_inputs(input_shape, 6, torch.float64, backend.device)
    ours = linear(x, w, b, "silu")
    theirs = reference(x, w, b, "silu")
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    grad_out = torch.randn_like(theirs)
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b), grad_out), _grads(theirs, (x, w, b), grad_out)):
        torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("layout", ["transposed_input", "strided_input", "transposed_weight",
                                    "strided_grad_output"])
def test_non_contiguous(backend, layout):
    device = backend.device
    x = torch.randn(9, 13, dtype=torch.float64, device=device)
    w = torch.randn(7, 9, dtype=torch.float64, device=device)[:, :9]
    b = torch.randn(7, dtype=torch.float64, device=device)
    if layout == "transposed_input":
        x = torch.randn(13, 9, dtype=torch.float64, device=device).t()
    elif layout == "strided_input":
        x = torch.randn(9, 26, dtype=torch.float64, device=device)[:, ::2]
    else:
        x = torch.randn(9, 13, dtype=torch.float64, device=device)
    if layout == "transposed_weight":
        w = torch.randn(13, 7, dtype=torch.float64, device=device).t()
    else:
        w = torch.randn(7, 13, dtype=torch.float64, device=device)
    assert layout == "strided_grad_output" or not (x.is_contiguous() and w.is_contiguous())
    for t in (x, w, b):
        t.requires_grad_()
    ours = linear(x, w, b, "gelu")
    theirs = reference(x, w, b, "gelu")
    torch.testing.assert_close(ours, theirs)
    grad_out = torch.randn(9, 14, dtype=torch.float64, device=device)[:, ::2]
    assert not grad_out.is_contiguous()
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b), grad_out), _grads(theirs, (x, w, b), grad_out)):
        torch.testing.assert_close(g_ours, g_theirs)


def test_module_matches_nn_linear(backend):
    torch.manual_seed(3)
    ours = chainrule.nn.Linear(10, 4, activation="gelu_tanh", device=backend.device,
                               dtype=torch.float64)
    torch.manual_seed(3)
    theirs = torch.nn.Linear(10, 4, device=backend.device, dtype=torch.float64)
    # Same initialisation and state_dict keys as torch.nn.Linear.
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key in theirs.state_dict():
        torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], rtol=0, atol=0)
    x = torch.randn(3, 10, dtype=torch.float64, device=backend.device)
    torch.testing.assert_close(ours(x), F.gelu(theirs(x), approximate="tanh"))
    assert "activation='gelu_tanh'" in repr(ours)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


# ---- accumulate_grad (issue 2, acceptance 3) ----------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_accumulate_grad_matches_nn_linear(backend, activation, bias):
    """Three backward passes into a pre-filled .grad give native nn.Linear's .grad."""
    torch.manual_seed(5)
    ours = chainrule.nn.Linear(6, 5, bias=bias, activation=activation, accumulate_grad=True,
                               device=backend.device, dtype=torch.float64)
    theirs = torch.nn.Linear(6, 5, bias=bias, device=backend.device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    for module in (ours, theirs):
        for p in module.parameters():
            p.grad = torch.full_like(p, 0.25)
    for step in range(3):
        x = torch.randn(4, 3, 6, dtype=torch.float64, device=backend.device)
        ours(x).pow(2).sum().backward()
        reference(x, theirs.weight, theirs.bias, activation).pow(2).sum().backward()
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=0, atol=1e-12)


def test_accumulate_grad_first_backward_installs_a_fresh_grad(backend):
    layer = chainrule.nn.Linear(4, 3, activation="relu", accumulate_grad=True,
                                device=backend.device, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, device=backend.device, requires_grad=True)
    out = layer(x)
    assert layer.weight.grad is None
    out.sum().backward()
    expected = torch.autograd.grad(reference(x, layer.weight, layer.bias, "relu").sum(),
                                   [x, layer.weight, layer.bias])
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(layer.weight.grad, expected[1])
    torch.testing.assert_close(layer.bias.grad, expected[2])


def test_accumulate_grad_backward_inputs_excludes_weight(backend):
    layer = chainrule.nn.Linear(4, 3, accumulate_grad=True, device=backend.device,
                                dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, device=backend.device, requires_grad=True)
    layer(x).sum().backward(inputs=[x])
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(5, 4))


def _pair(device, bias=True, activation="gelu", size=(4, 3)):
    """chainrule.nn.Linear(accumulate_grad=True) and an nn.Linear with the same parameters, both
    with a pre-filled .grad (the second micro-batch of gradient accumulation)."""
    torch.manual_seed(11)
    ours = chainrule.nn.Linear(*size, bias=bias, activation=activation, accumulate_grad=True,
                               device=device, dtype=torch.float64)
    theirs = torch.nn.Linear(*size, bias=bias, device=device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    for module in (ours, theirs):
        for p in module.parameters():
            p.grad = torch.full_like(p, 0.5)
    return ours, theirs


def test_accumulate_grad_hands_the_same_grad_back_to_autograd(backend):
    """The accumulated .grad goes through AccumulateGrad without a copy: its storage is kept, and
    a post-accumulate-grad hook runs once per backward and sees the accumulated gradient."""
    ours, theirs = _pair(backend.device)
    pointers = [p.grad.data_ptr() for p in ours.parameters()]
    seen = {"ours": {}, "theirs": {}}
    for name, module in (("ours", ours), ("theirs", theirs)):
        for key, p in module.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name, key=key: seen[name].setdefault(key, []).append(p.grad.clone()))
    for step in range(2):
        x = torch.randn(5, 4, dtype=torch.float64, device=backend.device, requires_grad=True)
        ours(x).pow(2).sum().backward()
        x_ref = x.detach().requires_grad_()
        reference(x_ref, theirs.weight, theirs.bias, "gelu").pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert [p.grad.data_ptr() for p in ours.parameters()] == pointers
    for key in ("weight", "bias"):
        assert len(seen["ours"][key]) == len(seen["theirs"][key]) == 2
        for a, b in zip(seen["ours"][key], seen["theirs"][key]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_accumulate_grad_adds_in_the_kernel_without_a_temporary(backend_one_order):
    """Into an existing .grad: one accumulating op, and no dW-sized add or copy afterwards (torch's
    AccumulateGrad adds a temporary dW into .grad; ours installs the accumulated tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, out))
                      if isinstance(t, torch.Tensor)]
            self.calls.append((str(func.overloadpacket), shapes))
            return out

    device = backend_one_order.device
    ours, theirs = _pair(device, size=(6, 5))
    x = torch.randn(7, 6, dtype=torch.float64, device=device)
    calls = {}
    for name, loss in (("ours", ours(x).sum()),
                       ("theirs", reference(x, theirs.weight, theirs.bias, "gelu").sum())):
        with Record() as record:
            loss.backward()
        calls[name] = record.calls
    weight_sized = lambda calls: [f for f, shapes in calls  # noqa: E731
                                  if (5, 6) in shapes and f.split(".")[-1] in
                                  ("add", "add_", "clone", "copy_", "_to_copy", "mm", "t")]
    assert weight_sized(calls["theirs"]), calls["theirs"]  # the test sees torch's temporary
    assert not weight_sized(calls["ours"]), calls["ours"]
    assert [f for f, _ in calls["ours"]].count("chainrule.linear_backward_accumulate") == 1
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_backward_fills_no_gradient_for_the_pre_activation(backend_one_order, activation):
    """The pre-activation output never receives a gradient: backward runs the one backward op and
    writes no output-sized zeros for it (autograd materializes them unless told not to)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views (expand, detach) move no memory
                self.calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    device = backend_one_order.device
    layer = chainrule.nn.Linear(6, 5, activation=None if activation == "none" else activation,
                                device=device, dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64, device=device, requires_grad=True)
    loss = layer(x).sum()
    with Record() as record:
        loss.backward()
    assert record.calls == ["aten.ones_like", "chainrule.linear_backward"], record.calls


@pytest.mark.parametrize("accumulate_grad", [False, True])
def test_output_without_a_gradient_leaves_grad_as_nn_linear_does(backend_one_order,
                                                                  accumulate_grad):
    """An output whose gradient is undefined (a Function returning None for it) gives no .grad,
    as with nn.Linear, instead of a backward on missing gradients."""

    class Blocks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    device = backend_one_order.device
    ours = chainrule.nn.Linear(6, 5, activation="gelu", accumulate_grad=accumulate_grad,
                               device=device, dtype=torch.float64)
    theirs = torch.nn.Linear(6, 5, device=device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 6, dtype=torch.float64, device=device, requires_grad=True)
    for y in (ours(x), F.gelu(theirs(x))):
        (Blocks.apply(y).sum() + x.sum()).backward()
    assert ours.weight.grad is None and theirs.weight.grad is None
    assert ours.bias.grad is None and theirs.bias.grad is None
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_accumulate_grad_tensor_hooks_see_this_backward_s_gradient(backend_one_order):
    """A tensor hook (register_hook) receives the gradient of this backward alone and may replace
    it, as with nn.Linear; the result is added into the existing .grad."""
    device = backend_one_order.device
    ours, theirs = _pair(device)
    seen = {"ours": [], "theirs": []}
    for name, module in (("ours", ours), ("theirs", theirs)):
        module.weight.register_hook(lambda g, name=name: seen[name].append(g.clone()) or 2 * g)
    for step in range(2):
        x = torch.randn(5, 4, dtype=torch.float64, device=device)
        ours(x).pow(2).sum().backward()
        reference(x, theirs.weight, theirs.bias, "gelu").pow(2).sum().backward()
    assert len(seen["ours"]) == len(seen["theirs"]) == 2
    for a, b in zip(seen["ours"], seen["theirs"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=0, atol=1e-12)


def test_accumulate_grad_weight_used_twice(backend_one_order):
    """One layer applied twice: the engine sums both uses before AccumulateGrad."""
    device = backend_one_order.device
    ours, theirs = _pair(device, size=(4, 4), activation="silu")
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    ours(ours(x)).sum().backward()
    reference(reference(x, theirs.weight, theirs.bias, "silu"), theirs.weight, theirs.bias,
              "silu").sum().backward()
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=0, atol=1e-12)


def test_accumulate_grad_optimizer_in_backward(backend_one_order):
    """torch's optimizer-in-backward pattern: a post-accumulate-grad hook steps each parameter and
    clears its .grad; the same parameters as with nn.Linear and torch.optim.AdamW."""
    device = backend_one_order.device
    ours, theirs = _pair(device)
    for module, adamw in ((ours, chainrule.optim.AdamW), (theirs, torch.optim.AdamW)):
        optimizers = {p: adamw([p], lr=1e-2) for p in module.parameters()}

        def step(p, optimizers=optimizers):
            optimizers[p].step()
            optimizers[p].zero_grad()
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(step)
    for _ in range(3):
        x = torch.randn(5, 4, dtype=torch.float64, device=device)
        ours(x).pow(2).sum().backward()
        reference(x, theirs.weight, theirs.bias, "gelu").pow(2).sum().backward()
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        assert p_ours.grad is None
        torch.testing.assert_close(p_ours, p_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hooks", ["saved_tensors_hooks", "save_on_cpu"])
def test_accumulate_grad_under_saved_tensors_hooks(hooks):
    # The saved weight is unpacked as another tensor object: .grad must still reach the parameter.
    layer = chainrule.nn.Linear(4, 3, activation="gelu", accumulate_grad=True)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 4)
    context = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
               if hooks == "saved_tensors_hooks" else torch.autograd.graph.save_on_cpu())
    for _ in range(2):
        with context:
            y = layer(x)
        y.sum().backward()
        torch.nn.functional.gelu(reference(x)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_create_graph_double_backward(backend):
    x, w, b = make_inputs((3, 4), 2, torch.float64, backend.device)
    y = linear(x, w, b, "silu")
    (gx,) = torch.autograd.grad(y.sum(), [x], create_graph=True)
    (ggw,) = torch.autograd.grad(gx.pow(2).sum(), [w])
    y_ref = reference(x, w, b, "silu")
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), [x], create_graph=True)
    (ggw_ref,) = torch.autograd.grad(gx_ref.pow(2).sum(), [w])
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(ggw, ggw_ref)


def test_no_grad_forward_keeps_no_pre_activation(backend):
    x, w, b = make_inputs((3, 4), 2, torch.float32, backend.device, requires_grad=False)
    out, pre = chainrule.ops.linear_forward(x, w, b, "gelu", False)
    assert pre.shape == (0,)
    out2, pre2 = chainrule.ops.linear_forward(x, w, b, "gelu", True)
    torch.testing.assert_close(pre2, F.linear(x, w, b))
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


def test_autocast_behaves_like_nn_linear():
    torch.manual_seed(0)
    ours = chainrule.nn.Linear(8, 4)
    theirs = torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)
    y_ours.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32
