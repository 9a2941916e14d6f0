"""The rule that sends a CPU linear call to our GEMM or to ATen's (csrc/cpu/gemm_path.cpp).

The rule is a pure function of the CPU and the problem; these tests hold it against every CPU
class it names, check the switches (CHAINRULE_CPU_GEMM, chainrule._C._set_cpu_gemm) and that both
paths compute the same layer. Which path is faster is measured by benchmarks/bench_sweep.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import chainrule
from chainrule.functional import linear
from op_record import RecordOps

C = chainrule._C


def rule(vendor, dtype="float32", backward=False, m=512, n=1024, k=1024, *, avx512_bf16=True,
         amx_bf16=False, ours_available=True):
    return C._choose_cpu_gemm_path(vendor, avx512_bf16, amx_bf16, ours_available, dtype,
                                   backward, m, n, k)


@pytest.mark.parametrize("backward", [False, True])
def test_intel_takes_aten_for_fp32_and_bf16(backward):
    for m, n, k in [(1, 1024, 1024), (512, 768, 3072), (4096, 4096, 1024)]:
        assert rule("intel", "float32", backward, m, n, k)[0] == "aten"
        assert rule("intel", "bfloat16", backward, m, n, k, amx_bf16=True)[0] == "aten"


def test_amd_fp32_takes_ours_once_every_gemm_is_large_enough():
    for backward in (False, True):
        assert rule("amd", "float32", backward, 4096, 4096, 1024)[0] == "ours"
        assert rule("amd", "float32", backward, 64, 1024, 1024)[0] == "ours"
        assert rule("amd", "float32", backward, 128, 255, 769)[0] == "ours"
        # decoding and small batches: the weight-sized packing is not paid back (measured on a
        # Zen 4 down to M = 33, where ours ran 0.76-0.95x eager)
        for m in (1, 8, 33, 63):
            assert rule("amd", "float32", backward, m, 1024, 1024)[0] == "aten"
        # a short reduction (k) or a narrow output (n): 4096 x 64 x 64 ran 0.78-0.86x
        assert rule("amd", "float32", backward, 4096, 64, 64)[0] == "aten"
        assert rule("amd", "float32", backward, 512, 1024, 64)[0] == "aten"
        assert rule("amd", "float32", backward, 512, 64, 1024)[0] == "aten"


def test_both_passes_of_a_call_take_one_path():
    """A call whose forward runs ours and backward ATen's (or the reverse) was the slowest kind
    measured (0.85-0.91x eager on a Zen 4): the rule answers both passes from the same sizes."""
    for vendor in ("intel", "amd", "other"):
        for m in (1, 8, 32, 33, 48, 63, 64, 65, 512):
            for n, k in ((64, 64), (65, 65), (64, 1024), (1024, 64), (255, 769), (1024, 1024)):
                assert rule(vendor, "float32", False, m, n, k) == \
                    rule(vendor, "float32", True, m, n, k)


def test_bf16_takes_oneDNN_and_unknown_cpus_take_aten():
    for vendor in ("intel", "amd", "other"):
        assert rule(vendor, "bfloat16")[0] == "aten"
    assert rule("other", "float32", False, 4096, 4096, 4096)[0] == "aten"
    assert rule("amd", "float32", ours_available=False)[0] == "aten"


def test_low_precision_multiplies_as_is_only_with_bf16_instructions():
    assert rule("amd", "bfloat16", avx512_bf16=True)[1] is True
    assert rule("intel", "bfloat16", avx512_bf16=False, amx_bf16=True)[1] is True
    assert rule("intel", "bfloat16", avx512_bf16=False, amx_bf16=False)[1] is False
    assert rule("intel", "float16", avx512_bf16=False, amx_bf16=False)[1] is False
    assert rule("intel", "float32", avx512_bf16=True)[1] is False


def test_this_cpu_is_described():
    traits = C._cpu_traits()
    assert traits["vendor"] in ("intel", "amd", "other")
    assert traits["family"] > 0
    if traits["amx_bf16"] or traits["avx512_bf16"]:
        assert traits["vendor"] != "other"


def test_switch_forces_a_path_and_back():
    fp32_ours = C._cpu_isa() != "fallback"
    try:
        C._set_cpu_gemm("ours")
        assert chainrule.backends.cpu_gemm_mode() == "ours"
        expected = "ours" if fp32_ours else "aten"
        assert chainrule.backends.cpu_gemm_path(64, 64, 64) == expected
        assert chainrule.backends.cpu_gemm_path(1, 64, 64, torch.float64) == "aten"
        C._set_cpu_gemm("aten")
        assert chainrule.backends.cpu_gemm_path(4096, 4096, 4096) == "aten"
        assert chainrule.build_info()["cpu_gemm"] == "aten"
    finally:
        C._set_cpu_gemm(None)
    assert chainrule.backends.cpu_gemm_mode() == os.environ.get("CHAINRULE_CPU_GEMM", "auto")
    with pytest.raises(RuntimeError, match=r"unknown CPU GEMM mode 'fast'; expected 'auto', "
                                           r"'ours' or 'aten'"):
        C._set_cpu_gemm("fast")
    with pytest.raises(ValueError, match=r"cpu_gemm_path: dtype must be a floating dtype, got "
                                         r"torch.int32"):
        chainrule.backends.cpu_gemm_path(1, 2, 3, torch.int32)


def _run_with_env(value, code):
    env = dict(os.environ, CHAINRULE_CPU_GEMM=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable():
    done = _run_with_env("aten", "import chainrule; print(chainrule.build_info()['cpu_gemm'], "
                                 "chainrule.backends.cpu_gemm_path(4096, 4096, 4096))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["aten", "aten"]
    done = _run_with_env("fastest", "import torch, chainrule; "
                                    "chainrule.functional.linear(torch.ones(2, 3), torch.ones(4, 3))")
    assert done.returncode != 0
    assert "CHAINRULE_CPU_GEMM: expected auto, ours or aten, got 'fastest'" in done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
@pytest.mark.parametrize("shape", [(1, 64, 64), (33, 769, 255), (130, 96, 200)], ids=str)
def test_both_paths_compute_the_same_layer(dtype, activation, shape):
    """Output and gradients of the two paths agree (each is held against float64 elsewhere)."""
    m, k, n = shape
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) * k ** -0.5
    b = torch.randn(n, dtype=dtype)
    dy = torch.randn(m, n, dtype=dtype)
    results = {}
    try:
        for mode in ("ours", "aten"):
            C._set_cpu_gemm(mode)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y = linear(*leaves, activation)
            y.backward(dy)
            results[mode] = [y.detach().double()] + [t.grad.double() for t in leaves]
    finally:
        C._set_cpu_gemm(None)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for ours, aten, name in zip(results["ours"], results["aten"], ("y", "dx", "dw", "db")):
        scale = aten.abs().max().clamp_min(1.0)
        assert (ours - aten).abs().max() <= tol * scale, name


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_layers_run_as_torch_ops_in_auto_mode(activation):
    """A CPU layer of at most 2^21 multiply-adds, or one that takes ATen's GEMM in both passes
    without accumulate_grad, is F.linear + the activation (no chainrule op runs); otherwise, and
    in a forced mode, chainrule's ops run. Values match either way."""
    def run(m, k, n, accumulate_grad=False):
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        w.grad = torch.zeros_like(w)
        with RecordOps() as record:
            y = linear(x, w, None, activation, accumulate_grad=accumulate_grad)
            y.sum().backward()
        ref = F_linear_act(x.detach(), w.detach(), activation)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        return record.chainrule_ops()

    prefers = C._cpu_prefers_torch_ops
    assert not prefers("float32", 1, 1, 1, False)  # the suite runs with it off (conftest)
    C._set_cpu_small_layers_to_torch(True)
    try:
        assert prefers("float32", 16, 128, 1024, True)  # 2^21 multiply-adds
        assert not prefers("float32", 16, 129, 1024, True)
        for dtype in ("float32", "bfloat16"):
            both_aten = all(C._cpu_gemm_path(dtype, backward, 512, 1024, 1024) == "aten"
                            for backward in (False, True))
            widened = dtype == "bfloat16" and not (C._cpu_traits()["avx512_bf16"]
                                                   or C._cpu_traits()["amx_bf16"])
            assert prefers(dtype, 512, 1024, 1024, False) == (both_aten and not widened)
        assert run(8, 64, 64) == []
        assert chainrule.backends.cpu_gemm_path(8, 64, 64) == "torch"
        assert run(64, 256, 256, accumulate_grad=True) != []  # 4M multiply-adds
        C._set_cpu_gemm("aten")
        assert not prefers("float32", 1, 1, 1, False)
        assert run(8, 64, 64) != []
    finally:
        C._set_cpu_gemm(None)
        C._set_cpu_small_layers_to_torch(False)
    assert run(8, 64, 64) != []


