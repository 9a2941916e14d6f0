#!/usr/bin/env python3
"""Fused Adam: one chainrule.optim.Adam step against torch.optim.Adam with foreach=True and with
fused=True, over total parameter counts (1e5 ... 1e8) split into 1 ... 10 000 tensors.

Every contender owns its parameters and optimizer state (same initial values); the gradients are
shared and fixed, so each timed call is exactly one optimizer step. Bytes moved per parameter:
fp32 28 (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq). GB/s and
"% of peak" are against the Adam-like read-modify-write bandwidth measured by bench_machine.py.

bf16 rows: bfloat16 parameters and gradients with float32 master weights and moments
(chainrule's master_weights=True). The baseline is what that takes in plain torch: a fused fp32
Adam on float32 master copies (gradients converted to float32 first) and a copy back into the
bfloat16 parameters. Bytes per parameter: grad 2 + moments 16 + master 8 + param write 2 = 28.

Host cost row (quick and full modes, fp32): 1000 tensors of 1000 elements each against
torch.optim.Adam(fused=True) alone, in ms per step. At this size the step is mostly per-tensor
host work (gathering the lists, the op call's argument conversion, argument checks); the target
is <= 2 ms per step.

--shapes takes PARAMSxTENSORS, e.g. 16e6x50,1e6x1000.
"""
from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402

BYTES_PER_PARAM = {torch.float32: 28, torch.bfloat16: 28}
TARGET = (16_000_000, 50)
HOST_COST = (1000, 1000)  # tensors, elements per tensor (smoke mode: 10 x 100)


def shapes_for(s: harness.Settings) -> list[tuple[int, int]]:
    if s.args.shapes:
        return harness.parse_shapes(s.args.shapes, 2)
    if s.mode == "smoke":
        return [(1000, 3)]
    if s.mode == "quick":
        return [TARGET, (1_000_000, 1), (1_000_000, 1000)]
    out = []
    for params in (100_000, 1_000_000, 10_000_000, 100_000_000):
        for tensors in (1, 10, 100, 1000, 10_000):
            if params // tensors >= 10:
                out.append((params, tensors))
    out.append(TARGET)
    return sorted(set(out))


