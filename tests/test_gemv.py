"""The decoding-sized forward: our GEMV (csrc/cpu/gemm/gemv_kernel.h) for at most 8 input rows,
the rule that picks it (csrc/cpu/gemm_path.cpp, choose_gemv), and its place in the layer: a
forward that needs no gradient takes chainrule's op even where torch's own ops would otherwise
run, since the GEMV is faster there (docs/cpu_gemm.md, "Small batches: the GEMV")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chainrule
from op_record import RecordOps

C = chainrule._C
MAX_ROWS = 8
# K with every vector tail (AVX-512: 16 lanes, AVX2: 8) and N with every row-block tail.
SHAPES = [(1, 4096), (7, 9001), (15, 4099), (16, 4096), (17, 3855), (33, 1987), (255, 257),
          (769, 255), (1024, 64), (4096, 17)]
ISAS = [isa for isa in ("avx512", "avx2")
        if {"avx512": 2, "avx2": 1}[isa] <= {"avx512": 2, "avx2": 1, "fallback": 0}[
            C._cpu_isa_detected()]]


@pytest.fixture(params=ISAS or [pytest.param("none", marks=pytest.mark.skip(
    reason="this CPU has neither AVX2 nor AVX-512: no GEMV to test"))])
def isa(request):
    C._set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        C._set_cpu_isa(None)


def test_rule():
    gemv = C._choose_cpu_gemv
    for vendor in ("intel", "amd", "other"):
        for isa in ("avx512", "avx2"):
            # bf16: up to 4 rows on the vector kernel (from 5, oneDNN's product kept up with
            # it); every row count on AMX tiles, which need ISA avx512 and k >= 32
            for m in range(1, MAX_ROWS + 2):
                assert gemv(vendor, isa, "bfloat16", m, 1024, 1024) == (m <= 4), (vendor, m)
                on_tiles = m <= MAX_ROWS and (m <= 4 or isa == "avx512")
                assert gemv(vendor, isa, "bfloat16", m, 1024, 1024, amx_bf16=True) == on_tiles
                assert gemv(vendor, isa, "bfloat16", m, 4096, 31, amx_bf16=True) == (m <= 4)
            # on vdpbf16ps (AMD with AVX512_BF16, ISA avx512): every row count
            for m in range(1, MAX_ROWS + 2):
                dot = vendor == "amd" and isa == "avx512"
                want = m <= MAX_ROWS and (m <= 4 or dot)
                assert gemv(vendor, isa, "bfloat16", m, 1024, 1024, avx512_bf16=True) == want
                assert gemv(vendor, isa, "bfloat16", m, 4096, 31, avx512_bf16=True) == want
            assert gemv(vendor, isa, "bfloat16", 4, 256, 256)
            assert gemv(vendor, isa, "bfloat16", 1, 1, 1)  # every weight size
            assert not gemv(vendor, isa, "bfloat16", 1, 0, 1024)
            assert not gemv(vendor, isa, "bfloat16", 1, 1024, 0)
            assert not gemv(vendor, isa, "bfloat16", 0, 1024, 1024)
            assert not gemv(vendor, isa, "float16", 1, 1024, 1024)
            assert not gemv(vendor, isa, "float64", 1, 1024, 1024)
            # fp32: every row count on AMD; on Intel from 4 rows, where MKL's product slows down
            # (docs/cpu_gemm.md); other vendors unmeasured
            for m in range(1, MAX_ROWS + 2):
                want = m <= MAX_ROWS and (vendor == "amd" or (vendor == "intel" and m >= 4))
                assert gemv(vendor, isa, "float32", m, 1024, 1024) == want, (vendor, m)
        assert not gemv(vendor, "fallback", "bfloat16", 1, 1024, 1024)


def bf16_kernels(isa):
    """The bf16 kernels off the AMX tiles this CPU can run with the ISA: the widened one, and
    vdpbf16ps where it has AVX512_BF16 (whichever the rule picks)."""
    return [False, True] if isa == "avx512" and C._cpu_has_avx512_bf16() else [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES, ids=str)
def test_kernel_against_float64(isa, dtype, k, n):
    """Float32 sums of the (exactly widened) inputs: within float32's accumulation error of the
    float64 product, for every row count, vector tail and row-block tail; bf16 on each kernel
    the CPU can run."""
    torch.manual_seed(k * 31 + n)
    for m in range(1, MAX_ROWS + 1):
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        ref = x.double() @ w.double().t()
        bound = 4 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
        # None: the rule's kernel (AMX tiles where the CPU has them)
        for dot in [None, *bf16_kernels(isa)] if dtype == torch.bfloat16 else [None]:
            acc = C._cpu_gemv(x, w, bf16_dot=dot)
            assert acc.dtype == torch.float32 and acc.shape == (m, n)
            assert ((acc.double() - ref).abs() <= bound + 1e-30).all(), (m, k, n, dot)


@pytest.mark.parametrize("m", [3, 7])
def test_kernel_is_the_same_at_any_thread_count(isa, m):
    x = torch.randn(m, 1023).bfloat16()
    w = torch.randn(8191, 1023).bfloat16()
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(C._cpu_gemv(x, w))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_bf16_kernel_where_the_cpu_has_amx_tiles_or_avx512_bf16(isa):
    """The kernel a bf16 product takes: AMX tiles for 4-8 rows with ISA avx512 on a CPU (and OS)
    that has them and k >= 32; else vdpbf16ps ('avx512_bf16') on an AMD CPU with AVX512_BF16 and
    ISA avx512; else the ISA's vector kernel, which widens the weight; float32 takes neither.
    Where the tiles or vdpbf16ps run, test_kernel_against_float64 holds them to the bound (its
    rows run 1-8 and its K and N include every tail: K mod 32 on scalar code or masked loads, N
    mod 16 on the vector kernel)."""
    traits = C._cpu_traits()
    dot = traits["vendor"] == "amd" and traits["avx512_bf16"] and isa == "avx512"
    vector = "avx512_bf16" if dot else isa
    for m in range(1, MAX_ROWS + 1):
        tiles = traits["amx_bf16"] and isa == "avx512" and m >= 4
        assert C._cpu_gemv_kernel("bfloat16", m, 1024) == ("amx" if tiles else vector), m
        assert C._cpu_gemv_kernel("bfloat16", m, 31) == vector
        assert C._cpu_gemv_kernel("float32", m, 1024) == isa


def test_bf16_dot_is_refused_where_the_cpu_cannot_run_it(isa):
    x, w = torch.ones(2, 64).bfloat16(), torch.ones(3, 64).bfloat16()
    if True in bf16_kernels(isa):
        assert torch.equal(C._cpu_gemv(x, w, bf16_dot=True), torch.full((2, 3), 64.0))
    else:
        with pytest.raises(RuntimeError, match="bf16_dot=True needs ISA avx512 on a CPU with "
                                               "AVX512_BF16"):
            C._cpu_gemv(x, w, bf16_dot=True)


def test_kernel_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match=r"_cpu_gemv: expected \(m, k\) and \(n, k\) matrices "
                                           r"with 1 <= m <= 8 and k, n > 0, got \[9, 8\]"):
        C._cpu_gemv(torch.ones(9, 8), torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="expected two float32 or bfloat16 CPU tensors"):
        C._cpu_gemv(torch.ones(1, 8, dtype=torch.float64), torch.ones(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_layer_on_the_gemv(isa, dtype, activation):
    """The op's forward where the rule picks the GEMV (and the pre-activation kept for
    backward): F.linear + the activation's values, within one rounding of the storage dtype."""
    m, k, n = 3, 257, 513
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    traits = C._cpu_traits()
    expected_path = "gemv" if C._choose_cpu_gemv(traits["vendor"], isa, name, m, n, k,
                                                 amx_bf16=traits["amx_bf16"],
                                                 avx512_bf16=traits["avx512_bf16"]) \
        else C._cpu_gemm_path(name, False, m, n, k)
    assert C._cpu_gemm_path(name, False, m, n, k) == expected_path
    torch.manual_seed(0)
    x = torch.randn(2, 1, m, k).to(dtype)  # (..., in_features)
    w = (torch.randn(n, k) * k ** -0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    act = "none" if activation is None else activation
    y, pre = torch.ops.chainrule.linear_forward(x, w, b, act, True)
    z = F.linear(x.double(), w.double(), b.double())
    ref = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
           "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](z)
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=rtol)
    if activation is not None:
        torch.testing.assert_close(pre.double(), z, rtol=rtol, atol=rtol)