def F_linear_act(x, w, activation, b=None):
    import torch.nn.functional as F
    z = F.linear(x, w, b)
    return {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](z)


def test_torch_ops_check_answers_false_for_what_the_op_must_see():
    """functional.linear's first step on each CPU call (C++, csrc/cpu/python_hooks.cpp): a result
    only for a valid layer of plain CPU tensors that prefers_torch_ops gives to torch; anything
    else goes on to the op, whose checks name what is wrong (tests/test_errors.py)."""
    def check(x, w, b, accumulate, activation=None):
        return C._linear_first_step(x, w, b, activation, accumulate) is not None

    class Sub(torch.Tensor):
        pass

    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    C._set_cpu_small_layers_to_torch(True)
    try:
        assert check(x, w, b, False) and check(x, w, None, False)
        assert check(x.unsqueeze(0), torch.nn.Parameter(w), torch.nn.Parameter(b), False)
        assert check(x.bfloat16(), w.bfloat16(), b.bfloat16(), False)
        assert check(x.double(), w.double(), None, False)
        assert check(x.t().contiguous().t(), w.t().contiguous().t(), b, False)  # any strides
        bad = {
            "input not a tensor": ([[1.0] * 64], w, b),
            "weight None": (x, None, b),
            "tensor subclass input": (x.as_subclass(Sub), w, b),
            "tensor subclass weight": (x, w.as_subclass(Sub), b),
            "tensor subclass bias": (x, w, b.as_subclass(Sub)),
            "0-d input": (torch.tensor(1.0), w, b),
            "1-d weight": (x, w[0], b),
            "3-d weight": (x, w.unsqueeze(0), b),
            "in_features mismatch": (x[:, :63], w, b),
            "dtype mismatch": (x.double(), w, b),
            "bias dtype mismatch": (x, w, b.double()),
            "integer dtype": (x.int(), w.int(), b.int()),
            "complex dtype": (x.cfloat(), w.cfloat(), b.cfloat()),
            "bias shape": (x, w, torch.randn(31)),
            "2-d bias": (x, w, b.unsqueeze(0)),
            "sparse weight": (x, w.to_sparse(), b),
            "meta input": (x.to("meta"), w, b),
            "bias not a tensor": (x, w, 1.0),
        }
        for what, (xi, wi, bi) in bad.items():
            assert not check(xi, wi, bi, False), what
        # names functional.linear does not take go on to raise its ValueError there
        for activation in ("none", "GELU", "tanh", 1, b"gelu", "gelu\0"):
            assert not check(x, w, b, False, activation), activation
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear's autocast is Python's
            assert not check(x, w, b, False)

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Mode():  # a TorchFunctionMode must see F.linear
            assert not check(x, w, b, False)
        assert check(x, w, b, True)  # 16k multiply-adds: tiny, accumulate or not
        if chainrule.backends.emulator_available():
            with chainrule.backends.emulated_cuda():
                assert not check(x, w, b, False)
        C._set_cpu_gemm("ours")
        assert not check(x, w, b, False)
    finally:
        C._set_cpu_gemm(None)
        C._set_cpu_small_layers_to_torch(False)
    assert not check(x, w, b, False)  # the suite runs with the torch-ops path off


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_torch_ops_result_is_torch_own(activation):
    """What the C++ first step returns is F.linear + the activation, bit for bit, with the same
    autograd graph (gradients equal to eager's, bit for bit)."""
    torch.manual_seed(3)
    x = torch.randn(8, 64, requires_grad=True)
    w, b = torch.randn(32, 64, requires_grad=True), torch.randn(32, requires_grad=True)
    C._set_cpu_small_layers_to_torch(True)
    try:
        y = C._linear_first_step(x, w, b, activation, False)
    finally:
        C._set_cpu_small_layers_to_torch(False)
    assert y is not None and y.requires_grad
    inputs = (x, w, b)
    ours = torch.autograd.grad(y, inputs, torch.ones_like(y))
    ref = F_linear_act(x, w, activation, b)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for got, want in zip(ours, torch.autograd.grad(ref, inputs, torch.ones_like(ref))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


NO_GRAD_SHAPES = [(1, 64, 64), (8, 64, 33), (3, 1024, 1024), (8, 768, 3072), (64, 256, 256),
                  (257, 129, 65)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_no_grad_call_runs_the_forward_kernel_directly(dtype, activation):
    """In auto mode, a call that needs no gradient and that prefers_torch_ops leaves to chainrule
    comes back from the first step computed by chainrule.linear_forward's CPU kernel without the
    dispatcher: the op's result bit for bit, for any leading dimensions and any strides. With a
    gradient, or while a TorchDispatchMode is active (which must see the op), the step gives
    nothing, and the op runs."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}[dtype]
    act = "none" if activation is None else activation
    C._set_cpu_small_layers_to_torch(True)
    try:
        for m, k, n in NO_GRAD_SHAPES:
            torch.manual_seed(m + k + n)
            w = torch.nn.Parameter(torch.randn(n, k).to(dtype))
            b = torch.nn.Parameter(torch.randn(n).to(dtype))
            for x in (torch.randn(m, k).to(dtype), torch.randn(1, m, k).to(dtype),
                      torch.randn(k, m).to(dtype).t()):
                torch_ops = C._cpu_prefers_torch_ops(name, m, n, k, False, False)
                with torch.no_grad():
                    y = C._linear_first_step(x, w, b, activation, False)
                    want = torch.ops.chainrule.linear_forward(x, w, b, act, False)[0]
                    with RecordOps():
                        seen = C._linear_first_step(x, w, b, activation, False)
                if torch_ops:
                    assert y is not None and seen is not None
                    continue
                assert y is not None and not y.requires_grad, (m, k, n)
                assert seen is None, (m, k, n)
                assert y.shape == want.shape and torch.equal(y, want), (m, k, n, x.shape)
                with torch.enable_grad():
                    stays = C._linear_first_step(x, w, b, activation, False)
                assert stays is None or C._cpu_prefers_torch_ops(name, m, n, k, False, True)
        C._set_cpu_gemm("ours")  # a forced mode: every call to the op
        with torch.no_grad():
            assert C._linear_first_step(torch.randn(3, 1024), torch.randn(1024, 1024), None,
                                        activation, False) is None
    finally:
        C._set_cpu_gemm(None)
        C._set_cpu_small_layers_to_torch(False)


def test_no_grad_direct_call_names_errors_as_the_op_does():
    """With the direct call on, a no-grad call the step cannot take (an unknown activation, a
    shape mismatch) still goes on to the checks that name chainrule.linear_forward and what was
    wrong (tests/test_errors.py has the full matrix)."""
    x = torch.randn(2, 1024)
    w = torch.randn(1024, 1024)
    C._set_cpu_small_layers_to_torch(True)
    try:
        with torch.no_grad():
            assert C._linear_first_step(x, w, None, None, False) is not None
            with pytest.raises(ValueError, match="activation"):
                linear(x, w, None, "tanh")
            with pytest.raises(RuntimeError, match=r"chainrule.linear_forward: input's last "
                                                   r"dimension \(1023\) must equal"):
                linear(x[:, :1023], w)
            with pytest.raises(RuntimeError, match="chainrule.linear_forward: bias must be 1-D"):
                linear(x, w, torch.randn(1023))
    finally:
        C._set_cpu_small_layers_to_torch(False)
