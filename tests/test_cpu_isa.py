"""The CPU kernels on every SIMD path this machine can run (issue 6, acceptance 6).

chainrule picks its CPU GEMM at run time: AVX-512 (fp32 14x32 tiles, bf16 via vdpbf16ps), AVX2
(fp32 6x16 tiles) or ATen's GEMM ("fallback"). `chainrule._C._set_cpu_isa` forces one, so each
path is tested here on one machine; `CHAINRULE_CPU_ISA=avx512|avx2|fallback` does the same for a
whole run of the suite. Shapes sweep M, N and K across 1 .. 3 x the micro-tile + 1 and past the
cache blocks, every activation, bias / no bias, plain and accumulated gradients.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import chainrule

ISAS = ["avx512", "avx2", "fallback"]
ISA_RANK = {name: rank for rank, name in enumerate(reversed(ISAS))}
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
# Micro-tile (rows, columns) of each ISA's kernel; "fallback" has none, sweep like avx2.
MICRO_TILE = {"avx512": (14, 32), "avx2": (6, 16), "fallback": (6, 16)}


def _edge_sizes(tile: int) -> list[int]:
    """1 .. 3 x tile + 1, thinned to the sizes that hit a different edge case."""
    sizes = {1, 2, tile - 1, tile, tile + 1, 2 * tile - 1, 2 * tile, 2 * tile + 1, 3 * tile, 3 * tile + 1}
    return sorted(s for s in sizes if s >= 1)


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    detected = chainrule._C._cpu_isa_detected()
    if ISA_RANK[name] > ISA_RANK[detected]:
        pytest.skip(f"this CPU supports at most {detected}")
    previous = chainrule._C._cpu_isa()
    chainrule._C._set_cpu_isa(name)
    try:
        yield name
    finally:
        chainrule._C._set_cpu_isa(None)
        assert chainrule._C._cpu_isa() == previous


def _act(z, activation):
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    return z


def _run(x, w, b, grad_out, activation, accumulate):
    """Forward + backward through the ops: (output, grad_input, grad_weight, grad_bias)."""
    ops = torch.ops.chainrule
    out, pre = ops.linear_forward(x, w, b, activation, True)
    pre_arg = pre if activation != "none" else None
    if not accumulate:
        gx, gw, gb = ops.linear_backward(grad_out, x, w, pre_arg, activation, b is not None,
                                         [True, True, True])
        return out, gx, gw, gb if b is not None else None
    # Pre-filled buffers: the op adds into them.
    gw = torch.ones_like(w)
    gb = torch.ones_like(b) if b is not None else None
    gx = ops.linear_backward_accumulate(grad_out, x, w, pre_arg, activation, True, gw, gb)
    return out, gx, gw, gb


def _reference(x, w, b, grad_out, activation):
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = b.double().requires_grad_() if b is not None else None
    out = _act(F.linear(x, w, b), activation)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad_out.double())
    return [out.detach(), *grads] + ([None] if b is None else [])


def _torch_same_dtype(x, w, b, grad_out, activation):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    out = _act(F.linear(x, w, b), activation)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad_out)
    return [out.detach(), *grads] + ([None] if b is None else [])


def _check_case(m, k, n, dtype, activation, bias, accumulate):
    x = torch.randn(m, k, dtype=dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    grad_out = torch.randn(m, n, dtype=dtype)
    ours = _run(x, w, b, grad_out, activation, accumulate)
    ref = _reference(x, w, b, grad_out, activation)
    if accumulate:  # the buffers started at 1
        ref[2:] = [r + 1 if r is not None else None for r in ref[2:]]
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        for name, o, r in zip(names, ours, ref):
            if r is None:
                continue
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5 * max(1.0, k ** 0.5, m ** 0.5),
                                       msg=lambda s: f"{name} M={m} K={k} N={n} {activation}: {s}")
        return
    # Low precision: at most twice the error of PyTorch's own ops (plus an ulp-sized floor).
    theirs = _torch_same_dtype(x, w, b, grad_out, activation)
    if accumulate:  # what torch's AccumulateGrad does with a pre-filled low-precision .grad
        theirs[2:] = [t + 1 if t is not None else None for t in theirs[2:]]
    for name, o, t, r in zip(names, ours, theirs, ref):
        if r is None:
            continue
        scale = max(r.abs().max().item(), 1.0)
        ours_err = (o.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert o.dtype == dtype
        assert ours_err <= 2 * torch_err + 2 ** -8 * scale, \
            f"{name} M={m} K={k} N={n} {activation}: chainrule error {ours_err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tile_edges(isa, dtype):
    tile_m, tile_n = MICRO_TILE[isa]
    ms = _edge_sizes(tile_m)
    ns = _edge_sizes(tile_n)
    ks = [1, 2, 3, 16, 17, 33]
    for case, (m, n, k) in enumerate(itertools.product(ms, ns, ks)):
        # Activation, bias and accumulation rotate over the cases rather than multiplying them.
        _check_case(m, k, n, dtype, ACTIVATIONS[case % 5], bias=case % 2 == 0,
                    accumulate=case % 3 == 0)


@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_beyond_cache_blocks(isa, dtype, accumulate):
    """Several k blocks (partial sums kept between them), several m blocks and a threaded grid."""
    _check_case(301, 1100, 200, dtype, "gelu", bias=True, accumulate=accumulate)
    _check_case(40, 70, 4200, dtype, "silu", bias=True, accumulate=accumulate)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vector_activations_match_float64(activation):
    """The polynomial exp/erf/tanh inside the kernels: within 4e-7 of the exact value relative to
    max(1, |value|), or twice the error of the scalar float formula where that is ill-conditioned."""
    detected = chainrule._C._cpu_isa_detected()
    isas = [i for i in ("avx512", "avx2") if ISA_RANK[i] <= ISA_RANK[detected]]
    if not isas:
        pytest.skip("no vector path on this CPU")
    z = torch.linspace(-12, 12, 200001)
    z = torch.cat([z, torch.tensor([-100.0, 100.0, 0.0, -0.0, 1e-30, -90.0, 88.0, float("inf"),
                                    float("-inf")])])
    z64 = z.double().requires_grad_()
    exact = _act(z64, activation)
    (exact_grad,) = torch.autograd.grad(exact.sum(), z64)
    scalar_fwd = _act(z, activation)
    z32 = z.clone().requires_grad_()
    (scalar_grad,) = torch.autograd.grad(_act(z32, activation).sum(), z32)
    for isa_name in isas:
        for derivative, ref, torch_value in [(False, exact.detach(), scalar_fwd), (True, exact_grad, scalar_grad)]:
            ours = chainrule._C._cpu_simd_activation(z, activation, derivative, isa_name).double()
            finite = torch.isfinite(ref)
            scale = ref.abs().clamp(min=1.0)
            err = ((ours - ref).abs() / scale)[finite]
            torch_err = ((torch_value.double() - ref).abs() / scale)[finite]
            bound = torch.maximum(2 * torch_err, torch.full_like(torch_err, 4e-7))
            worst = (err - bound).argmax()
            assert (err <= bound).all(), \
                f"{isa_name} {activation} derivative={derivative}: error {err[worst]:.3g} at z={z[finite][worst]:.6g}"
            assert torch.equal(ours[~finite], ref[~finite]) or activation != "none"


def test_environment_override():
    code = "import chainrule; print(chainrule._C._cpu_isa(), chainrule.build_info()['cpu_simd'])"
    env = dict(os.environ, CHAINRULE_CPU_ISA="fallback")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fallback", "fallback"]


def test_forcing_an_unsupported_isa_is_an_error():
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        chainrule._C._set_cpu_isa("sse9")
    assert chainrule._C._cpu_isa() in ISAS


# --- The blocking per CPU (docs/cpu_gemm.md, "Blocking per CPU") -------------------------------

KIB, MIB = 1 << 10, 1 << 20
# The CPU the kernels' blockings were tuned on (a 2-core Zen 4 guest) and what was measured there.
TUNING_CACHES = dict(l2=1 * MIB, l3=32 * MIB, l3_shared_by=2)
TUNED = {
    ("avx512", torch.float32): dict(mr=14, nr=32, kc=1024, mc=224, nc=2048, a_block_bytes=448 * KIB),
    ("avx512", torch.bfloat16): dict(mr=14, nr=32, kc=4096, mc=224, nc=2048, a_block_bytes=448 * KIB),
    ("avx2", torch.float32): dict(mr=6, nr=16, kc=512, mc=96, nc=4096, a_block_bytes=192 * KIB),
}
DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@pytest.fixture
def described_caches():
    """_set_cpu_caches for one test; cpuid's caches again afterwards."""
    yield chainrule._C._set_cpu_caches
    chainrule._C._set_cpu_caches(reset=True)


