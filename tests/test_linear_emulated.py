"""The CUDA linear kernels on the emulated_cuda backend: every tail of the tile grid, every
schedule order, both GEMM paths (tensor cores for bfloat16/float16, SIMT for float32/float64),
the unaligned fallback, accumulation and the determinism of the bias gradient.

The shared suite (test_linear.py) checks the op semantics on every backend; this file sweeps the
shapes and schedules that break kernels: M, K, N below, at and just past a tile, primes, 1.
Everything is compared against a float64 reference computed with native torch ops; a result in a
low-precision dtype may be off by at most twice what PyTorch's own op in that dtype is off by,
plus a small floor (PyTorch's error can be 0 where ours is one rounding).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import chainrule
from chainrule import ops

pytestmark = pytest.mark.skipif(
    not chainrule.backends.emulator_available(),
    reason="chainrule was built without the CUDA emulator (no CUDA headers at build time)")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Floor of the allowed error, relative to the reference's magnitude.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SCHEDULES = ("forward", "reverse", "random")
M_SIZES = (1, 17, 128, 130)
K_SIZES = (1, 8, 40, 129)
N_SIZES = (1, 7, 64, 200)


def _native(z, activation):
    if activation == "none":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def _reference(x, w, b, dy, activation, dtype):
    """(y, z, dx, dw, db) of the native ops, in float64 when dtype is float64 (the reference) or in
    `dtype` (PyTorch's own error)."""
    x, w, dy = (t.detach().to(dtype).requires_grad_() for t in (x, w, dy))
    b = b.detach().to(dtype).requires_grad_() if b is not None else None
    z = F.linear(x, w, b)
    z.retain_grad()
    y = _native(z, activation)
    y.backward(dy)
    return y, z, x.grad, w.grad, (b.grad if b is not None else None)


def _check(name, ours, dtype, ref, torch_own):
    ours = ours.double()
    ref = ref.double()
    allowed = 2 * (torch_own.double() - ref).abs().max().item() if ref.numel() else 0.0
    allowed += FLOOR[dtype] * (ref.abs().max().item() + 1.0) if ref.numel() else 0.0
    err = (ours - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= allowed, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"


def _run_case(m, k, n, dtype, activation, bias, schedule, seed=0, accumulate=False):
    g = torch.Generator().manual_seed(1000 * m + 100 * k + n)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) / (k ** 0.5)).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if bias else None
    dy = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)

    with chainrule.backends.emulated_cuda(schedule=schedule, seed=seed):
        y, z = ops.linear_forward(x, w, b, activation, True)
        if accumulate:
            grad_w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
            grad_b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if bias else None
            start_w = grad_w.clone()
            start_b = grad_b.clone() if bias else None
            dx = ops.linear_backward_accumulate(dy, x, w, z if activation != "none" else None,
                                                activation, True, grad_w, grad_b)
            dw, db = grad_w, grad_b
        else:
            dx, dw, db = ops.linear_backward(dy, x, w, z if activation != "none" else None,
                                             activation, bias, [True, True, True])

    ref = _reference(x, w, b, dy, activation, torch.float64)
    own = _reference(x, w, b, dy, activation, dtype)
    names = ("output", "pre_activation", "grad_input", "grad_weight", "grad_bias")
    results = [y, z if activation != "none" else None, dx, dw, db]
    if accumulate:
        # Accumulation adds in float32 math and rounds once, as the CPU backend does.
        ref = list(ref)
        own = list(own)
        ref[3] = ref[3] + start_w.double()
        own[3] = (own[3].float() + start_w.float()).to(dtype)
        if bias:
            ref[4] = ref[4] + start_b.double()
            own[4] = (own[4].float() + start_b.float()).to(dtype)
    for name, ours, r, o in zip(names, results, ref, own):
        if ours is None or r is None:
            continue
        assert ours.dtype == dtype and ours.shape == r.shape, name
        _check(f"{name} (M={m}, K={k}, N={n}, {dtype}, {activation}, {schedule})", ours, dtype, r, o)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("m, k, n", list(itertools.product(M_SIZES, K_SIZES, N_SIZES)))