def test_no_grad_decoding_takes_chainrule_op_where_the_gemv_runs():
    """In auto mode, with torch's own ops on for small layers: a forward that needs no gradient
    and that the rule gives to the GEMV runs chainrule's op; with a gradient too, for at most 4
    rows of a weight of at least 2^18 values (gemm_path.h, kGemvGradMaxRows, kGemvGradMinWeights),
    where the GEMV's forward saves more than the op's fixed cost; a smaller weight stays on
    torch's ops."""
    layer = chainrule.nn.Linear(1024, 1024, activation="gelu", dtype=torch.bfloat16)
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    gemv_here = C._cpu_gemm_path("bfloat16", False, 1, 1024, 1024) == "gemv"
    C._set_cpu_small_layers_to_torch(True)
    try:
        with torch.no_grad(), RecordOps() as record:
            y = layer(x)
        ran_ours = bool(record.chainrule_ops())
        assert ran_ours == gemv_here
        assert chainrule.backends.cpu_gemm_path(1, 1024, 1024, torch.bfloat16,
                                                requires_grad=False) == \
            ("gemv" if gemv_here else "torch")
        with RecordOps() as record:
            y_grad = layer(x)
        assert bool(record.chainrule_ops()) == gemv_here
        assert chainrule.backends.cpu_gemm_path(1, 1024, 1024, torch.bfloat16) == \
            ("gemv" if gemv_here else "torch")
        small = chainrule.nn.Linear(256, 511, activation="gelu", dtype=torch.bfloat16)  # < 2^18
        with RecordOps() as record:
            small(x[:, :256])
        assert not record.chainrule_ops()
        assert chainrule.backends.cpu_gemm_path(1, 256, 511, torch.bfloat16) == "torch"
    finally:
        C._set_cpu_small_layers_to_torch(False)
    torch.testing.assert_close(y.float(), y_grad.detach().float(), rtol=2 ** -7, atol=2 ** -7)
