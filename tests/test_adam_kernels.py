"""The fused multi-tensor Adam kernels themselves (issue 5's acceptance 2-5).

* the CPU kernel and the CUDA kernel under the emulator give bitwise identical float32 params and
  states, over 50 steps, on 20 tensors of awkward sizes and alignments, for each option set;
* a step over 10 000 tensors is one kernel launch and matches 10 000 single-tensor steps;
* found_inf != 0 changes nothing (steps included); capturable steps read nothing on the host;
* bfloat16 params with float32 master weights track a float32 training run.

The optimizer-level suite (chainrule.optim against torch.optim) is tests/test_adam.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import chainrule
from chainrule.backends import emulated_cuda, emulated_launch_count, emulator_available

needs_emulator = pytest.mark.skipif(not emulator_available(),
                                    reason="chainrule was built without the CUDA emulator")

# Odd sizes on purpose: 1, 3, primes, one past and one short of the vector widths and of the
# kernel's chunk (16384 elements), and a million-element tensor that spans many chunks.
SIZES = [1, 3, 1000003, 5, 7, 15, 16, 17, 31, 33, 127, 129, 1023, 1025, 4095, 4097, 16383, 16385,
         65537, 8]

# Every option and its interactions; each set runs 50 steps on both backends.
OPTION_SETS = {
    "adam": dict(),
    "adam_l2": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "amsgrad_l2": dict(amsgrad=True, weight_decay=0.05),
    "maximize_adamw": dict(maximize=True, weight_decay=0.1, decoupled_weight_decay=True),
    "grad_scale_l2": dict(grad_scale=65536.0, weight_decay=0.01),
    "grad_scale_odd": dict(grad_scale=3.0),  # not a power of two: the unscale rounds
    "tensor_lr_amsgrad_maximize": dict(lr="tensor", amsgrad=True, maximize=True),
    "everything": dict(lr="tensor", amsgrad=True, maximize=True, weight_decay=0.1,
                       decoupled_weight_decay=True, grad_scale=1024.0),
}


def offset_view(n, offset, dtype, generator=None, fill=None):
    """A contiguous 1-D tensor of n elements starting `offset` elements into its storage, so its
    address is not 16-byte aligned when offset is not a multiple of 16 / itemsize."""
    if fill is None:
        base = torch.randn(n + offset, generator=generator).to(dtype)
    else:
        base = torch.full((n + offset,), fill, dtype=dtype)
    return base[offset:]


def make_state(sizes, dtype=torch.float32, amsgrad=False, master=False, seed=0, misalign=True):
    """Op arguments for `sizes`; tensor i is offset by i % 4 elements (every pointer alike: the
    kernel's scalar head), and every fifth tensor's states by one more (no common alignment: the
    kernel's scalar path)."""
    g = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                            "state_steps", "master_params")}
    for i, n in enumerate(sizes):
        shift = i % 4 if misalign else 0
        state_shift = shift + (1 if misalign and i % 5 == 4 else 0)
        param = offset_view(n, shift, dtype, g)
        args["params"].append(param)
        args["grads"].append(offset_view(n, shift, dtype, g) * 0.1)
        args["exp_avgs"].append(offset_view(n, state_shift, state_dtype, fill=0.0))
        args["exp_avg_sqs"].append(offset_view(n, state_shift, state_dtype, fill=0.0))
        if amsgrad:
            args["max_exp_avg_sqs"].append(offset_view(n, state_shift, state_dtype, fill=0.0))
        args["state_steps"].append(torch.zeros((), dtype=torch.float32))
        if master:
            m = offset_view(n, shift, torch.float32, fill=0.0)
            m.copy_(param.float())
            args["master_params"].append(m)
    return args


