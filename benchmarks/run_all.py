#!/usr/bin/env python3
"""Runs every chainrule benchmark and writes the report.

  python benchmarks/run_all.py --quick     what `make bench` runs (< 10 minutes on 2 cores)
  python benchmarks/run_all.py             every size (`make bench-full`)
  python benchmarks/run_all.py --smoke     tiniest sizes, 1 repeat (the test suite runs this)

Order: the machine probe first (its peaks feed every "% of peak" column), then linear, gemm, adam
and e2e, each in its own process (a subject cannot disturb the next one's threads or memory).
On a machine with a GPU each subject runs on the CPU and again with --device cuda.
Writes into --out (default benchmarks/results/): <subject>.json with every raw repeat,
report.md (machine, peaks, one table per subject), plots/<subject>.png (ratio vs size, % of peak
vs size), and prints every table on stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

SUBJECTS = ("linear", "sweep", "gemm", "adam", "e2e", "fsdp")
TITLES = {"machine": "Machine probe", "linear": "Fused linear layer (chainrule.nn.Linear)",
          "sweep": "Linear layer shape sweep against eager (path: our GEMM or ATen's, fwd/bwd)",
          "gemm": "GEMM", "adam": "Fused Adam (chainrule.optim.Adam)",
          "e2e": "Training step, end to end", "fsdp": "Optimizer step under FSDP2 (2 ranks)"}


# The CPU targets of the project (issues 6 and 13), read off the rows: (subject, row label, baseline,
# what is compared, threshold). "ratio": baseline time / chainrule time; "pct_peak": chainrule's
# % of the measured peak; "rate": reported only.
TARGETS = (
    ("linear", "4096x1024x4096 fp32 gelu fwd+bwd", "eager", "ratio", 2.0),
    ("linear", "4096x1024x4096 fp32 gelu fwd+bwd", "compile", "ratio", 1.8),
    ("linear", "512x768x3072 fp32 gelu fwd+bwd", "eager", "ratio", 1.8),
    ("linear", "64x1024x1024 fp32 gelu fwd+bwd", "eager", "ratio", 1.4),
    ("gemm", "2048x2048x2048 fp32 gemm", None, "pct_peak", 75.0),
    ("linear", "4096x1024x4096 bf16 gelu fwd+bwd", "eager", "ratio", 1.1),
    ("adam", "16M params / 50 tensors fp32", "fused", "ratio", 1.1),
    ("adam", "16M params / 50 tensors bf16 master", "fused+copy", "rate", None),
    # Adam's per-tensor host cost (issue 13): chainrule's median ms per step
    ("adam", "1000 tensors x 1000 fp32 step", None, "max_ms", 2.0),
    # chainrule.convert on transformers models (issue 12): converted vs the original model
    ("e2e", "bert 8x128 fp32 train step", "torch fused AdamW", "ratio", 1.5),
    ("e2e", "llama 8x128 fp32 train step", "torch fused AdamW", "ratio", 1.5),
)


def target_lines(subjects: dict[str, list[dict]]) -> list[str]:
    """One line per target: the measured figure, the threshold and whether it holds."""
    rows = {(d["subject"], r["label"]): r for data in subjects.values() for d in data
            for r in d["rows"] if r["config"].get("device", "cpu") == "cpu"}
    lines = []
    for subject, label, baseline, kind, threshold in TARGETS:
        row = rows.get((subject, label))
        what = f"{label}" + (f" vs {baseline}" if baseline and kind == "ratio" else "")
        if row is None:
            lines.append((what, "not measured", "", ""))
            continue
        if row["status"] == "WRONG":
            lines.append((what, "WRONG result", "", "no"))
            continue
        if kind == "ratio":
            value = row["ratios"].get(baseline)
            fastest = row.get("ratios_of_min", {}).get(baseline)
            text = "-" if value is None else f"{value:.2f}x"
            if fastest is not None:
                text += f" (fastest repeats {fastest:.2f}x)"
            need = f">= {threshold:.1f}x"
        elif kind == "pct_peak":
            value = row["pct_peak"]
            rate = row["throughput"].get("chainrule")
            per_cpu = row.get("pct_peak_per_cpu_second", {}).get("chainrule")
            text = "-" if value is None else f"{value:.0f}% ({rate:.0f} of {row['peak']:.0f} {row['unit']})"
            if value is not None and per_cpu is not None:
                text += f"; {per_cpu:.0f}% per CPU-second"
            need = f">= {threshold:.0f}%"
        elif kind == "max_ms":
            value = (row["chainrule"] or {}).get("median_s")
            value = None if value is None else value * 1e3
            text = "-" if value is None else f"{value:.2f} ms"
            fastest = (row["chainrule"] or {}).get("min_s")
            if fastest is not None:
                text += f" (fastest {fastest * 1e3:.2f} ms)"
            need = f"<= {threshold:.1f} ms"
        else:
            value = row["throughput"].get("chainrule")
            text = "-" if value is None else f"{value:.1f} {row['unit']}"
            need = "report"
        noisy = (row["chainrule"] or {}).get("noisy") or (row["baselines"].get(baseline) or {}).get("noisy")
        holds = (lambda v: v <= threshold) if kind == "max_ms" else (lambda v: v >= threshold)
        verdict = "-" if threshold is None or value is None else ("yes" if holds(value) else "no")
        lines.append((what, text + (" (noisy)" if noisy else ""), need, verdict))
    return lines


def print_targets(lines) -> None:
    if not lines:
        return
    header = ("target", "measured", "needed", "holds")
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(4)]
    print("\nCPU targets (issues 6 and 13):")
    for cells in [header, tuple("-" * w for w in widths), *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def run_script(script: str, args: list[str]) -> float:
    """Runs one benchmark script in its own process, streaming its output; returns seconds."""
    start = time.perf_counter()
    command = [sys.executable, str(harness.BENCH_DIR / script), *args]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed with exit status {result.returncode}")
    return time.perf_counter() - start


# ---- plots --------------------------------------------------------------------------------------

def plot_subject(data: list[dict], path: Path) -> Path:
    """Two panels: ratio (baseline time / chainrule time) vs size, and % of the measured peak vs
    size. One colour per series (dtype, activation, pass); line style per baseline in the ratio
    panel; in the peak panel chainrule is solid and each baseline dotted in the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for d in data for r in d["rows"]]
    subject = data[0]["subject"]
    has_peak = any(r.get("pct_peak") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_peak else 1, figsize=(11 if has_peak else 6, 4), dpi=80,
                             squeeze=False)
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    peaks: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        device = r["config"].get("device", "cpu")
        name = f"{r.get('series', '')}{' ' + device if device != 'cpu' else ''}".strip()
        for baseline, ratio in r["ratios"].items():
            ratios.setdefault((name, baseline), []).append((r["size"], ratio))
        if r.get("pct_peak") is not None:
            peaks.setdefault((name, "chainrule"), []).append((r["size"], r["pct_peak"]))
            for baseline, pct in r["baseline_pct_peak"].items():
                peaks.setdefault((name, baseline), []).append((r["size"], pct))
    names = sorted({n for n, _ in ratios} | {n for n, _ in peaks})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    baselines = list(dict.fromkeys(b for _, b in ratios))  # first seen (eager, mm, ...) is solid
    styles = ["-", "--", ":", "-."]
    style = {b: styles[i % len(styles)] for i, b in enumerate(baselines)}

    ax = axes[0][0]
    for (name, baseline), points in sorted(ratios.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4,
                color=colour[name], linestyle=style[baseline], label=f"{name} vs {baseline}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(size_label(subject))
    ax.set_ylabel("baseline time / chainrule time")
    ax.set_title(f"{subject}: speed-up vs size (above 1: chainrule faster)", fontsize=10)
    if ratios:
        ax.legend(fontsize=6, loc="best")
    if has_peak:
        ax = axes[0][1]
        for (name, who), points in sorted(peaks.items()):
            points.sort()
            ours = who == "chainrule"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if ours else ".",
                    markersize=4, color=colour[name], linestyle="-" if ours else ":",
                    alpha=1.0 if ours else 0.6, label=name if ours else None)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(size_label(subject))
        ax.set_ylabel("% of the measured peak")
        ax.set_title(f"{subject}: % of peak vs size (solid chainrule, dotted baselines)",
                     fontsize=10)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def size_label(subject: str) -> str:
    return {"linear": "M*N*K", "gemm": "M*N*K", "adam": "parameters",
            "e2e": "samples or tokens per step"}.get(subject, "size")


