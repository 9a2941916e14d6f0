"""Quick interleaved check of the CPU GEMM against PyTorch (the full suite is benchmarks/bench_*.py).

    PYTHONPATH=python python benchmarks/gemm_quick_check.py [--repeats 5] [--only linear|gemm]

Each row times chainrule and torch alternately in one process (ours, theirs, ours, ...) after a
warm-up, and reports medians, so a neighbour's load hits both sides alike. Rates are also given
per CPU-second of this process, which load from other processes does not distort.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import chainrule
from chainrule.functional import linear


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns, repeats):
    for fn in fns:
        fn()
    walls = [[] for _ in fns]
    cpus = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            w, c = timed(fn)
            walls[i].append(w)
            cpus[i].append(c)
    return [statistics.median(w) for w in walls], [statistics.median(c) for c in cpus]


def linear_case(m, k, n, dtype, repeats, compiled=False):
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    w, b = lin.weight, lin.bias
    g = torch.randn(m, n, dtype=dtype)

    def ours():
        y = linear(x, w, b, "gelu")
        y.backward(g)

    def eager():
        y = F.gelu(lin(x))
        y.backward(g)

    fns = [ours, eager]
    names = ["chainrule", "eager"]
    if compiled:
        step = torch.compile(lambda inp: F.gelu(lin(inp)))

        def comp():
            step(x).backward(g)

        fns.append(comp)
        names.append("compile")
    walls, cpus = interleaved(fns, repeats)
    flops = 3 * 2.0 * m * n * k
    row = f"linear+gelu fwd+bwd {str(dtype)[6:]:8s} M={m:<5d} K={k:<5d} N={n:<5d} |"
    for name, wt, ct in zip(names, walls, cpus):
        row += f" {name} {wt * 1e3:8.1f} ms ({flops / wt / 1e9:5.0f} GF/s wall, {flops / ct / 1e9:5.0f} /cpu-s) |"
    for name, wt in zip(names[1:], walls[1:]):
        row += f" vs {name} x{wt / walls[0]:.2f}"
    print(row, flush=True)


def gemm_case(s, repeats):
    a = torch.randn(s, s)
    b = torch.randn(s, s)
    torch.testing.assert_close(chainrule._C._cpu_gemm(a, b), a @ b, rtol=1e-4, atol=1e-3)
    walls, cpus = interleaved([lambda: chainrule._C._cpu_gemm(a, b), lambda: torch.mm(a, b)], repeats)
    flops = 2.0 * s ** 3
    print(f"gemm fp32 {s}^3 | chainrule {walls[0] * 1e3:.1f} ms {flops / walls[0] / 1e9:.0f} GF/s "
          f"({flops / cpus[0] / 1e9:.0f} per cpu-s) | torch.mm {walls[1] * 1e3:.1f} ms "
          f"{flops / walls[1] / 1e9:.0f} GF/s ({flops / cpus[1] / 1e9:.0f} per cpu-s) | x{walls[1] / walls[0]:.2f}",
          flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["linear", "gemm", "bf16", "compile"], default=None)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, chainrule CPU ISA {chainrule._C._cpu_isa()}", flush=True)
    if args.only in (None, "gemm"):
        gemm_case(2048, args.repeats)
    if args.only in (None, "linear"):
        linear_case(4096, 1024, 4096, torch.float32, args.repeats)
        linear_case(512, 768, 3072, torch.float32, args.repeats)
        linear_case(64, 1024, 1024, torch.float32, max(args.repeats, 20))
    if args.only == "compile":
        linear_case(4096, 1024, 4096, torch.float32, args.repeats, compiled=True)
    if args.only in (None, "bf16"):
        linear_case(4096, 1024, 4096, torch.bfloat16, args.repeats)


if __name__ == "__main__":
    main()
