"""Shared harness of chainrule's benchmarks: timing, correctness check, peaks, tables, JSON, plots.

Method (the same for every subject):
  * warm-up calls of every contender, then `repeats` rounds; each round times every contender once,
    in alternating order (chainrule, baseline, ..., then reversed), so slow drifts of a shared
    machine hit both sides alike. A ratio is always computed from rounds taken in one process.
  * median with min and max; a row is flagged "noisy" when max exceeds min by more than 10%.
  * torch and chainrule run with the same thread count (torch.set_num_threads; chainrule's CPU
    kernels follow torch's setting).
  * GEMM-like rows flush the last-level cache before every timed call (a write over a buffer twice
    the L3 size on CPU, the L2 on GPU), so no contender inherits a warm cache from the one before.
  * on CUDA each call is timed with CUDA events after a device synchronisation.
  * before timing, chainrule's result is compared with the baseline's once per configuration; a
    configuration whose result is wrong gets no chainrule time at all (the row says WRONG).
  * "% of peak" is always relative to the peaks measured on this machine by bench_machine.py
    (benchmarks/results/machine.json, measured afresh when missing or from another machine).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
NOISE_THRESHOLD = 0.10  # (max - min) / min above this flags a row as noisy

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}

# Tolerance of chainrule's result against the baseline's: max|ours - theirs| <= tol * max|theirs|
# (plus a tiny absolute floor). Both sides round differently (summation order, epilogue rounding),
# so this is a loose "same result" test, not the accuracy test (that lives in tests/).
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2,
                   torch.float16: 5e-3}


# ---- command line -------------------------------------------------------------------------------

def parser(description: str, *, shapes_help: str, default_dtypes: str = "float32") -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the reduced sweep that `make bench` runs (issue target rows included)")
    p.add_argument("--smoke", action="store_true",
                   help="tiniest shapes, 1 repeat: checks that the script works, not speed")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated dtypes (float32, bfloat16, float16); default {default_dtypes}")
    p.add_argument("--shapes", default=None, help=shapes_help)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON results (default benchmarks/results/<subject>.json)")
    p.add_argument("--machine", type=Path, default=None,
                   help="machine probe JSON whose peaks the %% of peak columns use "
                        "(default benchmarks/results/machine.json; measured when missing)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per contender first")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and chainrule alike (default: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(default_dtypes=default_dtypes)
    return p


@dataclass
class Settings:
    subject: str
    args: argparse.Namespace
    device: torch.device
    dtypes: list[torch.dtype]
    repeats: int
    warmup: int
    threads: int
    mode: str  # "smoke", "quick" or "full"
    available: bool = True  # False when the device asked for is not present
    reason: str = ""


def settings(subject: str, args: argparse.Namespace, *, repeats: tuple[int, int, int] = (1, 5, 9),
             warmup: tuple[int, int, int] = (0, 1, 2)) -> Settings:
    """Resolves the common options. repeats/warmup: (smoke, quick, full) defaults."""
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    index = ("smoke", "quick", "full").index(mode)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [parse_dtype(d) for d in (args.dtype or args.default_dtypes).split(",") if d]
    s = Settings(subject=subject, args=args, device=torch.device(args.device), dtypes=dtypes,
                 repeats=args.repeats or repeats[index], warmup=args.warmup if args.warmup is not None
                 else warmup[index], threads=torch.get_num_threads(), mode=mode)
    if args.device == "cuda" and not torch.cuda.is_available():
        s.available = False
        s.reason = "--device cuda: no CUDA device is available on this machine; nothing measured"
    torch.manual_seed(0)
    return s


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_shapes(text: str, arity: int) -> list[tuple[int, ...]]:
    """'4096x1024x4096,64x1024x1024' -> [(4096, 1024, 4096), (64, 1024, 1024)]; numbers may be
    written 16e6."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = [int(float(v)) for v in item.lower().split("x")]
        if len(parts) != arity:
            raise SystemExit(f"--shapes: {item!r} must have {arity} numbers separated by 'x'")
        shapes.append(tuple(parts))
    return shapes


def progress(items: Sequence, settings: Settings, desc: str):
    """tqdm over items (to stderr), unless --no-progress or tqdm is missing."""
    if settings.args.no_progress:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="cfg", file=sys.stderr, leave=False, dynamic_ncols=True)


# ---- chainrule ----------------------------------------------------------------------------------

