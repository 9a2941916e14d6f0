#!/usr/bin/env python3
"""Quick side-by-side check of the CPU Adam kernel (issue 6, acceptance 5).

fp32: chainrule.adam_ against torch's fused CPU Adam (torch._fused_adam_, what
torch.optim.Adam(fused=True) calls) on 16M params in 50 tensors, same thread count, interleaved
call by call. bf16: bfloat16 params with float32 master weights and moments (28 B/param: read
grad 2, master 4, exp_avg 4, exp_avg_sq 4; write master 4, exp_avg 4, exp_avg_sq 4, param 2).

Two clocks, because this machine is shared: wall time (what a user waits; sensitive to other
processes taking the cores, and to how many parallel regions a kernel opens: torch opens one per
tensor, chainrule one per step) and, single-threaded, the thread's CPU time (the inner loop's own
speed while it runs). Ratios are medians of per-pair ratios (each pair runs back to back).

    python benchmarks/adam_quick_check.py [--params 16e6] [--tensors 50] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# This checkout's build (make dev) when there is one, else the installed package.
_SOURCE = Path(__file__).resolve().parent.parent / "python"
if list((_SOURCE / "chainrule").glob("_C*.so")):
    sys.path.insert(0, str(_SOURCE))
import chainrule  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
             maximize=False)


def sizes_for(params, tensors):
    sizes = [params // tensors] * tensors
    sizes[-1] += params - sum(sizes)
    return sizes


def make(sizes, dtype=torch.float32, master=False):
    params = [torch.randn(n).to(dtype) for n in sizes]
    return dict(params=params, grads=[(torch.randn(n) * 1e-2).to(dtype) for n in sizes],
                exp_avgs=[torch.randn(n) * 1e-3 for n in sizes],
                exp_avg_sqs=[torch.rand(n) * 1e-5 for n in sizes],
                state_steps=[torch.zeros(()) for _ in sizes],
                master_params=[p.float() for p in params] if master else [])


def chainrule_step(s):
    torch.ops.chainrule.adam_(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], [],
                              s["state_steps"], s["master_params"], decoupled_weight_decay=False,
                              **HYPER)


def torch_step(s):
    torch._fused_adam_(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], [],
                       s["state_steps"], **HYPER)


def interleaved(a, b, repeats, clock):
    for _ in range(2):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = clock(); a(); t1 = clock(); b(); t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return ta, tb


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=16e6)
    p.add_argument("--tensors", type=int, default=50)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    n = int(args.params)
    sizes = sizes_for(n, args.tensors)
    print(f"{n / 1e6:.0f}M params in {args.tensors} tensors; torch {torch.__version__}; "
          f"chainrule from {Path(chainrule.__file__).parent}")
    print(f"{'config':<44} | {'chainrule ms':>12} | {'torch ms':>9} | {'ratio':>5} | chainrule GB/s")
    ours, theirs = make(sizes), make(sizes)
    for threads, clock, clock_name in ((2, time.perf_counter, "wall"), (1, time.perf_counter, "wall"),
                                       (1, time.thread_time, "thread CPU")):
        torch.set_num_threads(threads)
        to, tt = interleaved(lambda: chainrule_step(ours), lambda: torch_step(theirs), args.repeats, clock)
        ratio = statistics.median(b / a for a, b in zip(to, tt))
        mo, mt = statistics.median(to), statistics.median(tt)
        print(f"{f'fp32, {threads} thread(s), {clock_name}':<44} | {mo * 1e3:12.2f} | {mt * 1e3:9.2f} | "
              f"{ratio:5.2f} | {28 * n / mo / 1e9:.1f}")
    del ours, theirs
    bf16 = make(sizes, torch.bfloat16, master=True)
    for threads, clock, clock_name in ((2, time.perf_counter, "wall"), (1, time.thread_time, "thread CPU")):
        torch.set_num_threads(threads)
        times, _ = interleaved(lambda: chainrule_step(bf16), lambda: None, args.repeats, clock)
        m = statistics.median(times)
        print(f"{f'bf16 + fp32 master, {threads} thread(s), {clock_name}':<44} | {m * 1e3:12.2f} | "
              f"{'':>9} | {'':>5} | {28 * n / m / 1e9:.1f}")


if __name__ == "__main__":
    main()
