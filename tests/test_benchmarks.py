"""The benchmark scripts run and write well-formed output (tables, JSON, report, plots).

Timings are not asserted: the scripts run in --smoke mode (tiniest shapes, 1 repeat) so they
cannot rot; the harness's rules (interleaving, noise flag, no time for a wrong result) are
tested directly.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

SCRIPTS = ("bench_machine.py", "bench_linear.py", "bench_sweep.py", "bench_gemm.py", "bench_adam.py",
           "bench_e2e.py", "run_all.py")
ROW_KEYS = {"subject", "label", "size", "config", "check", "status", "unit", "chainrule",
            "baselines", "ratios", "throughput", "pct_peak"}
STATS_KEYS = {"median_s", "min_s", "max_s", "repeats_s", "noisy"}


def run(args, timeout=600):
    env = dict(os.environ)
    # a source checkout without an installed chainrule: the harness falls back to python/
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run([str(BENCH / "run_all.py"), "--smoke", "--no-progress", "--out", str(out),
                  "--device", "cpu"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, capsys):
    module = importlib.import_module(script[:-3])  # benchmarks/ is on sys.path
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out
    if script != "run_all.py":
        for option in ("--quick", "--smoke", "--dtype", "--shapes", "--device", "--json"):
            assert option in out


@pytest.mark.parametrize("subject", ("linear", "sweep", "gemm", "adam", "e2e"))
def test_smoke_json(smoke_run, subject):
    out, _ = smoke_run
    data = json.loads((out / f"{subject}.json").read_text())
    for key in ("subject", "machine", "versions", "git", "settings", "peaks", "rows"):
        assert key in data, key
    assert data["subject"] == subject
    assert data["settings"]["mode"] == "smoke"
    assert data["peaks"]["cpu"]["fp32_gflops"] > 0
    assert "commit" in data["git"]
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["check"]["ok"], row["check"]
        assert row["status"] == "ok"
        assert STATS_KEYS <= set(row["chainrule"])
        assert len(row["chainrule"]["repeats_s"]) == 1
        assert row["baselines"]
        for name, stats in row["baselines"].items():
            assert STATS_KEYS <= set(stats)
            assert row["ratios"][name] > 0


def test_smoke_machine(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "machine.json").read_text())
    cpu = data["peaks"]["cpu"]
    assert cpu["fp32_gflops"] > 0 and cpu["rmw_gbps"] > 0
    assert data["probe_rows"]


def test_smoke_report_and_plots(smoke_run):
    out, stdout = smoke_run
    report = (out / "report.md").read_text()
    assert "## Measured peaks" in report
    header = "| " + " | ".join(harness.TABLE_HEADER) + " |"
    # torch 2.6's FSDP2 cannot run on CPU ranks: bench_fsdp then measures nothing and says why.
    subjects = ("linear", "sweep", "gemm", "adam", "e2e") + (
        ("fsdp",) if hasattr(torch.cpu.current_stream(), "record_event") else ())
    assert report.count(header) == len(subjects)
    for subject in subjects:
        png = out / "plots" / f"{subject}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{subject}.png" in report
    # the aligned tables on stdout: header, rule, and rows with the same column separators
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("shape ")
               and "chainrule ms" in line]
    assert len(headers) == len(subjects)
    for i in headers:
        assert set(lines[i + 1]) <= {"-", "+"}
        assert lines[i + 2].count("|") == lines[i].count("|") == len(harness.TABLE_HEADER) - 1


def test_smoke_peak_memory_table(smoke_run):
    """One peak-memory table (forward+backward per activation, chainrule against torch) in the
    report and on stdout, one row per activation, every figure positive."""
    out, stdout = smoke_run
    report = (out / "report.md").read_text()
    header = "| " + " | ".join(harness.MEMORY_HEADER) + " |"
    assert report.count(header) == 1
    lines = stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("shape ")
               and "chainrule MiB" in line]
    assert len(headers) == 1
    body = lines[headers[0] + 2:headers[0] + 7]
    activations = ("none", "relu", "gelu", "gelu_tanh", "silu")
    for line, act in zip(body, activations):
        cells = [c.strip() for c in line.split("|")]
        assert len(cells) == len(harness.MEMORY_HEADER), line
        assert f" {act} fwd+bwd" in cells[0], line
        assert float(cells[1]) > 0 and float(cells[3]) > 0 and cells[2] == "torch eager", line
    data = json.loads((out / "linear.json").read_text())
    assert [r["config"]["activation"] for r in data["peak_memory"]] == list(activations)
    assert all(r["chainrule_bytes"] > 0 for r in data["peak_memory"])


def test_cuda_without_gpu_does_not_fail(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA path is exercised by run_all itself")
    result = run([str(BENCH / "bench_gemm.py"), "--smoke", "--device", "cuda", "--json",
                  str(tmp_path / "gemm_cuda.json")], timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "gemm_cuda.json").read_text())
    assert data["rows"] == [] and data["available"] is False
    assert "no CUDA device" in result.stdout


# ---- harness rules ------------------------------------------------------------------------------

def test_measure_interleaves_and_alternates():
    calls = []
    contenders = [harness.Contender(name, lambda _, n=name: calls.append(n)) for name in "ABC"]
    times = harness.measure(contenders, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("ABC") + list("ABC") + list("CBA") + list("ABC")
    assert all(len(t) == 3 for t in times.values())


def test_prepare_and_flush_are_untimed():
    order = []
    contender = harness.Contender("A", lambda state: order.append(("run", state)),
                                  lambda: order.append("prepare") or 7)
    harness.measure([contender], repeats=2, warmup=0, device=torch.device("cpu"),
                    flush=lambda: order.append("flush"))
    assert order == ["prepare", "flush", ("run", 7)] * 2


def test_noise_flag():
    assert harness.summarize([1.0, 1.05, 1.09])["noisy"] is False
    assert harness.summarize([1.0, 1.05, 1.2])["noisy"] is True
    assert harness.summarize([3.0, 1.0, 2.0])["median_s"] == 2.0


def test_wrong_result_gets_no_time():
    a = torch.ones(10)
    check = harness.check_close([a * 1.01], [a], torch.float32)
    assert not check.ok
    row = harness.make_row(subject="x", label="x", size=1.0,
                           times={"chainrule": [1.0], "torch": [2.0]}, check=check, work=1e9,
                           unit="GFLOP/s", peak=10.0, config={})
    assert row["status"] == "WRONG" and row["chainrule"] is None and row["ratios"] == {}
    assert row["pct_peak"] is None
    assert "WRONG" in "\n".join(harness.table_lines([row]))


def test_right_result_ratio_and_peak():
    a = torch.randn(100)
    check = harness.check_close([a.clone()], [a], torch.float32)
    assert check.ok
    row = harness.make_row(subject="x", label="x", size=1.0,
                           times={"chainrule": [1.0, 1.0, 1.0], "torch": [2.0, 2.0, 2.0]},
                           check=check, work=5e9, unit="GFLOP/s", peak=10.0, config={})
    assert row["ratios"]["torch"] == pytest.approx(2.0)
    assert row["throughput"]["chainrule"] == pytest.approx(5.0)
    assert row["pct_peak"] == pytest.approx(50.0)


def test_chainrule_raising_is_a_failed_check():
    def raises():
        raise NotImplementedError("no CUDA kernel for this dtype\nsecond line")
    check = harness.guarded(raises)
    assert not check.ok and check.error == "NotImplementedError: no CUDA kernel for this dtype"
    row = harness.make_row(subject="x", label="x", size=1.0, times={"torch": [1.0]}, check=check,
                           work=None, unit="GB/s", peak=None, config={})
    assert row["chainrule"] is None and row["baselines"]["torch"]["median_s"] == 1.0
    assert "ERROR NotImplementedError" in "\n".join(harness.table_lines([row]))


def test_probe_without_compiler_leaves_peaks_empty(monkeypatch):
    def no_compiler(out_dir=None):
        raise RuntimeError("the machine probe needs a C++ compiler (g++ not found)")
    monkeypatch.setattr(harness, "compile_probe", no_compiler)
    cpu = harness.probe_cpu(2, quick=True)
    assert "g++ not found" in cpu["error"]
    peaks = {"cpu": cpu}
    assert harness.peak_for(peaks, torch.device("cpu"), torch.float32, "flops")[0] is None
    assert "machine probe failed" in harness.peaks_line(peaks)