def import_chainrule():
    """chainrule, from the installed package or, in a source checkout, from python/."""
    try:
        import chainrule
    except ImportError:
        sys.path.insert(0, str(ROOT / "python"))
        import chainrule  # noqa: F811  (raises the real error when it is not built)
    return chainrule


def end_rank(dist) -> None:
    """The end of a spawned rank's function: free what still holds the process group (FSDP2's
    module states are reference cycles, so only the collector frees them), let every rank get
    here, destroy the group, and leave without interpreter finalization. Left to finalization, a
    gloo group freed there aborts the rank now and then ("terminate called without an active
    exception", seen about 1 run in 20 on a loaded 2-core machine)."""
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- timing -------------------------------------------------------------------------------------

@dataclass
class Contender:
    """One side of a comparison. run(state) is timed; prepare() (untimed) makes its state fresh
    before every call: a new autograd graph for a backward, gradients reset, ..."""
    name: str
    run: Callable[[Any], Any]
    prepare: Optional[Callable[[], Any]] = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Evicts the last-level cache: writes over a buffer of twice its size (capped, see below)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            nbytes = 2 * max(l2, 8 << 20)
        else:
            # At most 2 x 128 MiB: a VM guest reports its host socket's whole L3 (480 MiB on a
            # 2-core guest seen here), far more than its cores' share, and writing twice that
            # before every call made the small rows take minutes.
            nbytes = 2 * min(cpu_cache_bytes(), 128 << 20)
        self.buffer = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def cpu_cache_bytes() -> int:
    """The largest CPU cache (L3 usually), from sysfs; 32 MiB when unknown."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or (32 << 20)


def measure(contenders: Sequence[Contender], *, repeats: int, warmup: int, device: torch.device,
            flush: Optional[Callable[[], None]] = None,
            cpu_times: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Seconds per call of each contender: warm-up, then `repeats` interleaved rounds whose order
    alternates (A B C, C B A, ...). Returns every raw wall-clock time, in the order taken; when
    cpu_times is given (CPU only) it receives the process CPU seconds of every call too."""
    for _ in range(warmup):
        for c in contenders:
            c.run(c.prepare() if c.prepare else None)
    synchronize(device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for round_index in range(repeats):
        order = contenders if round_index % 2 == 0 else list(reversed(contenders))
        for c in order:
            state = c.prepare() if c.prepare else None
            if flush is not None:
                flush()
            wall, cpu = _time_one(c.run, state, device)
            times[c.name].append(wall)
            if cpu_times is not None and cpu is not None:
                cpu_times.setdefault(c.name, []).append(cpu)
    return times


def _time_one(run: Callable[[Any], Any], state: Any,
              device: torch.device) -> tuple[float, Optional[float]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, None
    start_cpu, start_time = time.process_time(), time.perf_counter()
    run(state)
    return time.perf_counter() - start_time, time.process_time() - start_cpu


def summarize(seconds: Sequence[float]) -> dict:
    """median / min / max of raw times, the raw times, and the noise flag."""
    low, high = min(seconds), max(seconds)
    return {"median_s": statistics.median(seconds), "min_s": low, "max_s": high,
            "repeats_s": list(seconds), "noisy": bool(high > low * (1 + NOISE_THRESHOLD))}


# ---- correctness --------------------------------------------------------------------------------

@dataclass
class Check:
    ok: bool
    max_error: float  # worst max|ours - theirs| / max|theirs| over the compared tensors
    tolerance: float
    detail: str = ""
    error: Optional[str] = None  # chainrule raised instead of returning a result

    def as_dict(self) -> dict:
        return {"ok": self.ok, "max_relative_error": self.max_error, "tolerance": self.tolerance,
                "detail": self.detail, "error": self.error}


def guarded(check: Callable[[], Check]) -> Check:
    """Runs a check; chainrule raising (a kernel missing for this device or dtype, ...) becomes a
    failed check, so the row is reported without a chainrule time instead of ending the run."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001  (reported in the row)
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return Check(False, math.inf, 0.0, "", error=message[:200])


def check_close(ours: Iterable[Optional[torch.Tensor]], theirs: Iterable[Optional[torch.Tensor]],
                dtype: torch.dtype, names: Optional[Sequence[str]] = None,
                tolerance: Optional[float] = None) -> Check:
    """Compares chainrule's tensors with the baseline's, pairwise; relative to the baseline's
    largest magnitude so that tolerances do not depend on the scale of the data."""
    tol = tolerance if tolerance is not None else CHECK_TOLERANCE.get(dtype, 1e-3)
    worst, detail = 0.0, []
    ours, theirs = list(ours), list(theirs)
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(ours))]
    for name, a, b in zip(names, ours, theirs):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return Check(False, math.inf, tol, f"{name}: shape {None if a is None else tuple(a.shape)}"
                                               f" vs {None if b is None else tuple(b.shape)}")
        a64, b64 = a.detach().double(), b.detach().double()
        if not bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all()):
            return Check(False, math.inf, tol, f"{name}: non-finite values")
        scale = float(b64.abs().max()) if b64.numel() else 0.0
        err = float((a64 - b64).abs().max()) if a64.numel() else 0.0
        rel = err / max(scale, 1e-30) if err > 0 else 0.0
        if rel > worst:
            worst = rel
        detail.append(f"{name} {rel:.1e}")
    return Check(worst <= tol, worst, tol, ", ".join(detail))


# ---- peaks --------------------------------------------------------------------------------------

def compile_probe(out_dir: Optional[Path] = None) -> Path:
    """Builds benchmarks/probe.cpp for this machine (g++ -O3 -march=native: the FMA loops are
    intrinsics, -O3 vectorises the bandwidth loop), cached by source modification time."""
    out_dir = out_dir or (RESULTS_DIR / "bin")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = BENCH_DIR / "probe.cpp"
    binary = out_dir / "probe"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the machine probe needs a C++ compiler ({compiler} not found)")
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "probe"
        subprocess.run([compiler, "-O3", "-march=native", "-std=c++17", "-pthread",
                        str(source), "-o", str(built)], check=True, capture_output=True, text=True)
        shutil.move(str(built), binary)
    return binary


def probe_cpu(threads: int, *, quick: bool) -> dict:
    """Measured FMA peaks (fp32, bf16) with `threads` threads and the Adam-like read-modify-write
    bandwidth. See probe.cpp for what each figure counts. Without a C++ compiler (or on a CPU
    without AVX2+FMA) there is no honest peak to measure: {"error": why}, and the % of peak
    columns stay empty."""
    try:
        return _probe_cpu(threads, quick=quick)
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        return {"threads": threads, "error": f"machine probe failed: {str(detail)[-300:]}"}


def _probe_cpu(threads: int, *, quick: bool) -> dict:
    binary = compile_probe()
    seconds = "0.4" if quick else "2"
    fma = json.loads(subprocess.run([str(binary), "fma", str(threads), seconds], check=True,
                                    capture_output=True, text=True).stdout)
    floats = (16 << 20) if quick else (64 << 20)
    rmw = json.loads(subprocess.run([str(binary), "rmw", str(threads), str(floats),
                                     "3" if quick else "6"], check=True, capture_output=True,
                                    text=True).stdout)
    return {
        "threads": threads,
        "vector_bits": fma["vector_bits"],
        "fp32_gflops": fma["fp32_cpu_gflops"],
        "fp32_wall_gflops": fma["fp32_wall_gflops"],
        "bf16_gflops": fma["bf16_cpu_gflops"],
        "bf16_wall_gflops": fma["bf16_wall_gflops"],
        "rmw_gbps": rmw["gbps"],
        "rmw_bytes_per_element": rmw["bytes_per_element"],
        "rmw_elements": rmw["floats"],
    }


def load_peaks(settings: Settings) -> dict:
    """The machine's peaks: from --machine / results/machine.json when it was measured on this
    machine with the same thread count, else measured now (quick probe)."""
    path = settings.args.machine or (RESULTS_DIR / "machine.json")
    here = machine_identity(settings.threads)
    peaks = None
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("identity") == here and data.get("peaks"):
                peaks = dict(data["peaks"])
                peaks["source"] = str(path)
        except (OSError, ValueError):
            pass
    if peaks is None:
        peaks = {"cpu": probe_cpu(settings.threads, quick=True),
                 "source": "measured now (quick probe)"}
    if settings.device.type == "cuda" and settings.available and not peaks.get("cuda"):
        peaks["cuda"] = probe_cuda(settings.device, quick=True)
    return peaks


def probe_cuda(device: torch.device, *, quick: bool) -> dict:
    """The GPU's measured peaks: a large bf16 GEMM (TFLOP/s), an fp32 GEMM without TF32, and a
    device-to-device copy (GB/s, read + write)."""
    props = torch.cuda.get_device_properties(device)
    result = {"name": props.name, "sm_count": props.multi_processor_count,
              "memory_gib": props.total_memory / 2**30}
    n = 8192
    for dtype, key in ((torch.bfloat16, "bf16_tflops"), (torch.float32, "fp32_tflops")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            times = measure([Contender("mm", lambda _: torch.mm(a, b))], repeats=5 if quick else 20,
                            warmup=2, device=device)["mm"]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        result[key] = 2 * n**3 / min(times) / 1e12
        del a, b
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = measure([Contender("copy", lambda _: dst.copy_(src))], repeats=5 if quick else 20,
                    warmup=2, device=device)["copy"]
    result["copy_gbps"] = 2 * src.numel() * 4 / min(times) / 1e9
    return result


def flops_unit(device: torch.device) -> str:
    return "TFLOP/s" if device.type == "cuda" else "GFLOP/s"


def peak_for(peaks: dict, device: torch.device, dtype: torch.dtype, kind: str) -> tuple[Optional[float], str]:
    """(peak, its name) used by a row: kind "flops" (GFLOP/s on CPU, TFLOP/s on CUDA: see
    flops_unit) or "bandwidth" (GB/s)."""
    if device.type == "cuda":
        cuda = peaks.get("cuda") or {}
        if kind == "bandwidth":
            return cuda.get("copy_gbps"), "measured device copy"
        if dtype in (torch.bfloat16, torch.float16):
            return cuda.get("bf16_tflops"), "measured bf16 cuBLAS GEMM"
        return cuda.get("fp32_tflops"), "measured fp32 cuBLAS GEMM"
    cpu = peaks.get("cpu") or {}
    if kind == "bandwidth":
        return cpu.get("rmw_gbps"), "measured Adam-like RMW GB/s"
    if dtype == torch.bfloat16 and cpu.get("bf16_gflops"):
        return cpu["bf16_gflops"], "measured bf16 dot-product peak"
    if dtype == torch.float64 and cpu.get("fp32_gflops"):
        return cpu["fp32_gflops"] / 2, "half the measured fp32 FMA peak"
    return cpu.get("fp32_gflops"), "measured fp32 FMA peak"


# ---- rows ---------------------------------------------------------------------------------------

def make_row(*, subject: str, label: str, size: float, config: dict, times: Optional[dict],
             check: Optional[Check], work: Optional[float], unit: str, peak: Optional[float],
             peak_name: str = "", ours: str = "chainrule", extra: Optional[dict] = None,
             cpu_times: Optional[dict] = None, threads: Optional[int] = None) -> dict:
    """One configuration's result. times: raw seconds per contender name (ours first); work:
    flops or bytes per call; unit "GFLOP/s" or "GB/s" (TFLOP/s rows are scaled on output).
    A failed check drops chainrule's times: a wrong result gets no time."""
    times = dict(times or {})
    wrong = check is not None and not check.ok
    if wrong:
        times.pop(ours, None)
    stats = {name: summarize(t) for name, t in times.items() if t}
    row = {"subject": subject, "label": label, "size": size, "config": config,
           "check": check.as_dict() if check else None, "status": "WRONG" if wrong else "ok",
           "unit": unit, "work_per_call": work, "peak": peak, "peak_name": peak_name,
           "chainrule": stats.get(ours), "baselines": {k: v for k, v in stats.items() if k != ours}}
    ours_stats = row["chainrule"]
    row["ratios"] = {}
    row["throughput"] = {}
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    for name, s in stats.items():
        if work:
            row["throughput"][name] = work / s["median_s"] / scale
    row["ratios_of_min"] = {}  # the fastest repeats' ratio: steadier on a crowded machine
    if ours_stats:
        for name, s in row["baselines"].items():
            row["ratios"][name] = s["median_s"] / ours_stats["median_s"]
            row["ratios_of_min"][name] = s["min_s"] / ours_stats["min_s"]
    ours_rate = row["throughput"].get(ours)
    row["pct_peak"] = 100.0 * ours_rate / peak if (ours_rate and peak) else None
    row["baseline_pct_peak"] = {name: 100.0 * rate / peak for name, rate in row["throughput"].items()
                                if name != ours and peak}
    # Per CPU-second: work / process CPU seconds against the per-thread share of the peak. On a
    # machine shared with other work this is the kernel's efficiency while it had the cores (a
    # thread spinning at a barrier counts as busy, so it never flatters); alone it equals the
    # wall-clock figure for a kernel that keeps every thread busy.
    row["cpu_time"], row["pct_peak_per_cpu_second"] = {}, {}
    for name, t in (cpu_times or {}).items():
        if name not in stats or not t:
            continue
        row["cpu_time"][name] = summarize(t)
        if work and peak and threads and unit == "GFLOP/s":  # flops: bandwidth is not per-core
            cpu_median = row["cpu_time"][name]["median_s"]
            if cpu_median > 0:
                row["pct_peak_per_cpu_second"][name] = \
                    100.0 * (work / cpu_median / 1e9) / (peak / threads)
    if extra:
        row.update(extra)
    return row


# ---- output -------------------------------------------------------------------------------------

def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.1f}")


def _time_cell(stats: Optional[dict]) -> str:
    if not stats:
        return "-"
    return f"{_ms(stats['median_s'])} ({_ms(stats['min_s'])}-{_ms(stats['max_s'])})"


def _rate(rate: Optional[float], unit: str) -> tuple[str, str]:
    if rate is None:
        return "-", unit
    return (f"{rate:.2f}" if rate < 10 else f"{rate:.1f}" if rate < 1e3 else f"{rate:.0f}"), unit


TABLE_HEADER = ("shape", "chainrule ms", "baseline", "baseline ms", "ratio", "GFLOP/s or GB/s",
                "% of peak", "note")


def table_cells(rows: Sequence[dict]) -> list[tuple[str, ...]]:
    """The table's cells: one line per (configuration, baseline). ratio = baseline time /
    chainrule time (> 1: chainrule is faster); rate and % of peak are chainrule's (the
    baseline's own % of peak in brackets)."""
    body = []
    for row in rows:
        baselines = row["baselines"] or {"-": None}
        for name, stats in baselines.items():
            rate, unit = _rate(row["throughput"].get("chainrule"), row["unit"])
            pct = row["pct_peak"]
            base_pct = row["baseline_pct_peak"].get(name)
            pct_text = "-" if pct is None else f"{pct:.0f}%"
            per_cpu = row.get("pct_peak_per_cpu_second", {}).get("chainrule")
            if per_cpu is not None and pct is not None:
                pct_text += f" ({per_cpu:.0f}%/cpu-s)"
            if base_pct is not None:
                pct_text += f" [{base_pct:.0f}%]"
            notes = []
            if row["status"] == "WRONG" and row["check"].get("error"):
                notes.append(f"ERROR {row['check']['error']}: no time reported")
            elif row["status"] == "WRONG":
                notes.append(f"WRONG result (err {row['check']['max_relative_error']:.1e} > "
                             f"{row['check']['tolerance']:.0e}): no time reported")
            if (row["chainrule"] or {}).get("noisy") or (stats or {}).get("noisy"):
                notes.append("noisy")
            if row.get("note"):
                notes.append(row["note"])
            ratio = row["ratios"].get(name)
            body.append((row["label"], _time_cell(row["chainrule"]), name, _time_cell(stats),
                         "-" if ratio is None else f"{ratio:.2f}x",
                         f"{rate} {unit}" if rate != "-" else "-", pct_text, "; ".join(notes)))
    return body


def table_lines(rows: Sequence[dict]) -> list[str]:
    """The aligned plain-text table (see table_cells)."""
    body = table_cells(rows)
    widths = [max(len(TABLE_HEADER[i]), *(len(r[i]) for r in body)) if body else len(TABLE_HEADER[i])
              for i in range(len(TABLE_HEADER))]

    def fmt(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [fmt(TABLE_HEADER), "-+-".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in body)
    return lines


def markdown_table(rows: Sequence[dict]) -> list[str]:
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
    out.extend("| " + " | ".join(cells) + " |" for cells in table_cells(rows))
    return out


MEMORY_HEADER = ("shape", "chainrule MiB", "baseline", "baseline MiB", "ratio", "note")


def memory_cells(rows: Sequence[dict]) -> list[tuple[str, ...]]:
    """Peak-memory rows ({"label", "chainrule_bytes", "baselines": {name: bytes}, "note"}): one
    line per (configuration, baseline); ratio = baseline bytes / chainrule bytes (above 1:
    chainrule needs less)."""
    body = []
    for row in rows:
        ours = row["chainrule_bytes"]
        for name, theirs in row["baselines"].items():
            ratio = "-" if not ours else f"{theirs / ours:.2f}x"
            body.append((row["label"], "-" if ours is None else f"{ours / 2**20:.3f}", name, f"{theirs / 2**20:.3f}", ratio,
                         row.get("note", "")))
    return body


def memory_table_lines(rows: Sequence[dict]) -> list[str]:
    """The aligned plain-text peak-memory table (see memory_cells)."""
    body = memory_cells(rows)
    widths = [max(len(MEMORY_HEADER[i]), *(len(r[i]) for r in body)) if body
              else len(MEMORY_HEADER[i]) for i in range(len(MEMORY_HEADER))]

    def fmt(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [fmt(MEMORY_HEADER), "-+-".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in body)
    return lines


def memory_markdown_table(rows: Sequence[dict]) -> list[str]:
    out = ["| " + " | ".join(MEMORY_HEADER) + " |", "|" + "|".join("---" for _ in MEMORY_HEADER) + "|"]
    out.extend("| " + " | ".join(cells) + " |" for cells in memory_cells(rows))
    return out


def git_commit() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("git", "rev-parse", "HEAD") or None,
            "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_identity(threads: int) -> dict:
    """What must match for stored peaks to apply to this run."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads,
            "hostname": platform.node()}


def machine_info(settings: Settings) -> dict:
    info = {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(), "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "last_level_cache_bytes": cpu_cache_bytes(),
    }
    if settings.device.type == "cuda" and settings.available:
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    try:
        chainrule = import_chainrule()
        out["chainrule"] = chainrule.build_info()
        out["chainrule_path"] = str(Path(chainrule.__file__).parent)
    except Exception as error:  # noqa: BLE001  (the report says why chainrule is missing)
        out["chainrule"] = f"unavailable: {error}"
    return out


def write_results(settings: Settings, rows: Sequence[dict], *, peaks: Optional[dict] = None,
                  extra: Optional[dict] = None) -> Path:
    """Prints the table and writes the JSON (every raw repeat included)."""
    path = settings.args.json or (RESULTS_DIR / f"{settings.subject}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "subject": settings.subject,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "settings": {"mode": settings.mode, "device": str(settings.device),
                     "dtypes": [dtype_name(d) for d in settings.dtypes],
                     "repeats": settings.repeats, "warmup": settings.warmup,
                     "threads": settings.threads, "noise_threshold": NOISE_THRESHOLD},
        "machine": machine_info(settings),
        "identity": machine_identity(settings.threads),
        "versions": versions(),
        "git": git_commit(),
        "available": settings.available,
        "reason": settings.reason,
        "peaks": peaks,
        "rows": list(rows),
    }
    if extra:
        data.update(extra)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    if rows or settings.reason:
        print(f"\n{settings.subject}: {len(rows)} rows, {settings.mode} mode, {settings.threads} "
              f"threads, device {settings.device}")
    if settings.reason:
        print(settings.reason)
    if rows:
        print(peaks_line(peaks))
        print("\n".join(table_lines(rows)))
    print(f"wrote {path}")
    return path


def peaks_line(peaks: Optional[dict]) -> str:
    """The measured peaks that the % of peak column uses, in one line."""
    if not peaks:
        return "peaks: none measured"
    parts = []
    cpu = peaks.get("cpu") or {}
    if cpu.get("error"):
        parts.append(f"CPU: {cpu['error']}")
    elif cpu:
        parts.append(f"CPU fp32 FMA {cpu['fp32_gflops']:.1f} GFLOP/s")
        if cpu.get("bf16_gflops"):
            parts.append(f"bf16 {cpu['bf16_gflops']:.1f} GFLOP/s")
        parts.append(f"RMW bandwidth {cpu['rmw_gbps']:.1f} GB/s ({cpu['threads']} threads)")
    cuda = peaks.get("cuda") or {}
    if cuda:
        parts.append(f"{cuda['name']} bf16 GEMM {cuda['bf16_tflops']:.1f} TFLOP/s, fp32 "
                     f"{cuda['fp32_tflops']:.1f} TFLOP/s, copy {cuda['copy_gbps']:.0f} GB/s")
    return f"peaks (measured, {peaks.get('source', 'bench_machine.py')}): " + "; ".join(parts)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---- memory -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of memory allocated through torch's allocator while fn runs, above what was allocated
    when it started. CUDA: the caching allocator's statistics. CPU: the profiler's allocation
    events, whose running total the CPU allocator reports."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = []

    def walk(node):
        fields = node.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start