def _blocking(dtype, threads=2):
    return chainrule._C._cpu_gemm_blocking(DTYPE_NAME[dtype], threads)


def _tuned(isa, dtype):
    """The tuned blocking of isa's kernel for dtype, or None where this CPU runs none."""
    if (isa, dtype) not in TUNED:
        return None
    if dtype == torch.bfloat16 and not chainrule._C._cpu_has_avx512_bf16():
        return None
    return TUNED[isa, dtype]


def _sysfs_caches():
    """cpu0's data caches as Linux reports them: {level: bytes}."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(root):
        return None
    sizes = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not entry.startswith("index"):
            continue
        with open(os.path.join(path, "type")) as f:
            if f.read().strip() not in ("Data", "Unified"):
                continue
        with open(os.path.join(path, "level")) as f, open(os.path.join(path, "size")) as g:
            level, size = int(f.read()), g.read().strip()
        units = {"K": KIB, "M": MIB}
        sizes[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return sizes


def test_cpuid_caches_are_the_ones_linux_reports():
    """cpuid as the kernels read it (leaf 4 on Intel, 0x8000001D on AMD) against sysfs."""
    if chainrule._C._cpu_traits()["vendor"] not in ("intel", "amd"):
        pytest.skip("chainrule reads the caches of Intel and AMD CPUs only")
    sysfs = _sysfs_caches()
    if not sysfs:
        pytest.skip("no /sys/devices/system/cpu/cpu0/cache")
    caches = chainrule.build_info()["cpu_caches"]
    reported = {1: caches["l1d"], 2: caches["l2"], 3: caches["l3"]}
    for level, size in sysfs.items():
        assert reported[level] == size, f"L{level}: cpuid {reported[level]}, sysfs {size}"
    assert caches["l2_shared_by"] >= 1 and caches["l3_shared_by"] >= (1 if 3 in sysfs else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocking_on_the_tuning_cpu_is_as_measured(isa, dtype, described_caches):
    described_caches(**TUNING_CACHES)
    assert _blocking(dtype) == _tuned(isa, dtype)
    # Fewer threads than share the L3: more L3 each, but nc never grows past the tuned one.
    tuned = _tuned(isa, dtype)
    if tuned is not None:
        assert _blocking(dtype, threads=1)["nc"] == tuned["nc"]
        described_caches(l2=0, l3=0)  # cpuid said nothing: the tuned blocking
        assert _blocking(dtype) == tuned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocking_follows_the_caches(isa, dtype, described_caches):
    tuned = _tuned(isa, dtype)
    if tuned is None:
        pytest.skip(f"no {dtype} GEMM kernel on {isa} here")
    units = tuned["kc"] // (1 if dtype == torch.float32 else 2)
    b_panel = 4 * units * tuned["nr"]
    micro_panel = 4 * units * tuned["mr"]
    fixed = {key: tuned[key] for key in ("mr", "nr", "kc", "mc")}
    for l2 in (64 * KIB, 256 * KIB, 512 * KIB, 1280 * KIB, 2 * MIB, 4 * MIB):
        described_caches(l2=l2, **{k: v for k, v in TUNING_CACHES.items() if k != "l2"})
        bl = _blocking(dtype)
        # The L2 that the B micro-panel leaves, in proportion to the tuning CPU's.
        share = tuned["a_block_bytes"] * max(l2 - b_panel, 0) // (TUNING_CACHES["l2"] - b_panel)
        assert bl["a_block_bytes"] == max(share, micro_panel), f"L2 {l2}"
        assert (bl["a_block_bytes"] > tuned["a_block_bytes"]) == (l2 > TUNING_CACHES["l2"])
        assert {key: bl[key] for key in fixed} == fixed and bl["nc"] == tuned["nc"]
    # L3: (bytes, threads sharing it, GEMM threads) -> the share of the tuned nc.
    for l3, shared_by, threads, fraction in [(8 * MIB, 2, 2, 1 / 4), (32 * MIB, 16, 16, 1 / 8),
                                             (32 * MIB, 16, 2, 1), (256 * MIB, 2, 2, 1),
                                             (6 * MIB, 2, 2, 3 / 16), (64 * KIB, 1, 1, 0)]:
        described_caches(l2=TUNING_CACHES["l2"], l3=l3, l3_shared_by=shared_by)
        bl = _blocking(dtype, threads=threads)
        nc = int(tuned["nc"] * fraction) // tuned["nr"] * tuned["nr"]
        assert bl["nc"] == max(nc, tuned["nr"]), f"L3 {l3} / {shared_by}, {threads} threads"
        assert bl["a_block_bytes"] == tuned["a_block_bytes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_the_blocking(isa, dtype, described_caches):
    """Small caches give many more m and n blocks; kc stays, so every sum is the same, bit for bit:
    the plain product and the layer's forward and backward on our GEMM."""
    if _tuned(isa, dtype) is None:
        pytest.skip(f"no {dtype} GEMM kernel on {isa} here")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(301, 1100, generator=g).to(dtype)
    b = torch.randn(1100, 700, generator=g).to(dtype)
    x, w = a, (b.t().contiguous() / 33)
    bias = torch.randn(700, generator=g).to(dtype)
    grad_out = torch.randn(301, 700, generator=g).to(dtype)
    results = []
    chainrule._C._set_cpu_gemm("ours")
    try:
        for caches in (TUNING_CACHES, dict(l2=64 * KIB, l3=1 * MIB, l3_shared_by=2)):
            described_caches(**caches)
            blocking = _blocking(dtype)
            results.append((blocking, [chainrule._C._cpu_gemm(a, b),
                                       *_run(x, w, bias, grad_out, "gelu", accumulate=True)]))
    finally:
        chainrule._C._set_cpu_gemm(None)
    (tuned, expected), (small, got) = results
    assert small["nc"] < tuned["nc"] and small["a_block_bytes"] < tuned["a_block_bytes"]
    for name, e, o in zip(["product", "output", "grad_input", "grad_weight", "grad_bias"], expected, got):
        assert torch.equal(e, o), f"{name} changed with the blocking"


def test_describing_caches_is_checked(described_caches):
    with pytest.raises(RuntimeError, match=r"_set_cpu_caches: sizes must be >= 0.*l2=-1"):
        described_caches(l2=-1)
