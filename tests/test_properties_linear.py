"""Property-based tests of the linear layer with hypothesis, on every backend.

Each example draws a shape (0, 1, odd sizes, primes, up to a few hundred on the CPU backends),
layouts of every operand (transposed, sliced, with a storage offset, an expanded bias or input),
a dtype, an activation, bias or not, which inputs require grad, and accumulate_grad on or off,
and checks the output and every gradient against F.linear + the activation: float64 to 1e-10,
float32/bfloat16/float16 within twice the error PyTorch's own ops make against float64.
The examples are derandomized (the same ones every run) and counted: the run fails if hypothesis
ran fewer than asked.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainrule.functional import linear
from test_linear import ACTIVATIONS, reference

# Examples per backend (>= 2000 in all without a GPU). The emulator runs every CUDA thread as a
# fiber, so it gets fewer and smaller examples.
EXAMPLES = {"cpu": 350, "cpu-ours": 350, "cpu-avx2": 450, "cpu-fallback": 400,
            "emulated_cuda-forward": 400, "emulated_cuda-reverse": 200, "emulated_cuda-random": 200,
            "cuda": 600}
MAX_DIM = {"emulated": 70, "other": 300}
SPECIAL_SIZES = [0, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 32, 33, 64, 97, 127, 128, 129]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Rounding floor per dtype (one unit of the format's last place near 1), as in test_linear.py.
FLOOR = {torch.float64: 0.0, torch.float32: 2 ** -20, torch.bfloat16: 2 ** -8,
         torch.float16: 2 ** -11}
INPUT_LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "expanded"]
WEIGHT_LAYOUTS = ["contiguous", "transposed", "sliced", "offset"]
BIAS_LAYOUTS = ["contiguous", "expanded", "sliced"]


@dataclasses.dataclass
class Case:
    lead: tuple       # leading (batch) dims of the input
    k: int
    n: int
    dtype: torch.dtype
    activation: str | None
    bias: bool
    requires_grad: tuple  # (input, weight, bias)
    accumulate: bool
    existing_grad: bool   # .grad buffers present before backward
    input_layout: str
    weight_layout: str
    bias_layout: str
    seed: int


def sizes(max_dim):
    small = [s for s in SPECIAL_SIZES if s <= max_dim]
    # Mostly small sizes (the count has to fit in the time), some up to max_dim.
    return st.one_of(st.sampled_from(small), st.integers(0, 40), st.integers(0, max_dim))


@st.composite
def cases(draw, max_dim):
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    if ndim == 1:
        lead = ()
    elif ndim == 2:
        lead = (draw(sizes(max_dim)),)
    else:
        lead = (draw(st.integers(0, 4)), draw(sizes(max_dim // 4)))
    return Case(lead=lead, k=draw(sizes(max_dim)), n=draw(sizes(max_dim)),
                dtype=draw(st.sampled_from(DTYPES)), activation=draw(st.sampled_from(ACTIVATIONS)),
                bias=draw(st.booleans()),
                requires_grad=(draw(st.booleans()), draw(st.booleans()), draw(st.booleans())),
                accumulate=draw(st.booleans()), existing_grad=draw(st.booleans()),
                input_layout=draw(st.sampled_from(INPUT_LAYOUTS)),
                weight_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
                bias_layout=draw(st.sampled_from(BIAS_LAYOUTS)),
                seed=draw(st.integers(0, 2 ** 16)))


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (float64, on the target device and dtype) as a view with the given layout."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1] + 1, dtype=values.dtype,
                           device=values.device)
        wide[..., 1::2] = values
        return wide[..., 1::2]
    if layout == "offset":
        flat = torch.zeros(values.numel() + 3, dtype=values.dtype, device=values.device)
        view = flat[3:].view(values.shape)
        view.copy_(values)
        return view
    return values


def make_operands(case: Case, device: str):
    g = torch.Generator().manual_seed(case.seed)
    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)
    if case.input_layout == "expanded" and case.lead:
        row = randn(1, case.k).to(device, case.dtype)
        x = row.expand(*case.lead, case.k) if len(case.lead) == 1 else \
            row.view(1, 1, case.k).expand(*case.lead, case.k)
    else:
        x = _laid_out(randn(*case.lead, case.k).to(device, case.dtype), case.input_layout)
    w = _laid_out((randn(case.n, case.k) / max(case.k, 1) ** 0.5).to(device, case.dtype),
                  case.weight_layout)
    b = None
    if case.bias:
        if case.bias_layout == "expanded":
            b = randn(1).to(device, case.dtype).expand(case.n)
        else:
            b = _laid_out(randn(case.n).to(device, case.dtype), case.bias_layout)
    grad_out = randn(*case.lead, case.n).to(device, case.dtype)
    return x, w, b, grad_out


def _leaf(t, requires_grad):
    if t is None:
        return None
    return t.detach().requires_grad_(requires_grad)


def _run(fn, x, w, b, grad_out, case: Case, grads_before):
    """Output and the gradients of the leaves that require grad (None for the others)."""
    leaves = [_leaf(t, r) for t, r in zip((x, w, b), case.requires_grad)]
    for leaf, before in zip(leaves[1:], grads_before):
        if leaf is not None and leaf.requires_grad and before is not None:
            leaf.grad = before.clone()
    out = fn(*leaves)
    if out.requires_grad:
        out.backward(grad_out)
    return out.detach(), [leaf.grad if leaf is not None and leaf.requires_grad else None
                          for leaf in leaves]


def check_case(case: Case, device: str):
    x, w, b, grad_out = make_operands(case, device)
    grads_before = [None, None]
    if case.existing_grad:
        g = torch.Generator().manual_seed(case.seed + 1)
        grads_before = [torch.randn(case.n, case.k, generator=g, dtype=torch.float64).to(device, case.dtype),
                        torch.randn(case.n, generator=g, dtype=torch.float64).to(device, case.dtype)
                        if case.bias else None]
    ours = _run(lambda *t: linear(*t, case.activation, accumulate_grad=case.accumulate),
                x, w, b, grad_out, case, grads_before)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run(lambda *t: reference(*t, case.activation), as64(x), as64(w), as64(b),
               grad_out.double(), case, [as64(t) for t in grads_before])
    theirs = None
    if case.dtype != torch.float64:
        theirs = _run(lambda *t: reference(*t, case.activation), x, w, b, grad_out, case,
                      grads_before)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    values_ours = [ours[0], *ours[1]]
    values_ref = [ref[0], *ref[1]]
    values_theirs = [theirs[0], *theirs[1]] if theirs else [None] * 4
    for name, o, r, t in zip(names, values_ours, values_ref, values_theirs):
        assert (o is None) == (r is None), f"{name}: {case}"
        if o is None:
            continue
        assert o.shape == r.shape and o.dtype == case.dtype, f"{name}: {case}"
        if case.dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{name}: {case}\n{m}")
            continue
        if o.numel() == 0:
            continue
        scale = max(r.abs().max().item(), 1.0)
        ours_err = (o.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert ours_err <= 2 * torch_err + FLOOR[case.dtype] * scale, \
            f"{name}: chainrule error {ours_err:.3g} vs torch error {torch_err:.3g}: {case}"


def test_linear_properties(backend):
    max_dim = MAX_DIM["emulated" if backend.name.startswith("emulated") else "other"]
    examples = EXAMPLES[backend.name]
    ran = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=cases(max_dim))
    def check(case):
        ran.append(case)
        check_case(case, backend.device)

    check()
    # Hypothesis reruns a failing example while shrinking; a pass means each example ran once.
    assert len(ran) >= examples, f"hypothesis ran {len(ran)} of {examples} examples"