def test_shape_grid(m, k, n, dtype):
    """Forward and backward over the whole shape grid: tensor-core and float64 SIMT paths."""
    _run_case(m, k, n, dtype, "gelu", bias=True, schedule="forward")


TAIL_SHAPES = ((17, 40, 7), (130, 129, 200), (1, 1, 1), (128, 8, 64))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, k, n", TAIL_SHAPES)
def test_schedule_orders(m, k, n, dtype, schedule):
    """The same results whatever order the emulator runs a block's threads in."""
    _run_case(m, k, n, dtype, "silu", bias=True, schedule=schedule, seed=7)


@pytest.mark.parametrize("activation", ("none", "relu", "gelu", "gelu_tanh", "silu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activations(dtype, activation):
    _run_case(33, 24, 20, dtype, activation, bias=activation != "relu", schedule="random", seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", (True, False))
def test_accumulate(dtype, bias):
    _run_case(130, 40, 70, dtype, "gelu_tanh", bias=bias, schedule="reverse", accumulate=True)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_unaligned_and_strided_inputs(dtype):
    """Rows that are not 16-byte aligned take the element-wise copy path of the tensor-core GEMM;
    views with row strides are used in place; a transposed input is made contiguous."""
    g = torch.Generator().manual_seed(5)
    m, k, n = 37, 24, 19
    storage = torch.randn(m, k + 3, generator=g).to(dtype)
    x = storage[:, 1:k + 1]                          # row stride k + 3, offset 1 element
    w = torch.randn(k, n, generator=g).to(dtype).t()  # transposed: not row-major
    b = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    with chainrule.backends.emulated_cuda(schedule="random", seed=11):
        y, z = ops.linear_forward(x, w, b, "relu", True)
        dx, dw, db = ops.linear_backward(dy, x, w, z, "relu", True, [True, True, True])
    ref = _reference(x, w, b, dy, "relu", torch.float64)
    own = _reference(x, w, b, dy, "relu", dtype)
    for name, ours, r, o in zip(("y", "z", "dx", "dw", "db"), (y, z, dx, dw, db), ref, own):
        _check(name, ours, dtype, r, o)


def test_batched_and_empty_inputs():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    w = torch.randn(5, 9, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    with chainrule.backends.emulated_cuda():
        y, z = ops.linear_forward(x, w, b, "gelu", True)
        empty_y, _ = ops.linear_forward(x[:0], w, b, "gelu", True)
        dx, dw, db = ops.linear_backward(torch.ones(0, 3, 5, dtype=torch.float64), x[:0], w,
                                         torch.zeros(0, 3, 5, dtype=torch.float64), "gelu", True,
                                         [True, True, True])
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, F.linear(x, w, b), rtol=1e-12, atol=1e-12)
    assert empty_y.shape == (0, 3, 5)
    assert dx.shape == (0, 3, 9)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bias_grad_is_deterministic(dtype):
    """db (and dW) have the same bits under every schedule: no float atomics, fixed order."""
    g = torch.Generator().manual_seed(8)
    m, k, n = 600, 16, 40   # 600 rows: three row slices in the bias-gradient reduction
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    z = torch.randn(m, n, generator=g).to(dtype)
    results = []
    for schedule, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        with chainrule.backends.emulated_cuda(schedule=schedule, seed=seed):
            results.append(ops.linear_backward(dy, x, w, z, "silu", True, [False, True, True]))
    for dx, dw, db in results[1:]:
        assert torch.equal(dw, results[0][1]) and torch.equal(db, results[0][2])


@pytest.mark.parametrize("accumulate", (False, True), ids=("store", "accumulate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_grad_weight(dtype, accumulate):
    """A long batch and a small weight: grad_weight is split along the batch into k-slices that a
    second kernel adds in order (15 slices here), overwriting or accumulating."""
    _run_case(1000, 24, 20, dtype, "none", bias=True, schedule="random", seed=5,
              accumulate=accumulate)
