"""Same bits every run: forward, backward and Adam on the CPU backends.

Each case runs twice with torch.set_num_threads(1) and twice with 2 threads, and all four results
must be bitwise equal: on the CPU kernels with each SIMD path forced (avx512, avx2, fallback), and
on the emulated CUDA kernels in forward and random thread order. The shapes are large enough that
2 threads split every GEMM, the bias reduction and the Adam step. Why this holds, and what it does
not cover (other machines' ISAs, the GPU), is in docs/reliability.md.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import chainrule
from chainrule.functional import linear

from conftest import running_on

CPU_BACKENDS = ["cpu", "cpu-avx512", "cpu-avx2", "cpu-fallback", "emulated_cuda-forward",
                "emulated_cuda-random"]
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
THREADS = (1, 2, 1, 2)


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    with running_on(request.param) as b:
        yield b


@contextlib.contextmanager
def num_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (NaN and -0.0 included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _assert_all_equal(runs, what):
    first = runs[0]
    for index, run in enumerate(runs[1:], start=1):
        for name in first:
            assert torch.equal(first[name], run[name]), (
                f"{what}: {name} differs between run 0 ({THREADS[0]} thread(s)) and run {index} "
                f"({THREADS[index]} thread(s))")


def _linear_run(shape, dtype, activation, accumulate):
    m, k, n = shape
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).requires_grad_()
    grad_output = torch.randn(m, n, generator=g).to(dtype)
    if accumulate:
        w.grad = torch.randn(n, k, generator=g).to(dtype)
        b.grad = torch.randn(n, generator=g).to(dtype)
    y = linear(x, w, b, activation, accumulate_grad=accumulate)
    y.backward(grad_output)
    return dict(output=_bits(y), grad_input=_bits(x.grad), grad_weight=_bits(w.grad),
                grad_bias=_bits(b.grad))


def _linear_cases():
    """Every activation, dtype and accumulate option on the default CPU path; on the other paths
    (whose threading is the same code with other micro-kernels) no activation and gelu."""
    cases = []
    for backend in CPU_BACKENDS:
        activations = ACTIVATIONS if backend == "cpu" else [None, "gelu"]
        for activation in activations:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for accumulate in (False, True):
                    if backend != "cpu" and accumulate != (activation is None):
                        continue  # one of the two on the other paths
                    cases.append(pytest.param(
                        backend, activation, dtype, accumulate,
                        id=f"{backend}-{activation}-{dtype}-{'accumulate' if accumulate else 'plain'}"))
    return cases


@pytest.mark.parametrize("backend_name, activation, dtype, accumulate", _linear_cases())
def test_linear_same_bits(backend_name, activation, dtype, accumulate):
    # M spans several row blocks and bias-reduction chunks, K more than one k block of the
    # AVX2 kernel, N several column panels.
    shape = (300, 520, 200) if not backend_name.startswith("emulated") else (160, 72, 136)
    runs = []
    with running_on(backend_name):
        for threads in THREADS:
            with num_threads(threads):
                runs.append(_linear_run(shape, dtype, activation, accumulate))
    _assert_all_equal(runs, f"linear {backend_name} {dtype} {activation}")


def _adam_run(optimizer_cls, kwargs, dtype):
    g = torch.Generator().manual_seed(5)
    # 52k elements: more than one 32768-element chunk of the CPU kernel's parallel_for.
    shapes = [(97, 131), (5,), (40001,), (0,), (33, 3)]
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    opt = optimizer_cls(params, lr=1e-2, **kwargs)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    out = {f"param{i}": _bits(p) for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            out[f"state{i}.{key}"] = _bits(value)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("options", ["adam", "adamw_amsgrad", "adam_master_weights"])
def test_adam_same_bits(cpu_backend, options, dtype):
    optimizer_cls, kwargs = {
        "adam": (chainrule.optim.Adam, dict(weight_decay=0.1)),
        "adamw_amsgrad": (chainrule.optim.AdamW, dict(amsgrad=True, maximize=True)),
        "adam_master_weights": (chainrule.optim.Adam, dict(master_weights=True)),
    }[options]
    runs = []
    for threads in THREADS:
        with num_threads(threads):
            runs.append(_adam_run(optimizer_cls, kwargs, dtype))
    _assert_all_equal(runs, f"adam {cpu_backend} {dtype} {options}")
