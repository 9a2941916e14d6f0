"""Zero-size dimensions, as F.linear and torch.optim accept them, on every backend and dtype.

in_features = 0: the output is act(bias) broadcast (act(0) without a bias); grad_bias is the row
sum of dY * act'(bias); every other gradient is zeros (or empty) of its argument's shape.
out_features = 0 and an empty batch give empty outputs and zero gradients of the right shapes.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import chainrule
from chainrule.functional import linear
from test_linear import ACTIVATIONS, reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (input shape, out_features): every way for M, K or N to be zero, 1-D and 3-D inputs included.
ZERO_SHAPES = [((2, 0), 3), ((0, 5), 3), ((2, 5), 0), ((0, 0), 3), ((0, 5), 0), ((2, 0), 0),
               ((0, 0), 0), ((0,), 4), ((5,), 0), ((2, 3, 0), 4), ((2, 0, 5), 3), ((0, 2, 5), 3),
               ((3, 2, 5), 0)]


def _leaves(input_shape, out_features, dtype, device, bias):
    g = torch.Generator().manual_seed(7)
    K = input_shape[-1]
    x = torch.randn(input_shape, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(out_features, K, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(out_features, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_size_linear_matches_torch(backend, dtype):
    cases = itertools.product(ZERO_SHAPES, ACTIVATIONS, [True, False], [False, True])
    for (input_shape, out_features), activation, bias, accumulate in cases:
        what = f"input {input_shape}, out_features {out_features}, {activation}, bias={bias}, " \
               f"accumulate={accumulate}"
        ours = _leaves(input_shape, out_features, dtype, backend.device, bias)
        theirs = [t.detach().clone().requires_grad_() if t is not None else None for t in ours]
        exact = [t.detach().double().requires_grad_() if t is not None else None for t in ours]
        # Existing .grad buffers, so the accumulating backward has something to add to.
        for a, b, c in zip(ours[1:], theirs[1:], exact[1:]):
            if a is not None:
                a.grad = torch.randn(a.shape, dtype=torch.float64).to(a)
                b.grad = a.grad.clone()
                c.grad = a.grad.double().clone()
        y = linear(*ours, activation, accumulate_grad=accumulate)
        y_ref = reference(*theirs, activation)
        y_exact = reference(*exact, activation)
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, what
        grad_out = torch.randn(y.shape, dtype=torch.float64).to(y)
        (y * grad_out).sum().backward()
        (y_ref * grad_out).sum().backward()
        (y_exact * grad_out.double()).sum().backward()
        _assert_close_to(y.detach(), y_ref.detach(), y_exact.detach(), what)
        for name, a, b, c in zip(["input", "weight", "bias"], ours, theirs, exact):
            if a is None:
                continue
            assert a.grad.shape == b.grad.shape, f"{what}: grad of {name}"
            _assert_close_to(a.grad, b.grad, c.grad, f"{what}: grad of {name}")


def _assert_close_to(ours, theirs, exact, what):
    """float64/float32: torch's tolerances against torch's result. bfloat16/float16: our error
    against the float64 result at most twice torch's (torch rounds the bias gradient before adding
    it to .grad, the kernels add in float32 and round once)."""
    if ours.dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{what}: {m}")
        return
    assert ours.dtype == theirs.dtype, what
    if ours.numel() == 0:
        return
    floor = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[ours.dtype]
    ours_err = (ours.double() - exact).abs().max().item()
    torch_err = (theirs.double() - exact).abs().max().item()
    assert ours_err <= 2 * torch_err + floor * max(exact.abs().max().item(), 1.0), \
        f"{what}: error {ours_err:.3g}, torch's {torch_err:.3g}"


def test_zero_size_ops_directly(backend):
    """The ops themselves, with every output_mask, outside autograd."""
    device = backend.device
    x = torch.randn(3, 0, device=device)
    w = torch.randn(4, 0, device=device)
    b = torch.randn(4, device=device)
    out, pre = torch.ops.chainrule.linear_forward(x, w, b, "gelu", True)
    torch.testing.assert_close(out, F.gelu(b).expand(3, 4))
    torch.testing.assert_close(pre, b.expand(3, 4))
    dy = torch.randn(3, 4, device=device)
    for mask in itertools.product([False, True], repeat=3):
        gx, gw, gb = torch.ops.chainrule.linear_backward(dy, x, w, pre, "gelu", True, list(mask))
        assert gx.shape == ((3, 0) if mask[0] else (0,))
        assert gw.shape == ((4, 0) if mask[1] else (0,))
        if mask[2]:
            torch.testing.assert_close(gb, torch.ops.aten.gelu_backward(dy, pre).sum(0))
        else:
            assert gb.shape == (0,)
    grad_weight = torch.zeros(4, 0, device=device)
    grad_bias = torch.ones(4, device=device)
    gx = torch.ops.chainrule.linear_backward_accumulate(dy, x, w, pre, "gelu", True, grad_weight,
                                                        grad_bias)
    assert gx.shape == (3, 0)
    torch.testing.assert_close(grad_bias, 1 + torch.ops.aten.gelu_backward(dy, pre).sum(0))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_linear_module_in_features_zero(backend):
    """chainrule.nn.Linear(0, 3)(torch.randn(2, 0)), as torch.nn.Linear does it."""
    torch.manual_seed(0)
    ours = chainrule.nn.Linear(0, 3, activation="relu").to(backend.device)
    torch.nn.init.normal_(ours.bias)
    theirs = torch.nn.Linear(0, 3).to(backend.device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 0, device=backend.device)
    y = ours(x)
    torch.testing.assert_close(y, F.relu(theirs(x)))
    y.sum().backward()
    F.relu(theirs(x)).sum().backward()
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    assert ours.weight.grad.shape == (3, 0)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adam_with_empty_tensors(backend, dtype, kind, amsgrad):
    shapes = [(3,), (0,), (2, 0), (4, 5), (0, 0, 3), (1,)]
    g = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=g, dtype=dtype).to(backend.device).requires_grad_()
            for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = getattr(chainrule.optim, kind)(ours, lr=1e-2, amsgrad=amsgrad, weight_decay=0.1)
    ref = getattr(torch.optim, kind)(theirs, lr=1e-2, amsgrad=amsgrad, weight_decay=0.1,
                                     foreach=False)
    for step in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g, dtype=dtype).to(backend.device)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert float(opt.state[a]["step"]) == 4


def test_adam_only_empty_tensors(backend):
    p = torch.zeros(0, 3, device=backend.device, requires_grad=True)
    p.grad = torch.zeros(0, 3, device=backend.device)
    opt = chainrule.optim.Adam([p])
    opt.step()
    assert p.shape == (0, 3) and float(opt.state[p]["step"]) == 1
