#!/usr/bin/env python3
"""Machine probe: the peaks every "% of peak" column of chainrule's benchmarks is relative to.

CPU (probe.cpp, compiled here with -march=native and run with all of torch's threads):
  * fp32 FMA peak: back-to-back vector FMAs (AVX-512 or AVX2) on 12 independent accumulators per
    thread. Counted per thread against that thread's own CPU time and summed, so the figure is the
    cores' rate even while other processes share the machine; the wall-clock figure is kept too.
  * bf16 peak: the same with vdpbf16ps (AVX512_BF16), where the CPU has it.
  * bandwidth: an Adam-like read-modify-write (read param, grad, exp_avg, exp_avg_sq; write param,
    exp_avg, exp_avg_sq: 28 bytes per element) over arrays far larger than the caches.
CUDA (--device cuda): the device name, a large bf16 GEMM and an fp32 GEMM (TF32 off) through
cuBLAS (TFLOP/s), and a device-to-device copy (GB/s, read + write).

The result goes to benchmarks/results/machine.json, which the other scripts read.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="unused (the probe has fixed sizes)")
    args = p.parse_args(argv)
    s = harness.settings("machine", args)
    if args.json is None:
        args.json = harness.RESULTS_DIR / "machine.json"
    quick = s.mode != "full"
    peaks = {"cpu": harness.probe_cpu(s.threads, quick=quick)}
    if s.mode == "smoke":
        peaks["note"] = "smoke run: short probe"
    if s.device.type == "cuda" and s.available:
        peaks["cuda"] = harness.probe_cuda(s.device, quick=quick)
    cpu = peaks["cpu"]
    rows = []

    def row(label, value, unit, note=""):
        rows.append({"label": label, "value": value, "unit": unit, "note": note})

    if cpu.get("error"):
        row("CPU peaks", None, "", cpu["error"])
    else:
        cpu_rows(cpu, row)
    if "cuda" in peaks:
        cuda = peaks["cuda"]
        row(f"{cuda['name']}: bf16 GEMM 8192^3", cuda["bf16_tflops"], "TFLOP/s")
        row(f"{cuda['name']}: fp32 GEMM 8192^3 (no TF32)", cuda["fp32_tflops"], "TFLOP/s")
        row(f"{cuda['name']}: device copy 1 GiB", cuda["copy_gbps"], "GB/s", "read + write")
    width = max(len(r["label"]) for r in rows)
    print(f"\nmachine: {harness.cpu_model()}, {os.cpu_count()} CPUs, "
          f"{s.threads} torch threads, load average {os.getloadavg()[0]:.1f}")
    if s.reason:
        print(s.reason)
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.1f}"
        print(f"{r['label'].ljust(width)} | {value:>8} {r['unit']:<8} | {r['note']}")
    harness.write_results(s, [], peaks=peaks, extra={"probe_rows": rows})
    return 0


def cpu_rows(cpu: dict, row) -> None:
    row(f"fp32 FMA peak, {cpu['threads']} threads ({cpu['vector_bits']}-bit vectors)",
        cpu["fp32_gflops"], "GFLOP/s", f"wall clock {cpu['fp32_wall_gflops']:.1f}")
    if cpu.get("bf16_gflops"):
        row(f"bf16 dot-product peak, {cpu['threads']} threads", cpu["bf16_gflops"], "GFLOP/s",
            f"wall clock {cpu['bf16_wall_gflops']:.1f}")
    else:
        row("bf16 dot-product peak", None, "GFLOP/s", "no AVX512_BF16 on this CPU")
    row(f"Adam-like read-modify-write, {cpu['rmw_elements'] >> 20}M elements x 28 B",
        cpu["rmw_gbps"], "GB/s")


if __name__ == "__main__":
    sys.exit(main())
