#!/usr/bin/env python3
"""Shape sweep of the linear layer: chainrule.nn.Linear against eager nn.Linear + activation at
every (M, K, N) of a grid, to show that no shape is slower than PyTorch.

Grid (full): M in {1, 8, 33, 128, 512, 4096} (decoding, small batches, odd rows, training
batches) x (K, N) in {64x64, 1024x1024, 768x3072, 4096x1024, 769x255} = 30 shapes, each in
float32 and bfloat16, activation none and gelu, forward alone and forward+backward: 240 rows;
and for M <= 8 the forward under torch.no_grad() ("infer", decoding): 40 rows more.
--quick (what `make bench` runs): M in {1, 33, 512} x (1024x1024, 769x255), both dtypes, gelu.

Each row names the GEMM chainrule took for that call (`path`: ours, aten, gemv or torch, from
chainrule.backends.cpu_gemm_path, forward / backward). Small calls are timed in batches of
several calls per repeat so the timer's resolution does not matter; the cache is flushed before
each batch. Many short repeats (41 of about 2 ms of work each in the full sweep) rather than a few
long ones: the median then moves less with this machine's noise (a 2-core VM's neighbours).

Both sides of a row read the same weight, bias, input and output-gradient tensors (see
bench_linear.build_sides: with copies of their own, where each copy lands in memory moves identical
ops by a few per cent). Two control rows time eager torch against itself, interleaved the same way:
what their ratio misses 1.00x by is the run's noise floor, printed with the summary and left out
of its count.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_linear  # noqa: E402
import harness  # noqa: E402

ROWS_M = (1, 8, 33, 128, 512, 4096)
KN = ((64, 64), (1024, 1024), (768, 3072), (4096, 1024), (769, 255))
QUICK_M = (1, 33, 512)
QUICK_KN = ((1024, 1024), (769, 255))
PASSES = ("fwd", "fwd+bwd")
# Rows of at most this many input rows also time "infer", the forward under torch.no_grad()
# (decoding): the pass that chainrule's GEMV takes (docs/cpu_gemm.md, "Small batches: the GEMV").
INFER_MAX_M = 8
# Work per timed repeat, at most this many calls: ~2 ms at 100 GFLOP/s.
WORK_PER_REPEAT = 2e8
MAX_CALLS = 200
# The A/A control rows (M, K, N, activation, pass), float32: a tiny layer and a mid-sized one.
CONTROLS = ((1, 64, 64, "gelu", "fwd"), (128, 1024, 1024, "none", "fwd+bwd"))
CONTROL_PATH = "control"


def grid(s: harness.Settings, shapes) -> list[bench_linear.Config]:
    if shapes is None:
        if s.mode == "smoke":
            shapes = [(1, 64, 64), (33, 769, 255)]
        elif s.mode == "quick":
            shapes = [(m, k, n) for m in QUICK_M for k, n in QUICK_KN]
        else:
            shapes = [(m, k, n) for m in ROWS_M for k, n in KN]
    activations = ("gelu",) if s.mode == "quick" else ("none", "gelu")
    return [bench_linear.Config(m, k, n, dtype, act,
                                PASSES + (("infer",) if m <= INFER_MAX_M else ()))
            for (m, k, n) in shapes for dtype in s.dtypes for act in activations]


def batched(contender: harness.Contender, calls: int) -> harness.Contender:
    """The contender run `calls` times per timed repeat (its state prepared before each call)."""
    def run(_):
        for _ in range(calls):
            contender.run(contender.prepare() if contender.prepare else None)
    return harness.Contender(contender.name, run)


def calls_per_repeat(flops: float) -> int:
    return int(max(1, min(MAX_CALLS, WORK_PER_REPEAT / flops)))


def run_config(cfg: bench_linear.Config, s: harness.Settings, peaks: dict, chainrule,
               flush) -> list[dict]:
    ours, eager, _ = bench_linear.build_sides(cfg, s.device, chainrule)
    check = harness.guarded(lambda: bench_linear.check_config(ours, eager, cfg.dtype))
    paths = "/".join(chainrule.backends.cpu_gemm_path(cfg.m, cfg.k, cfg.n, cfg.dtype,
                                                      backward=backward)
                     for backward in (False, True))
    infer_path = chainrule.backends.cpu_gemm_path(cfg.m, cfg.k, cfg.n, cfg.dtype,
                                                  requires_grad=False)
    peak, peak_name = harness.peak_for(peaks, s.device, cfg.dtype, "flops")
    rows = []
    for pass_name in cfg.passes:
        flops = bench_linear.FLOPS_PER_MNK[pass_name] * cfg.m * cfg.n * cfg.k
        calls = calls_per_repeat(flops)
        sides = ([("chainrule", ours)] if check.ok else []) + [("eager", eager)]
        contenders = [batched(side.contender(name, pass_name), calls) for name, side in sides]
        cpu_times: dict = {}
        times = harness.measure(contenders, repeats=s.repeats, warmup=max(s.warmup, 1),
                                device=s.device, flush=flush, cpu_times=cpu_times)
        label_path = {"fwd": paths.split("/")[0], "infer": infer_path}.get(pass_name, paths)
        per_call = {name: [t / calls for t in ts] for name, ts in times.items()}
        per_call_cpu = {name: [t / calls for t in ts] for name, ts in cpu_times.items()}
        rows.append(harness.make_row(
            subject="sweep",
            label=f"{cfg.shape} {harness.dtype_name(cfg.dtype)} {cfg.activation} {pass_name} "
                  f"[{label_path}]",
            size=float(cfg.m * cfg.n * cfg.k), times=per_call, check=check, work=flops,
            unit=harness.flops_unit(s.device), peak=peak, peak_name=peak_name,
            cpu_times=per_call_cpu, threads=s.threads,
            config={"m": cfg.m, "k": cfg.k, "n": cfg.n, "dtype": harness.dtype_name(cfg.dtype),
                    "activation": cfg.activation, "pass": pass_name, "device": str(s.device),
                    "calls_per_repeat": calls, "path": label_path},
            extra={"series": f"{harness.dtype_name(cfg.dtype)} {cfg.activation} {pass_name}"}))
    return rows


def run_control(m: int, k: int, n: int, activation: str, pass_name: str, s: harness.Settings,
                chainrule, flush) -> dict:
    """Eager against a second contender of itself over the same tensors, timed like a row."""
    cfg = bench_linear.Config(m, k, n, torch.float32, activation, (pass_name,))
    _, first, _ = bench_linear.build_sides(cfg, s.device, chainrule)
    second = bench_linear.Side(first.forward, first.params, first.x, first.dy)
    check = harness.guarded(lambda: bench_linear.check_config(first, second, cfg.dtype))
    flops = bench_linear.FLOPS_PER_MNK[pass_name] * m * n * k
    calls = calls_per_repeat(flops)
    contenders = [batched(side.contender(name, pass_name), calls)
                  for name, side in (("eager copy", first), ("eager", second))]
    times = harness.measure(contenders, repeats=s.repeats, warmup=max(s.warmup, 1),
                            device=s.device, flush=flush)
    return harness.make_row(
        subject="sweep", label=f"{cfg.shape} fp32 {activation} {pass_name} [{CONTROL_PATH}]",
        size=float(m * n * k), times={name: [t / calls for t in ts] for name, ts in times.items()},
        check=check, work=flops, unit=harness.flops_unit(s.device), peak=None, ours="eager copy",
        config={"m": m, "k": k, "n": n, "dtype": "float32", "activation": activation,
                "pass": pass_name, "device": str(s.device), "calls_per_repeat": calls,
                "path": CONTROL_PATH})


def summary_lines(rows: list[dict], threshold: float = 0.95) -> list[str]:
    """How many rows hold ratio >= threshold against eager, the slowest ones, and the controls."""
    controls = [r for r in rows if r["config"].get("path") == CONTROL_PATH and r["ratios"]]
    timed = [r for r in rows if r["ratios"].get("eager") is not None and r not in controls]
    if not timed:
        return []
    below = sorted((r for r in timed if r["ratios"]["eager"] < threshold),
                   key=lambda r: r["ratios"]["eager"])
    worst = min(timed, key=lambda r: r["ratios"]["eager"])
    lines = ["", f"sweep: {len(timed) - len(below)} of {len(timed)} rows at >= {threshold:.2f}x "
                 f"eager; slowest {worst['label']} {worst['ratios']['eager']:.2f}x "
                 f"(path {worst['config']['path']})"]
    # Rows whose path is torch's own ops in every pass run the same ops as eager: what separates
    # them is the module's check (~0.5 µs a call) and noise. The others run chainrule's kernels.
    own = [r for r in timed if any(p != "torch" for p in r["config"]["path"].split("/"))]
    if own:
        held = sum(r["ratios"]["eager"] >= threshold for r in own)
        lines.append(f"  on chainrule's own kernels (ours, aten + epilogue, gemv): {held} of "
                     f"{len(own)} at >= {threshold:.2f}x, "
                     f"{min(r['ratios']['eager'] for r in own):.2f}x-"
                     f"{max(r['ratios']['eager'] for r in own):.2f}x; the other "
                     f"{len(timed) - len(own)} run torch's own ops on both sides")
    for r in below:
        lines.append(f"  below: {r['label']} {r['ratios']['eager']:.2f}x "
                     f"(fastest repeats {r['ratios_of_min']['eager']:.2f}x, "
                     f"path {r['config']['path']})")
    if controls:
        lines.append("  noise floor (eager against itself, the same tensors): " + ", ".join(
            f"{r['label']} {r['ratios']['eager']:.2f}x" for r in controls))
    return lines


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="comma-separated MxKxN (default: the grid above)",
                       default_dtypes="float32,bfloat16")
    args = p.parse_args(argv)
    s = harness.settings("sweep", args, repeats=(1, 15, 41), warmup=(0, 1, 1))
    rows: list[dict] = []
    if s.device.type != "cpu":
        s.available = False
        s.reason = "the sweep compares CPU GEMM paths; nothing to measure on --device cuda"
    if s.available:
        chainrule = harness.import_chainrule()
        peaks = harness.load_peaks(s)
        shapes = harness.parse_shapes(args.shapes, 3) if args.shapes else None
        flush = harness.CacheFlusher(s.device) if s.mode != "smoke" else None
        for cfg in harness.progress(grid(s, shapes), s, "sweep"):
            rows.extend(run_config(cfg, s, peaks, chainrule, flush))
        if not args.shapes:
            rows.extend(run_control(*control, s, chainrule, flush) for control in CONTROLS)
    harness.write_results(s, rows, peaks=peaks if s.available else None)
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
