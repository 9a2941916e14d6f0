"""NaN and +-inf flow through chainrule as through torch, on every backend.

Linear: a NaN, +inf or -inf placed in the input, the weight, the bias or grad_output gives NaN,
+inf and -inf at exactly the positions where F.linear + the activation puts them, in the output and
in every gradient, for every activation. The reference is torch in float64: in float32 torch's own
vectorised GELU returns NaN for +inf where its scalar path (and float64) return +inf, so the float32
torch result depends on where in a vector the value lands (docs/reliability.md). Finite values
are kept small so that nothing overflows in either precision; then the non-finite pattern of a sum
does not depend on the order of its terms.

Adam: with non-finite gradients and no GradScaler, chainrule.optim.Adam/AdamW leave the same
NaN/inf pattern in params and states as torch.optim.Adam/AdamW, step after step.
"""
from __future__ import annotations

import pytest
import torch

import chainrule
from chainrule.functional import linear

from test_linear import reference

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INF = float("inf")
NAN = float("nan")
# (M, K, N): a shape below one micro-tile, and one with full tiles and tails on every side.
SHAPES = [(5, 7, 3), (37, 45, 35)]
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def _poison(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A copy of t with a NaN, a +inf and a -inf at seeded positions (distinct rows where it can)."""
    g = torch.Generator().manual_seed(seed)
    flat = t.detach().clone().reshape(-1)
    positions = torch.randperm(flat.numel(), generator=g)[:3]
    for position, value in zip(positions.tolist(), (NAN, INF, -INF)):
        flat[position] = value
    return flat.reshape(t.shape)


def _nonfinite_masks(t):
    return [test(t) for test in (torch.isnan, torch.isposinf, torch.isneginf)]


def _assert_same_nonfinite(name, actual, expected, dtype, torch_same_dtype=None):
    """Same NaN / +inf / -inf positions as torch in float64; the finite values close (low
    precision: loosely). torch_same_dtype: torch's own result in the tested dtype. Where the
    positions differ from float64's but are exactly torch's own in that dtype, they are accepted:
    chainrule's ATen path (csrc/cpu/linear.cpp) runs torch's own GEMM and activations, and those
    differ from float64 at some non-finite inputs (oneDNN's bf16 GEMM on AMX CPUs turns an inf in
    one row into NaN in a neighbouring row; torch's vectorised float32 GELU gives NaN at +inf):
    docs/reliability.md."""
    actual = actual.double().cpu()
    expected = expected.cpu()
    masks = _nonfinite_masks(actual)
    if torch_same_dtype is not None and not all(
            torch.equal(a, b) for a, b in zip(masks, _nonfinite_masks(expected))):
        same = _nonfinite_masks(torch_same_dtype.double().cpu())
        if all(torch.equal(a, b) for a, b in zip(masks, same)):
            expected = torch.where(torch.isfinite(expected), expected, actual)
            expected = torch.where(torch.isfinite(actual), expected, actual)
    for what, got, want in zip(("NaN", "+inf", "-inf"), masks, _nonfinite_masks(expected)):
        assert torch.equal(got, want), (
            f"{name}: {what} at {got.nonzero().tolist()}, torch has it at {want.nonzero().tolist()}")
    finite = torch.isfinite(expected)
    tol = TOLERANCES[dtype]
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: finite values differ\n{m}")


def _case(shape, dtype, device, where, seed):
    m, k, n = shape
    g = torch.Generator().manual_seed(seed)
    # Small values: no finite overflow in any dtype, so only the injected values are non-finite.
    x = (torch.rand(m, k, generator=g) * 2 - 1)
    w = (torch.rand(n, k, generator=g) * 2 - 1) / k ** 0.5
    b = torch.rand(n, generator=g) * 2 - 1
    grad_output = torch.rand(m, n, generator=g) * 2 - 1
    tensors = dict(input=x, weight=w, bias=b, grad_output=grad_output)
    tensors[where] = _poison(tensors[where], seed + 1)
    return {name: t.to(dtype).to(device) for name, t in tensors.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("where", ["input", "weight", "bias", "grad_output"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_linear_nonfinite_positions(backend, activation, dtype, where, shape):
    t = _case(shape, dtype, backend.device, where,
              seed=10 * ["input", "weight", "bias", "grad_output"].index(where) + SHAPES.index(shape))
    x, w, b = (t[k].clone().requires_grad_() for k in ("input", "weight", "bias"))
    out = linear(x, w, b, activation)
    grads = torch.autograd.grad(out, (x, w, b), t["grad_output"])

    x64, w64, b64 = (t[k].double().cpu().requires_grad_() for k in ("input", "weight", "bias"))
    ref = reference(x64, w64, b64, activation)
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), t["grad_output"].double().cpu())

    xs, ws, bs = (t[k].clone().requires_grad_() for k in ("input", "weight", "bias"))
    same = reference(xs, ws, bs, activation)
    same_grads = torch.autograd.grad(same, (xs, ws, bs), t["grad_output"])

    _assert_same_nonfinite("output", out, ref.detach(), dtype, same.detach())
    for name, got, want, alike in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                      ref_grads, same_grads):
        _assert_same_nonfinite(name, got, want, dtype, alike)


@pytest.mark.parametrize("where", ["input", "grad_output"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_linear_nonfinite_accumulate(backend, activation, where):
    """The accumulate variant adds non-finite gradients into .grad as autograd would."""
    t = _case((37, 45, 35), torch.float32, backend.device, where, seed=7)
    w = t["weight"].clone().requires_grad_()
    b = t["bias"].clone().requires_grad_()
    w.grad = torch.full_like(w, 0.25)
    b.grad = torch.full_like(b, -0.5)
    linear(t["input"], w, b, activation, accumulate_grad=True).backward(t["grad_output"])

    w64, b64 = (t[k].double().cpu().requires_grad_() for k in ("weight", "bias"))
    ref = reference(t["input"].double().cpu(), w64, b64, activation)
    ref_w, ref_b = torch.autograd.grad(ref, (w64, b64), t["grad_output"].double().cpu())
    _assert_same_nonfinite("weight.grad", w.grad, ref_w + 0.25, torch.float32)
    _assert_same_nonfinite("bias.grad", b.grad, ref_b - 0.5, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activation_of_nonfinite_pre_activation(backend, activation):
    """Each activation and its gradient at NaN, +-inf, +-0 and a few finite values, element by
    element (the bias carries the values, weight and input are zero)."""
    values = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 3.0, -3.0, 1.0, -1.0])
    n = values.numel()
    for grad_value in (1.0, INF, NAN):
        x = torch.zeros(2, 3, device=backend.device, requires_grad=True)
        w = torch.zeros(n, 3, device=backend.device, requires_grad=True)
        b = values.clone().to(backend.device).requires_grad_()
        grad_output = torch.full((2, n), grad_value, device=backend.device)
        out = linear(x, w, b, activation)
        grads = torch.autograd.grad(out, (x, w, b), grad_output)

        x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
        ref = reference(x64, w64, b64, activation)
        ref_grads = torch.autograd.grad(ref, (x64, w64, b64), grad_output.double().cpu())
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        same = reference(xs, ws, bs, activation)
        same_grads = torch.autograd.grad(same, (xs, ws, bs), grad_output)
        _assert_same_nonfinite(f"output (grad_output={grad_value})", out, ref.detach(),
                               torch.float32, same.detach())
        for name, got, want, alike in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                          ref_grads, same_grads):
            _assert_same_nonfinite(f"{name} (grad_output={grad_value})", got, want,
                                   torch.float32, alike)


# ---- Adam / AdamW -------------------------------------------------------------------------------

ADAM_CONFIGS = {
    "adam": (torch.optim.Adam, chainrule.optim.Adam, {}),
    "adam_weight_decay": (torch.optim.Adam, chainrule.optim.Adam, dict(weight_decay=0.1)),
    "adam_amsgrad_maximize": (torch.optim.Adam, chainrule.optim.Adam,
                              dict(amsgrad=True, maximize=True)),
    "adamw": (torch.optim.AdamW, chainrule.optim.AdamW, dict(weight_decay=0.05)),
    "adamw_amsgrad": (torch.optim.AdamW, chainrule.optim.AdamW, dict(amsgrad=True)),
}


def _nonfinite_grads(params, step):
    """Finite gradients with a NaN, +inf and -inf at a few positions, changing with the step."""
    grads = []
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(100 * step + i)
        grad = torch.randn(p.shape, generator=g, dtype=torch.float32)
        flat = grad.view(-1)
        if step % 2 == 0 and flat.numel() > 3:
            where = torch.randperm(flat.numel(), generator=g)[:3].tolist()
            flat[where[0]], flat[where[1]], flat[where[2]] = NAN, INF, -INF
        grads.append(grad.to(p.dtype))
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_adam_nonfinite_grads_match_torch(backend, config, dtype):
    torch_cls, ours_cls, kwargs = ADAM_CONFIGS[config]
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 3), (40,), (1,), (300,)]
    initial = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ours = [p.clone().to(backend.device).requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_ours = ours_cls(ours, lr=1e-2, **kwargs)
    opt_theirs = torch_cls(theirs, lr=1e-2, foreach=False, **kwargs)
    for step in range(5):
        for p, q, grad in zip(ours, theirs, _nonfinite_grads(initial, step)):
            p.grad = grad.to(backend.device)
            q.grad = grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                                  atol=1e-12)
            torch.testing.assert_close(p.detach().cpu(), q.detach(), equal_nan=True, **tol,
                                       msg=lambda m: f"param {i} after step {step}: {m}")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in opt_theirs.state[q]:
                    torch.testing.assert_close(
                        opt_ours.state[p][key].cpu(), opt_theirs.state[q][key], equal_nan=True,
                        **tol, msg=lambda m: f"state[{key!r}] of param {i} after step {step}: {m}")
            assert float(opt_ours.state[p]["step"]) == float(opt_theirs.state[q]["step"])


def test_adam_nonfinite_grads_bfloat16_positions(backend):
    """bfloat16 params keep float32 moments here and bfloat16 ones in torch: the values round
    differently, the NaN/inf positions of the params are the same."""
    g = torch.Generator().manual_seed(5)
    initial = [torch.randn(s, generator=g).to(torch.bfloat16) for s in [(9, 5), (64,)]]
    ours = [p.clone().to(backend.device).requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_ours = chainrule.optim.AdamW(ours, lr=1e-2)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(4):
        for p, q, grad in zip(ours, theirs, _nonfinite_grads(initial, step)):
            p.grad = grad.to(backend.device)
            q.grad = grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            a, b = p.detach().cpu().float(), q.detach().float()
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            assert torch.equal(torch.isposinf(a), torch.isposinf(b))
            assert torch.equal(torch.isneginf(a), torch.isneginf(b))
            finite = torch.isfinite(b)
            torch.testing.assert_close(a[finite], b[finite], rtol=2e-2, atol=2e-2)