# ---- report -------------------------------------------------------------------------------------

def report(out: Path, machine: dict, subjects: dict[str, list[dict]], plots: dict[str, Path],
           seconds: dict[str, float], mode: str) -> Path:
    lines = ["# chainrule benchmark report", ""]
    info, vers, git = machine["machine"], machine["versions"], machine["git"]
    lines += [f"Created {machine['created_utc']} in {mode} mode by `benchmarks/run_all.py`"
              f"{' --' + mode if mode != 'full' else ''}.", "",
              f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['torch_threads']} threads "
              f"for torch and chainrule alike" + (f", GPU {info['gpu']}" if info.get("gpu") else ""),
              f"- load average at the start: {info['load_average'][0]:.2f}"
              + (" (above the CPU count: other processes shared the machine, timings are noisy)"
                 if info["load_average"] and info["load_average"][0] > (info["cpus"] or 1) else ""),
              f"- torch {vers['torch']}, python {vers['python']}",
              f"- chainrule: {json.dumps(vers['chainrule'])}, from {vers.get('chainrule_path')}",
              f"- git commit {git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}",
              ""]
    lines += ["## Measured peaks (bench_machine.py)", "",
              "Every \"% of peak\" column below is relative to these figures, measured on this "
              "machine at the start of the run.", "", "| probe | value | note |", "|---|---|---|"]
    for r in machine.get("probe_rows", []):
        value = "-" if r["value"] is None else f"{r['value']:.1f} {r['unit']}"
        lines.append(f"| {r['label']} | {value} | {r['note']} |")
    lines += ["", "## How to read the tables", "",
              "One line per configuration and baseline. chainrule ms and baseline ms: median "
              "(min-max) over interleaved repeats taken in the same process. ratio = baseline "
              "time / chainrule time (above 1: chainrule is faster). The rate and % of peak are "
              "chainrule's, the baseline's % of peak in [brackets]. noisy: min and max differ by "
              "more than 10%. WRONG: chainrule's result differed from the baseline's, so no time "
              "is reported. Raw repeats are in the JSON files next to this report.", ""]
    for subject, data in subjects.items():
        rows = [r for d in data for r in d["rows"]]
        lines += [f"## {TITLES.get(subject, subject)}", ""]
        for d in data:
            settings = d["settings"]
            lines.append(f"- device {settings['device']}: {len(d['rows'])} rows, "
                         f"{settings['repeats']} repeats after {settings['warmup']} warm-up, "
                         f"{settings['threads']} threads" + (f"; {d['reason']}" if d.get("reason")
                                                             else ""))
        if seconds.get(subject) is not None:
            lines.append(f"- wall time of this subject: {seconds[subject]:.0f} s")
        wrong = [r["label"] for r in rows if r["status"] == "WRONG"]
        noisy = sum(1 for r in rows if (r["chainrule"] or {}).get("noisy")
                    or any(b.get("noisy") for b in r["baselines"].values()))
        lines.append(f"- rows flagged noisy: {noisy} of {len(rows)}"
                     + (f"; WRONG results: {', '.join(wrong)}" if wrong else ""))
        peak_names = sorted({r["peak_name"] for r in rows if r.get("peak_name")})
        if peak_names:
            lines.append(f"- % of peak against: {', '.join(peak_names)}")
        lines.append("")
        if rows:
            lines += harness.markdown_table(rows)
            lines.append("")
        for d in data:
            if d.get("peak_memory"):
                lines += ["Peak memory of one forward+backward (MiB allocated above the start; "
                          "ratio = baseline / chainrule, above 1: chainrule needs less):", ""]
                lines += harness.memory_markdown_table(d["peak_memory"])
                lines.append("")
            if d.get("memory"):
                lines += ["Peak memory of a backward into an existing .grad (MiB allocated above "
                          "the start of the backward):", "",
                          "| shape | " + " | ".join(d["memory"][0]["peak_bytes"]) + " |",
                          "|---|" + "---|" * len(d["memory"][0]["peak_bytes"])]
                for m in d["memory"]:
                    lines.append(f"| {m['shape']} {m['dtype']} {m['activation']} | " + " | ".join(
                        f"{v / 2**20:.2f}" for v in m["peak_bytes"].values()) + " |")
                lines.append("")
        if subject in plots:
            lines += [f"![{subject}](plots/{plots[subject].name})", ""]
    targets = target_lines(subjects)
    if targets:
        lines += ["## CPU targets", "",
                  "Read off the rows above (ratio = baseline time / chainrule time, median of "
                  "interleaved repeats).", "", "| target | measured | needed | holds |",
                  "|---|---|---|---|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in targets]
        lines.append("")
    total = sum(v for v in seconds.values() if v)
    lines += [f"Total wall time: {total:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the reduced sweep (make bench)")
    mode.add_argument("--smoke", action="store_true", help="tiniest sizes, 1 repeat")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR, help="output directory")
    p.add_argument("--only", default=",".join(SUBJECTS),
                   help=f"comma-separated subjects to run (default all: {','.join(SUBJECTS)})")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="run only on this device (default: cpu, and cuda when a GPU is present)")
    p.add_argument("--threads", type=int, default=None, help="threads for both sides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    mode_name = "smoke" if args.smoke else ("quick" if args.quick else "full")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"--{mode_name}"] if mode_name != "full" else []
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.no_progress:
        common.append("--no-progress")
    import torch
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available()
                                                  else ["cpu"])
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    machine_json = out / "machine.json"
    machine_args = common + ["--json", str(machine_json)]
    if "cuda" in devices:
        machine_args += ["--device", "cuda"]
    seconds["machine"] = run_script("bench_machine.py", machine_args)
    subjects: dict[str, list[dict]] = {}
    for subject in [s for s in args.only.split(",") if s]:
        if subject not in SUBJECTS:
            raise SystemExit(f"--only: unknown subject {subject!r}; expected {SUBJECTS}")
        seconds[subject] = 0.0
        for device in devices:
            path = out / (f"{subject}.json" if device == "cpu" else f"{subject}_{device}.json")
            seconds[subject] += run_script(f"bench_{subject}.py", common + [
                "--device", device, "--json", str(path), "--machine", str(machine_json)])
            subjects.setdefault(subject, []).append(json.loads(path.read_text()))
    plots = {}
    for subject, data in subjects.items():
        if any(d["rows"] for d in data):
            plots[subject] = plot_subject(data, out / "plots" / f"{subject}.png")
    machine = json.loads(machine_json.read_text())
    path = report(out, machine, subjects, plots, seconds, mode_name)
    if mode_name != "smoke":
        print_targets(target_lines(subjects))
    total = time.perf_counter() - start
    print(f"\nreport: {path}")
    for subject, plot in plots.items():
        print(f"plot:   {plot}")
    print(f"total wall time {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