def count(n: int) -> str:
    """16000000 -> '16M', 100000 -> '100k'."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= scale and n % (scale // 10) == 0:
            return f"{n / scale:g}{suffix}"
    return str(n)


def split(params: int, tensors: int) -> list[int]:
    """Tensor sizes that sum to params, uneven (as a model's are): a repeating 1:2:3 pattern."""
    weights = [1 + i % 3 for i in range(tensors)]
    total = sum(weights)
    sizes = [params * w // total for w in weights]
    sizes[-1] += params - sum(sizes)
    return sizes


def make_params(sizes, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
            .requires_grad_() for n in sizes]


def fp32_config(sizes, device, chainrule, s, baselines=("foreach", "fused")):
    """Contenders and a check for fp32 parameters."""
    grads = make_params(sizes, torch.float32, device, seed=1)
    sets = {name: make_params(sizes, torch.float32, device, seed=0)
            for name in ("chainrule", *baselines)}
    for params in sets.values():
        for p, g in zip(params, grads):
            p.grad = g.detach()
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizers = {"chainrule": chainrule.optim.Adam(sets["chainrule"], **hyper)}
    for name in baselines:
        optimizers[name] = torch.optim.Adam(sets[name], **{name: True}, **hyper)
    # The check: one step of chainrule and of torch's fused Adam from the same state, compared;
    # it is also each optimizer's first (state-allocating) step, so timing starts warm.
    with torch.no_grad():
        for opt in optimizers.values():
            opt.step()
    check = harness.check_close([p for p in sets["chainrule"]], [p for p in sets["fused"]],
                                torch.float32, names=[f"param {i}" for i in range(len(sizes))],
                                tolerance=1e-5)
    contenders = [harness.Contender(name, lambda _, o=opt: o.step())
                  for name, opt in optimizers.items()]
    return contenders, check, (grads, sets, optimizers)


def bf16_master_config(sizes, device, chainrule, s):
    """bfloat16 params with float32 master weights: chainrule's master_weights=True against a fused
    fp32 torch Adam on master copies + a copy back into the bf16 params."""
    grads = make_params(sizes, torch.bfloat16, device, seed=1)
    ours = make_params(sizes, torch.bfloat16, device, seed=0)
    theirs = make_params(sizes, torch.bfloat16, device, seed=0)
    masters = [p.detach().float().requires_grad_() for p in theirs]
    for p, g in zip(ours, grads):
        p.grad = g.detach()
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ours_opt = chainrule.optim.Adam(ours, master_weights=True, **hyper)
    theirs_opt = torch.optim.Adam(masters, fused=True, **hyper)

    @torch.no_grad()
    def torch_master_step(_=None):
        for master, g in zip(masters, grads):
            master.grad = g.float()
        theirs_opt.step()
        torch._foreach_copy_(theirs, masters)

    with torch.no_grad():
        ours_opt.step()
    torch_master_step()
    ours_masters = [ours_opt.state[p]["master_param"] for p in ours]
    master_check = harness.check_close(ours_masters, masters, torch.float32, tolerance=1e-5,
                                       names=[f"master {i}" for i in range(len(sizes))])
    # The bf16 params are the rounded masters: at most one bf16 ulp apart.
    param_check = harness.check_close(ours, theirs, torch.bfloat16, tolerance=2.0**-7,
                                      names=[f"param {i}" for i in range(len(sizes))])
    check = master_check if not master_check.ok else param_check
    check.detail = f"masters: {master_check.max_error:.1e}; bf16 params: {param_check.max_error:.1e}"
    contenders = [harness.Contender("chainrule", lambda _: ours_opt.step()),
                  harness.Contender("fused+copy", torch_master_step)]
    return contenders, check, (grads, ours, theirs, masters, ours_opt, theirs_opt)


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="comma-separated PARAMSxTENSORS, e.g. 16e6x50",
                       default_dtypes="float32,bfloat16")
    args = p.parse_args(argv)
    s = harness.settings("adam", args, repeats=(1, 5, 11), warmup=(0, 1, 3))
    rows, peaks = [], None
    if s.available:
        chainrule = harness.import_chainrule()
        peaks = harness.load_peaks(s)
        configs = []
        for dtype in s.dtypes:
            for params, tensors in shapes_for(s):
                # bf16 master-weight rows: the target size only, unless shapes are asked for
                if dtype == torch.bfloat16 and s.mode in ("quick", "full") and not args.shapes \
                        and (params, tensors) != TARGET:
                    continue
                configs.append((params, tensors, dtype, False))
            if dtype == torch.float32 and not args.shapes:
                tensors, elements = HOST_COST if s.mode in ("quick", "full") else (10, 100)
                configs.append((tensors * elements, tensors, dtype, True))
        for params, tensors, dtype, host_cost in harness.progress(configs, s, "adam"):
            if dtype not in (torch.float32, torch.bfloat16):
                raise SystemExit("bench_adam: --dtype float32 and/or bfloat16")
            if host_cost:
                sizes = [params // tensors] * tensors
                build = functools.partial(fp32_config, baselines=("fused",))
            else:
                sizes = split(params, tensors)
                build = fp32_config if dtype == torch.float32 else bf16_master_config
            built = []

            def build_and_check():
                built.append(build(sizes, s.device, chainrule, s))
                return built[0][1]

            check = harness.guarded(build_and_check)
            # chainrule raising while the configuration is built leaves nothing to time
            contenders, keep = (built[0][0], built[0][2]) if built else ([], None)
            with torch.no_grad():
                cpu_times: dict = {}
                times = harness.measure(contenders if check.ok else contenders[1:],
                                        repeats=s.repeats, warmup=s.warmup, device=s.device,
                                        cpu_times=cpu_times)
            peak, peak_name = harness.peak_for(peaks, s.device, dtype, "bandwidth")
            bytes_per_param = BYTES_PER_PARAM[dtype]
            label = f"{count(params)} params / {tensors} tensors {harness.dtype_name(dtype)}"
            if dtype == torch.bfloat16:
                label += " master"
            if host_cost:
                label = f"{tensors} tensors x {params // tensors} {harness.dtype_name(dtype)} step"
            rows.append(harness.make_row(
                subject="adam", label=label, size=float(params), times=times, check=check,
                work=float(bytes_per_param * params), unit="GB/s", peak=peak, peak_name=peak_name,
                cpu_times=cpu_times, threads=s.threads,
                config={"params": params, "tensors": tensors, "dtype": harness.dtype_name(dtype),
                        "master_weights": dtype == torch.bfloat16, "device": str(s.device),
                        "bytes_per_param": bytes_per_param, "host_cost": host_cost},
                extra={"series": f"{harness.dtype_name(dtype)}"
                                 f"{' master' if dtype == torch.bfloat16 else ''} {tensors} tensors"
                                 f"{' even' if host_cost else ''}",
                       "note": ("target; " if (params, tensors) == TARGET and not host_cost else "")
                               + ("host cost, target <= 2 ms at 1000 x 1000; " if host_cost else "")
                               + f"{bytes_per_param} B/param"}))
            del contenders, keep
            gc.collect()
    harness.write_results(s, rows, peaks=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