def clone_state(args):
    out = {}
    for key, tensors in args.items():
        out[key] = []
        for t in tensors:
            # Keep the storage offset (and so the alignment) of every view.
            base = t._base if t._base is not None else t
            base_copy = base.clone()
            out[key].append(base_copy.as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def new_grads(args, step, seed):
    """Fresh gradients at new addresses, as after zero_grad(set_to_none=True)."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    args["grads"] = [(torch.randn(p.numel(), generator=g) * 0.1).to(p.dtype) for p in args["params"]]


def adam_step(args, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
              maximize=False, decoupled_weight_decay=False, grad_scale=None, found_inf=None):
    if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
        grad_scale = torch.tensor(grad_scale, dtype=torch.float32)
    torch.ops.chainrule.adam_(
        args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
        args["max_exp_avg_sqs"], args["state_steps"], args["master_params"], lr=lr, beta1=beta1,
        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale, found_inf=found_inf)


def resolve(options):
    options = dict(options)
    if options.get("lr") == "tensor":
        options["lr"] = torch.tensor(2e-3, dtype=torch.float32)
    return options


def assert_bitwise_equal(a, b):
    for key in a:
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert torch.equal(x.view(-1).view(torch.uint8) if x.dtype != torch.float64 else x,
                               y.view(-1).view(torch.uint8) if y.dtype != torch.float64 else y), \
                f"{key}[{i}] (numel {x.numel()}) differs"


# ---------------------------------------------------------------------------------------------
# Acceptance 2: CPU and emulated CUDA agree to the bit.

@needs_emulator
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_cpu_and_emulated_cuda_are_bitwise_identical_over_50_steps(options):
    kwargs = resolve(OPTION_SETS[options])
    cpu = make_state(SIZES, amsgrad=kwargs.get("amsgrad", False))
    emulated = clone_state(cpu)
    for step in range(50):
        # Half the steps bring gradients at new addresses (the cached metadata's grads region).
        if step % 2 == 1:
            new_grads(cpu, step, 1)
            emulated["grads"] = [g.clone() for g in cpu["grads"]]
        adam_step(cpu, **kwargs)
        with emulated_cuda():
            adam_step(emulated, **kwargs)
    assert float(cpu["state_steps"][0]) == float(emulated["state_steps"][0]) == 50
    assert_bitwise_equal(cpu, emulated)


def to_device(args, device):
    return {k: [t.to(device) for t in v] for k, v in args.items()}


@pytest.mark.skipif(not torch.cuda.is_available() or not chainrule.build_info()["cuda_compiled"],
                    reason="no CUDA device, or chainrule built without its CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_cpu_and_gpu_are_bitwise_identical(options, dtype):
    """The same comparison on a real GPU: needs nvcc to honour --fmad=false for adam.cu."""
    kwargs = resolve(OPTION_SETS[options])
    cpu = make_state(SIZES, dtype=dtype, amsgrad=kwargs.get("amsgrad", False),
                     master=dtype != torch.float32)
    gpu = to_device(cpu, "cuda")
    gpu_kwargs = dict(kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        gpu_kwargs["lr"] = kwargs["lr"].cuda()
    if "grad_scale" in kwargs:
        gpu_kwargs["grad_scale"] = torch.tensor(kwargs["grad_scale"], device="cuda")
    for _ in range(50):
        adam_step(cpu, **kwargs)
        adam_step(gpu, **gpu_kwargs)
    assert_bitwise_equal(cpu, to_device(gpu, "cpu"))


@needs_emulator
@pytest.mark.parametrize("dtype,master", [(torch.bfloat16, True), (torch.bfloat16, False),
                                          (torch.float16, True), (torch.float16, False),
                                          (torch.float64, False)], ids=str)
def test_low_precision_and_float64_bitwise_identical(dtype, master):
    sizes = [1, 3, 17, 1025, 16385, 40001]
    kwargs = dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True, grad_scale=8.0)
    cpu = make_state(sizes, dtype=dtype, amsgrad=True, master=master)
    emulated = clone_state(cpu)
    for step in range(5):
        adam_step(cpu, **kwargs)
        with emulated_cuda(schedule="random", seed=step):
            adam_step(emulated, **kwargs)
    assert_bitwise_equal(cpu, emulated)
    if master:
        for p, m in zip(cpu["params"], cpu["master_params"]):
            assert torch.equal(p, m.to(dtype))


@needs_emulator
def test_mixed_dtypes_in_one_call():
    """float32, bfloat16 and float16 params share one launch; float64 ones get their own."""
    sizes = [5, 1000, 33, 4097]
    parts = [make_state(sizes[i:i + 1], dtype=dt, seed=i)
             for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64])]
    args = {k: [t for part in parts for t in part[k]] for k in parts[0]}
    emulated = clone_state(args)
    adam_step(args)
    before = emulated_launch_count()
    with emulated_cuda():
        adam_step(emulated)
    assert emulated_launch_count() - before == 2
    assert_bitwise_equal(args, emulated)


@needs_emulator
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_tensor_lr_of_any_float_dtype(lr_dtype):
    cpu = make_state([1, 3, 1025])
    emulated = clone_state(cpu)
    lr = torch.tensor(3e-3, dtype=lr_dtype)
    adam_step(cpu, lr=lr)
    with emulated_cuda():
        adam_step(emulated, lr=lr)
    assert_bitwise_equal(cpu, emulated)


def _isa_digest(isa):
    """Runs 5 steps in a subprocess with CHAINRULE_CPU_ISA=isa; returns a digest of the bits."""
    code = (
        "import hashlib, torch, chainrule, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_adam_kernels import make_state, adam_step\n"
        "for dtype, master in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, False)):\n"
        "    a = make_state([1, 3, 17, 1031, 40000], dtype=dtype, amsgrad=True, master=master)\n"
        "    for _ in range(5):\n"
        "        adam_step(a, amsgrad=True, weight_decay=0.1, grad_scale=4.0)\n"
        "    h = hashlib.sha256()\n"
        "    for k in a:\n"
        "        for t in a[k]:\n"
        "            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())\n"
        "    print(h.hexdigest())\n" % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CHAINRULE_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_every_cpu_isa_gives_the_same_bits():
    """The AVX-512, AVX2 and portable loops all evaluate adam_update_element exactly."""
    import torch.backends.cpu as cpu_backends
    capability = cpu_backends.get_cpu_capability()
    isas = ["fallback"]
    if capability in ("AVX2", "AVX512"):
        isas.append("avx2")
    if capability == "AVX512":
        isas.append("avx512")
    if len(isas) == 1:
        pytest.skip(f"only the portable loop runs on this CPU ({capability})")
    digests = {isa: _isa_digest(isa) for isa in isas}
    assert len({tuple(d) for d in digests.values()}) == 1, digests


# ---------------------------------------------------------------------------------------------
# Acceptance 3: any number of tensors in one launch.

@needs_emulator
def test_ten_thousand_tensors_are_one_launch():
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 80, (10_000,), generator=g).tolist()
    options = dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True)
    multi = make_state(sizes, amsgrad=True, misalign=False)
    single = clone_state(multi)
    for step in range(2):
        before = emulated_launch_count()
        with emulated_cuda():
            adam_step(multi, **options)
        assert emulated_launch_count() - before == 1
        # The reference: one op call per tensor (CPU kernel; it agrees with the emulated kernel
        # to the bit, see above), and a sample of single-tensor emulated launches.
        for i in range(len(sizes)):
            one = {k: v[i:i + 1] for k, v in single.items()}
            if i % 1000 == 0:
                with emulated_cuda():
                    adam_step(one, **options)
            else:
                adam_step(one, **options)
    assert_bitwise_equal(multi, single)
    assert all(float(s) == 2 for s in multi["state_steps"])


# ---------------------------------------------------------------------------------------------
# Acceptance 4: GradScaler's found_inf, and capturable steps.

BACKENDS = ["cpu", pytest.param("emulated_cuda", marks=needs_emulator)]


def maybe_emulated(backend):
    import contextlib
    return emulated_cuda() if backend == "emulated_cuda" else contextlib.nullcontext()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_found_inf_changes_nothing_not_even_step(backend, dtype, master):
    args = make_state([1, 3, 1000, 16385], dtype=dtype, amsgrad=True, master=master)
    with maybe_emulated(backend):
        adam_step(args, amsgrad=True, weight_decay=0.1)
    snapshot = clone_state(args)
    with maybe_emulated(backend):
        adam_step(args, amsgrad=True, weight_decay=0.1, grad_scale=2.0,
                  found_inf=torch.ones((), dtype=torch.float32))
    assert_bitwise_equal(args, snapshot)
    assert all(float(s) == 1 for s in args["state_steps"])
    with maybe_emulated(backend):
        adam_step(args, amsgrad=True, weight_decay=0.1, found_inf=torch.zeros(()))
    assert all(float(s) == 2 for s in args["state_steps"])
    assert not torch.equal(args["params"][2], snapshot["params"][2])


class HostReadSpy(TorchDispatchMode):
    """Records every op that would read a tensor's value on the host or copy between devices."""

    HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.host_reads = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func._schema.name
        name = base + ("." + func._schema.overload_name if func._schema.overload_name else "")
        self.ops.append(name)
        if base in self.HOST_READS:
            self.host_reads.append(name)
        if base in ("aten::_to_copy", "aten::copy_", "aten::to"):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]))
            if len(devices) > 1:
                self.host_reads.append(f"{name} across {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_host_read_spy_sees_host_reads():
    spy = HostReadSpy()
    with spy:
        torch.ones(()).item()
        torch.ones(2).to("meta")
    assert spy.host_reads[0] == "aten::_local_scalar_dense"
    assert len(spy.host_reads) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_step_reads_nothing_on_the_host(backend):
    torch.manual_seed(0)
    params = [torch.randn(n, requires_grad=True) for n in (1, 3, 1000, 17)]
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2)
    opt = chainrule.optim.AdamW(params, lr=lr, capturable=True, amsgrad=True)
    reference = chainrule.optim.AdamW(reference_params, lr=1e-2, amsgrad=True)
    for step in range(3):
        for p, r in zip(params, reference_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.grad_scale = torch.tensor(4.0)
        opt.found_inf = torch.zeros(())
        for p in params:
            p.grad.mul_(4.0)
        spy = HostReadSpy()
        with maybe_emulated(backend), spy:
            opt.step()
        assert "chainrule::adam_.tensor_lr" in spy.ops, sorted(set(spy.ops))
        assert spy.host_reads == [], spy.host_reads
        with maybe_emulated(backend):
            reference.step()
    # The tensor lr and in-kernel unscale give the same bits as a float lr on unscaled grads
    # (a power-of-two scale is exact; float32 lr 1e-2 is what the float path rounds to as well).
    for p, r in zip(params, reference_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


# ---------------------------------------------------------------------------------------------
# Acceptance 5: bfloat16 params with float32 master weights track a float32 run.

@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_master_weights_track_float32_training(backend):
    g = torch.Generator().manual_seed(5)
    features, samples = 32, 256
    x = torch.randn(samples, features, generator=g)
    true_w = torch.randn(features, 1, generator=g)
    y = x @ true_w + 0.01 * torch.randn(samples, 1, generator=g)
    w0 = torch.randn(features, 1, generator=g) * 0.1

    def train(dtype, master_weights, steps=200):
        w = w0.clone().to(dtype).requires_grad_()
        opt = chainrule.optim.Adam([w], lr=1e-2, master_weights=master_weights)
        for _ in range(steps):
            opt.zero_grad()
            # The gradient of the model the params define, computed in float32.
            loss = ((x @ w.float() - y) ** 2).mean()
            loss.backward()
            with maybe_emulated(backend):
                opt.step()
        master = opt.state[w].get("master_param")
        return w.detach(), master, loss.item()

    reference, _, reference_loss = train(torch.float32, False)
    w_bf16, master, loss = train(torch.bfloat16, True)
    # The param is always the rounding of its master copy.
    assert torch.equal(w_bf16, master.to(torch.bfloat16))
    # The master tracks the float32 run within bfloat16 rounding of the weights (2^-8 relative):
    # the only difference between the runs is that the forward pass sees the rounded weights.
    bf16_rounding = 2.0 ** -8 * reference.abs().max()
    assert (master - reference).abs().max() <= bf16_rounding, (master - reference).abs().max()
    assert loss <= reference_loss * 1.05 + 1e-4
    # Without master weights, updates below half a bfloat16 ulp are lost: the float32 master is
    # what makes bf16 training follow the float32 one.
    w_plain, _, _ = train(torch.bfloat16, False)
    assert (w_plain.float() - reference).abs().max() > (master - reference).abs().max()
