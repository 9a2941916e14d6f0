"""make gpu-check: chainrule's checks on a GPU machine, in one command, within 9 minutes.

On a machine with a CUDA GPU and torch installed (no network needed), in order, each step with its
own time budget (seconds, STEPS below) inside a total of 540 that counts from the start:

  build        chainrule for this GPU's architecture only (capability -> CMake's
               CHAINRULE_CUDA_ARCHITECTURES), all cores, into build/gpu-check; the package is staged
               in build/gpu-check/python and every later step imports it from there (nothing is
               installed into the environment)
  port         tests/cuda_port/port_check.cu: every chainrule::port wrapper (ldmatrix, mma.sync,
               cp.async) on the GPU and under the emulator, compared word for word
  cuda-tests   the test suite's GPU rows: pytest -k "(cuda and not emulated_cuda) or gpu" over
               the test files that hold GPU tests (conftest's `backend` fixture, `cuda` parameter)
  memcheck,    compute-sanitizer on tests/cuda_sanitize/sanitize_workload.py (small linear shapes,
  racecheck    Adam steps); skipped with the reason where compute-sanitizer is not installed
  cuda-graphs  tests/test_cuda_graphs.py (whole-network capture, 20 param groups, CPU lr tensor,
               two streams, wide outputs)
  benchmarks   bench_machine (cuBLAS GEMM peak, device copy bandwidth), bench_gemm bf16 4096^3
               against cuBLAS, bench_adam fp32 and bf16 against torch's fused Adam, --device cuda

It writes gpu-check.json and gpu-check.md into --report-dir (with each step's log), prints a
summary, and exits 1 if a step failed, ran out of time or was not reached, 0 otherwise. Without a
CUDA device it exits 2 at once and runs nothing. README.md, "GPU check", has the time estimate.

The pieces are plain functions, tested without a GPU by tests/test_gpu_check.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Optional

STARTED = time.monotonic()  # the total budget counts from here: torch's import and detection included
ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "gpu-check"
TOTAL_BUDGET_S = 540
REPORT_S = 5  # kept at the end for the report
MINIMUM_STEP_S = 5  # a step with less time left than this is not started
PROBE_S = 15  # of the build's budget, kept for staging the package and importing it

# Step name -> time budget in seconds; the sum leaves 10 s of TOTAL_BUDGET_S for start-up (torch's
# import, detection) and the report (README.md, "GPU check").
STEPS = {
    "build": 115,
    "port": 30,
    "cuda-tests": 145,
    "memcheck": 60,
    "racecheck": 60,
    "cuda-graphs": 30,
    "benchmarks": 90,
}

# Test files with no GPU rows (builds, compilers, the emulator, CPU-only subjects) and the file
# that has its own step; every other tests/test_*.py file is run with the CUDA rows selected.
NOT_CUDA_TEST_FILES = {
    "test_adam_build.py", "test_benchmarks.py", "test_build.py", "test_build_configure.py",
    "test_cpu_isa.py", "test_cuda_build.py", "test_distributed.py", "test_emulator.py",
    "test_examples.py", "test_gpu_check.py", "test_linear_sanitizers.py", "test_cuda_graphs.py",
    "test_cuda_host_code.py",
}
# The `cuda` rows of the backend fixture and the tests named for the GPU (test_adam_kernels.py's
# test_cpu_and_gpu_are_bitwise_identical).
CUDA_TESTS_KEYWORD = "(cuda and not emulated_cuda) or gpu"
# Skip reasons that mean the GPU rows did not run at all: a failure on a GPU machine.
CUDA_MISSING_REASONS = ("no CUDA device", "built without its CUDA kernels")


class GpuCheckError(Exception):
    """A condition that stops the check, with a message for the user."""


# ---------------------------------------------------------------------------------------------
# Architecture: compute capability -> what to compile for

@dataclasses.dataclass(frozen=True)
class Architecture:
    capability: tuple[int, int]
    cmake: str          # the value of CHAINRULE_CUDA_ARCHITECTURES (CMake's CUDA_ARCHITECTURES)
    nvcc_flags: tuple[str, ...]  # the same choice as nvcc flags (the port check program)
    note: str = ""


def nvcc_architectures(list_gpu_arch_output: str) -> list[int]:
    """`nvcc --list-gpu-arch` ("compute_75\\ncompute_80\\n...") -> [75, 80, ...]; the
    architecture-specific variants (compute_90a, compute_100f) are left out."""
    return sorted({int(m) for m in re.findall(r"^compute_(\d+)$", list_gpu_arch_output, re.M)})


def architecture_for(capability: tuple[int, int], supported: list[int]) -> Architecture:
    """The architecture to build for a GPU of `capability`, given what nvcc can compile for.

    SASS for exactly that GPU when nvcc knows it; for a GPU newer than this nvcc, PTX of the newest
    architecture it knows (the driver compiles it at load time). The kernels need sm_80
    (cp.async, ldmatrix, bf16 mma.sync)."""
    major, minor = capability
    arch = 10 * major + minor
    if arch < 80:
        raise GpuCheckError(f"gpu-check: the GPU has compute capability {major}.{minor}; chainrule's "
                            "CUDA kernels need 8.0 or newer (cp.async, ldmatrix, bf16 mma.sync)")
    if arch in supported:
        return Architecture(capability, str(arch), ("-gencode", f"arch=compute_{arch},code=sm_{arch}"))
    older = [a for a in supported if 80 <= a < arch]
    if not older:
        raise GpuCheckError(f"gpu-check: nvcc can compile for none of sm_80 ... sm_{arch} "
                            f"(it lists {supported}); install a CUDA toolkit that knows sm_{arch}")
    best = max(older)
    return Architecture(capability, f"{best}-virtual",
                        ("-gencode", f"arch=compute_{best},code=compute_{best}"),
                        note=f"nvcc knows no sm_{arch}: PTX for compute_{best}, compiled by the "
                             "driver when the module loads")


def cmake_configure_command(cmake: str, python: str, architecture: Architecture, build_dir: Path,
                            ninja: Optional[str]) -> list[str]:
    """CMake's configure step for the GPU check's build: CUDA kernels required, one architecture;
    Ninja when there is one, else CMake's default generator."""
    command = [cmake, "-S", str(ROOT), "-B", str(build_dir)]
    if ninja:
        command += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return command + [f"-DPython_EXECUTABLE={python}", "-DCMAKE_BUILD_TYPE=Release",
                      "-DSKBUILD_PROJECT_VERSION=0.1.0", "-DCHAINRULE_CUDA=ON",
                      f"-DCHAINRULE_CUDA_ARCHITECTURES={architecture.cmake}"]


def cmake_build_command(cmake: str, build_dir: Path, jobs: int) -> list[str]:
    return [cmake, "--build", str(build_dir), "--parallel", str(jobs)]


def find_cmake(python: str) -> Optional[str]:
    """cmake >= 3.26: next to the interpreter (the pip package), else on PATH."""
    candidates = [str(Path(python).parent / "cmake"), shutil.which("cmake")]
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\d+)\.(\d+)", out)
        if m and (int(m.group(1)), int(m.group(2))) >= (3, 26):
            return candidate
    return None


def find_ninja(python: str) -> Optional[str]:
    """ninja next to the interpreter (the pip package) or on PATH."""
    beside = Path(python).parent / "ninja"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("ninja")


def find_tool(name: str, cuda_home: Optional[str]) -> Optional[str]:
    """A CUDA tool (nvcc, compute-sanitizer): CUDA_HOME/bin, PATH, /usr/local/cuda*/bin."""
    places = []
    if cuda_home:
        places += [Path(cuda_home) / "bin" / name, Path(cuda_home) / "compute-sanitizer" / name]
    if shutil.which(name):
        places.append(Path(shutil.which(name)))
    places += [Path(p) for p in sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)]
    return next((str(p) for p in places if p.is_file() and os.access(p, os.X_OK)), None)


def cuda_home_of(nvcc: Optional[str]) -> Optional[str]:
    """CUDA_HOME, else the toolkit root nvcc reports (nvcc on PATH may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if not nvcc:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    m = re.search(r"^#\$ _HERE_=(.*)/bin$", dry.stdout + dry.stderr, re.M)
    return m.group(1).strip() if m else str(Path(nvcc).resolve().parents[1])


def stage_package(build_dir: Path) -> Path:
    """build_dir/python/chainrule: the Python sources and the freshly built _C; returns the folder
    that goes on PYTHONPATH."""
    built = sorted(build_dir.glob("_C*.so"))
    if not built:
        raise GpuCheckError(f"gpu-check: the build left no _C*.so in {build_dir}")
    staged = build_dir / "python"
    package = staged / "chainrule"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(ROOT / "python" / "chainrule", package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(built[0], package / built[0].name)
    return staged


# ---------------------------------------------------------------------------------------------
# Running commands and steps within budgets

@dataclasses.dataclass
class CommandResult:
    command: list[str]
    returncode: Optional[int]   # None when it was stopped at its timeout
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(command: list[str], timeout: float, *, env: Optional[dict] = None,
                cwd: Optional[Path] = None, log: Optional[Path] = None) -> CommandResult:
    """Runs `command` (stdout and stderr together) for at most `timeout` seconds; on the timeout
    its whole process group is killed. The output also goes to `log` when given."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(timeout, 0.001))
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
    seconds = time.monotonic() - start
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(command)}\n{output}\n"
                    f"[{'timed out' if returncode is None else f'exit {returncode}'} after {seconds:.1f} s]\n")
    return CommandResult(list(command), returncode, seconds, output)


@dataclasses.dataclass
class StepResult:
    name: str
    status: str            # passed | failed | timeout | skipped | not_run
    seconds: float = 0.0
    budget_s: float = 0.0
    summary: str = ""
    output_tail: str = ""
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Step:
    name: str
    budget_s: float
    run: Callable[[float], StepResult]   # gets its timeout in seconds
    needs: tuple[str, ...] = ()          # steps that must have passed first


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_steps(steps: list[Step], total_budget_s: float,
              clock: Callable[[], float] = time.monotonic,
              announce: Callable[[str], None] = lambda line: None) -> list[StepResult]:
    """Runs the steps in order. Each gets min(its budget, what is left of the total); a step whose
    prerequisite did not pass, or that would get less than MINIMUM_STEP_S, is not run; a step that
    raises fails with the exception's message."""
    start = clock()
    results: dict[str, StepResult] = {}
    for step in steps:
        left = total_budget_s - (clock() - start)
        missing = [n for n in step.needs if results.get(n) is None or results[n].status != "passed"]
        if missing:
            result = StepResult(step.name, "not_run", budget_s=step.budget_s,
                                summary=f"not run: {', '.join(missing)} did not pass")
        elif left < MINIMUM_STEP_S:
            result = StepResult(step.name, "not_run", budget_s=step.budget_s,
                                summary=f"not run: {max(left, 0):.0f} s of the {total_budget_s:.0f} s "
                                        "total budget left")
        else:
            timeout = min(step.budget_s, left)
            announce(f"gpu-check: {step.name} (budget {timeout:.0f} s) ...")
            began = clock()
            try:
                result = step.run(timeout)
            except GpuCheckError as error:
                result = StepResult(step.name, "failed", summary=str(error))
            except Exception as error:  # noqa: BLE001 - one broken step must not hide the others
                result = StepResult(step.name, "failed", summary=f"{type(error).__name__}: {error}")
            result.name = step.name
            result.budget_s = timeout
            if not result.seconds:
                result.seconds = clock() - began
        results[step.name] = result
        announce(f"gpu-check: {result.name}: {result.status} ({result.seconds:.1f} s) {result.summary}")
    return list(results.values())


def command_step_result(name: str, result: CommandResult, timeout: float, summary: str,
                        ok: bool, data: Optional[dict] = None) -> StepResult:
    """A StepResult from a command: timeout when it was stopped, else passed/failed per `ok`."""
    if result.timed_out:
        return StepResult(name, "timeout", result.seconds, timeout,
                          f"stopped at its {timeout:.0f} s budget; {summary}".rstrip("; "),
                          tail(result.output), data or {})
    return StepResult(name, "passed" if ok else "failed", result.seconds, timeout, summary,
                      tail(result.output), data or {})


# ---------------------------------------------------------------------------------------------
# Reading the tools' outputs

def pytest_counts(junit_xml: str) -> dict:
    """Counts from pytest's --junitxml report, and the skip reasons with how often each occurs."""
    root = ElementTree.fromstring(junit_xml)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons: dict[str, int] = {}
    for skipped in root.iter("skipped"):
        reason = (skipped.get("message") or "").strip()
        reasons[reason] = reasons.get(reason, 0) + 1
    counts["skip_reasons"] = reasons
    # A test file that cannot be imported (hypothesis missing on the GPU machine, say) is a
    # collection error; name the missing modules.
    missing = set()
    for error in root.iter("error"):
        missing.update(re.findall(r"No module named '([\w.]+)'", (error.get("message") or "") + (error.text or "")))
    counts["missing_modules"] = sorted(missing)
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def pytest_lines(counts: dict, limit: int = 20) -> list[str]:
    """The report's lines for a pytest step: failed tests (at most `limit`), then skip reasons."""
    failed = counts["failed_tests"]
    lines = [f"failed: {name}" for name in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more failed")
    lines += [f"skipped {n}x: {reason}" for reason, n in sorted(counts["skip_reasons"].items(),
                                                              key=lambda item: -item[1])]
    return lines


def pytest_verdict(counts: dict) -> tuple[bool, str]:
    """Passed when nothing failed, something ran, and no test was skipped for want of the GPU."""
    text = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    no_gpu = sum(n for reason, n in counts["skip_reasons"].items()
                 if any(r in reason for r in CUDA_MISSING_REASONS))
    if no_gpu:
        return False, text + f" ({no_gpu} skipped because the CUDA rows could not run)"
    if counts.get("missing_modules"):
        return False, text + f" (not installed: {', '.join(counts['missing_modules'])})"
    if counts["failures"] or counts["errors"]:
        return False, text
    if counts["passed"] == 0:
        return False, text + " (nothing ran)"
    return True, text


def port_check_counts(output: str) -> dict:
    """port_check's lines -> counts per status and the failed case lines."""
    counts = {"PASS": 0, "FAIL": 0, "EMULATED": 0}
    failures = []
    for line in output.splitlines():
        word = line.split(" ", 1)[0]
        if word in counts:
            counts[word] += 1
            if word == "FAIL":
                failures.append(line)
    return {"passed": counts["PASS"], "failed": counts["FAIL"], "emulator_only": counts["EMULATED"],
            "failures": failures}


def sanitizer_command(sanitizer: str, tool: str, help_text: str, python: str, script: Path) -> list[str]:
    """compute-sanitizer --tool TOOL on `script`, instrumenting only chainrule's kernels when this
    version has a kernel-name filter (--kernel-name, earlier --kernel-regex; every kernel of ours
    is in namespace chainrule)."""
    command = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20"]
    for option in ("--kernel-name", "--kernel-regex"):
        if option in help_text:
            command += [option, "kns=chainrule"]
            break
    return command + [python, str(script), "--quick"]


def sanitizer_verdict(output: str, returncode: Optional[int], marker: str) -> tuple[bool, str]:
    """compute-sanitizer's verdict: its ERROR SUMMARY (and racecheck's hazard summary), and whether
    the workload reached its end. No ERROR SUMMARY means the tool itself did not run."""
    errors = re.search(r"ERROR SUMMARY: (\d+) error", output)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)",
                        output)
    if errors is None:
        return False, f"compute-sanitizer gave no ERROR SUMMARY (exit {returncode}): it did not run"
    text = f"{errors.group(1)} errors"
    if hazards:
        text += f"; racecheck: {hazards.group(2)} error hazards, {hazards.group(3)} warnings"
    finished = marker in output
    if not finished:
        text += "; the workload did not finish"
    return int(errors.group(1)) == 0 and returncode == 0 and finished, text


def benchmark_rows(results: dict) -> list[dict]:
    """The rows of a benchmark JSON (harness.write_results) in short form."""
    rows = []
    for row in results.get("rows", []):
        ours = (row.get("chainrule") or {}).get("median_s")
        baselines = {name: s.get("median_s") for name, s in (row.get("baselines") or {}).items()}
        rows.append({"label": row.get("label"), "status": row.get("status"),
                     "chainrule_ms": None if ours is None else 1e3 * ours,
                     "baselines_ms": {k: (None if v is None else 1e3 * v) for k, v in baselines.items()},
                     "ratios": row.get("ratios", {}), "throughput": row.get("throughput", {}),
                     "unit": row.get("unit"), "pct_peak": row.get("pct_peak"),
                     "peak_name": row.get("peak_name")})
    return rows


def benchmark_line(row: dict) -> str:
    """One benchmark row in a line: time, ratio to each baseline, rate, % of the measured peak."""
    if row["status"] == "WRONG" or row["chainrule_ms"] is None:
        return f"{row['label']}: WRONG (no time)"
    parts = [f"{row['label']}: {row['chainrule_ms']:.3f} ms"]
    for name, ratio in row["ratios"].items():
        parts.append(f"{ratio:.2f}x {name} ({row['baselines_ms'][name]:.3f} ms)")
    rate = row["throughput"].get("chainrule")
    if rate is not None:
        parts.append(f"{rate:.1f} {row.get('unit') or ''}".rstrip())
    if row.get("pct_peak") is not None:
        parts.append(f"{row['pct_peak']:.0f}% of {row.get('peak_name') or 'the peak'}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The report

def overall_status(results: list[StepResult]) -> str:
    """passed when every step passed or was skipped with a reason; failed otherwise."""
    return "passed" if all(r.status in ("passed", "skipped") for r in results) else "failed"


def exit_code(results: list[StepResult]) -> int:
    return 0 if overall_status(results) == "passed" else 1


def report_json(results: list[StepResult], info: dict) -> dict:
    return {"status": overall_status(results), "info": info,
            "total_seconds": round(sum(r.seconds for r in results), 1),
            "steps": [dataclasses.asdict(r) for r in results]}


def report_markdown(results: list[StepResult], info: dict) -> str:
    lines = ["# chainrule GPU check", ""]
    for key, value in info.items():
        lines.append(f"- {key}: {value}")
    lines += ["", f"**{overall_status(results)}** in {sum(r.seconds for r in results):.1f} s", "",
              "| step | status | seconds | budget s | summary |", "|---|---|---:|---:|---|"]
    for r in results:
        summary = r.summary.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | {summary} |")
    for r in results:
        if r.data.get("lines"):
            lines += ["", f"## {r.name}", ""] + [f"- {line}" for line in r.data["lines"]]
    failed = [r for r in results if r.status in ("failed", "timeout") and r.output_tail]
    for r in failed:
        lines += ["", f"## {r.name}: last lines of its output", "", "```", r.output_tail, "```"]
    return "\n".join(lines) + "\n"


def summary_lines(results: list[StepResult]) -> list[str]:
    width = max((len(r.name) for r in results), default=4)
    lines = [f"{r.name:<{width}}  {r.status:<8} {r.seconds:6.1f} s  {r.summary}" for r in results]
    lines.append(f"gpu-check: {overall_status(results)} in {sum(r.seconds for r in results):.1f} s")
    return lines


def write_report(results: list[StepResult], info: dict, report_dir: Path) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = report_dir / "gpu-check.json", report_dir / "gpu-check.md"
    json_path.write_text(json.dumps(report_json(results, info), indent=1) + "\n")
    md_path.write_text(report_markdown(results, info))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# The steps on a GPU machine

@dataclasses.dataclass
class Context:
    python: str
    jobs: int
    report_dir: Path
    architecture: Architecture
    nvcc: str
    cuda_home: Optional[str]
    staged: Optional[Path] = None   # PYTHONPATH of the built package, once built

    def env(self, **extra) -> dict:
        env = dict(os.environ, **extra)
        if self.staged is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.staged), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if self.cuda_home:
            env["CUDA_HOME"] = self.cuda_home
        return env

    def log(self, step: str) -> Path:
        return self.report_dir / "logs" / f"{step}.log"


def build_step(ctx: Context, timeout: float) -> StepResult:
    cmake = find_cmake(ctx.python)
    if cmake is None:
        raise GpuCheckError("gpu-check: no cmake >= 3.26 next to the interpreter or on PATH "
                            "(pip install cmake ninja)")
    deadline = time.monotonic() + timeout
    configure = run_command(cmake_configure_command(cmake, ctx.python, ctx.architecture, BUILD_DIR,
                                                    find_ninja(ctx.python)),
                            timeout, env=ctx.env(), log=ctx.log("build"))
    if configure.timed_out or configure.returncode != 0:
        return command_step_result("build", configure, timeout, "CMake's configure step failed", False)
    # The import check after the build gets the last PROBE_S seconds of the budget.
    build = run_command(cmake_build_command(cmake, BUILD_DIR, ctx.jobs), deadline - time.monotonic() - PROBE_S,
                        env=ctx.env(CMAKE_BUILD_PARALLEL_LEVEL=str(ctx.jobs)), log=ctx.log("build"))
    seconds = configure.seconds + build.seconds
    if build.timed_out or build.returncode != 0:
        result = command_step_result("build", build, timeout, "the build failed", False)
        result.seconds = seconds
        return result
    ctx.staged = stage_package(BUILD_DIR)
    probe = run_command([ctx.python, "-c", "import chainrule, json; print(json.dumps(chainrule.build_info())); "
                         "print(chainrule.__file__)"], max(deadline - time.monotonic(), 1), env=ctx.env(),
                        log=ctx.log("build"))
    info = {}
    if probe.returncode == 0:
        info = json.loads(next(line for line in probe.output.splitlines() if line.startswith("{")))
    ok = (bool(info.get("cuda_compiled")) and str(ctx.staged) in probe.output
          and info.get("cuda_architectures") == [f"sm_{ctx.architecture.cmake}"])
    summary = (f"sm {ctx.architecture.cmake}, {ctx.jobs} jobs, configure {configure.seconds:.0f} s + "
               f"build {build.seconds:.0f} s; build_info: {info or probe.output.strip()[-300:]}")
    return StepResult("build", "passed" if ok else "failed", seconds + probe.seconds, timeout, summary,
                      tail(build.output, 10), {"build_info": info})


def port_step(ctx: Context, timeout: float) -> StepResult:
    source = ROOT / "tests" / "cuda_port"
    exe = BUILD_DIR / "port_check"
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    command = [ctx.nvcc, "-std=c++20", "-O2", *ctx.architecture.nvcc_flags,
               "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "include"), "-I", str(source),
               "-Xcompiler", "-ffp-contract=off,-fno-strict-aliasing,-pthread",
               str(source / "port_check.cu"), str(source / "port_emulated.cpp"), "-o", str(exe)]
    deadline = time.monotonic() + timeout
    compiled = run_command(command, timeout, env=ctx.env(), log=ctx.log("port"))
    if compiled.timed_out or compiled.returncode != 0:
        return command_step_result("port", compiled, timeout, "nvcc could not build port_check", False)
    run = run_command([str(exe), "--require-gpu"], deadline - time.monotonic(), env=ctx.env(), log=ctx.log("port"))
    counts = port_check_counts(run.output)
    summary = (f"{counts['passed']} cases equal on GPU and emulator, {counts['failed']} failed, "
               f"{counts['emulator_only']} not compared")
    result = command_step_result("port", run, timeout, summary,
                                 run.returncode == 0 and counts["failed"] == 0 and counts["passed"] > 0,
                                 {"counts": counts, "lines": counts["failures"]})
    result.seconds = compiled.seconds + run.seconds
    return result


def cuda_test_files() -> list[str]:
    return sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in NOT_CUDA_TEST_FILES)


def pytest_step(ctx: Context, timeout: float, name: str, files: list[str], keyword: Optional[str]) -> StepResult:
    junit = ctx.report_dir / f"{name}.xml"
    if junit.exists():
        junit.unlink()
    command = [ctx.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={junit}"]
    if keyword:
        command += ["-k", keyword]
    run = run_command(command + files, timeout, env=ctx.env(), cwd=ROOT / "tests", log=ctx.log(name))
    if not junit.exists():
        why = "pytest is not installed" if "No module named pytest" in run.output else "pytest wrote no report"
        return command_step_result(name, run, timeout, f"{why} (exit {run.returncode})", False)
    counts = pytest_counts(junit.read_text())
    ok, summary = pytest_verdict(counts)
    return command_step_result(name, run, timeout, summary, ok and run.returncode == 0,
                               {"counts": counts, "lines": pytest_lines(counts)})


def sanitizer_step(ctx: Context, timeout: float, tool: str) -> StepResult:
    sanitizer = find_tool("compute-sanitizer", ctx.cuda_home)
    if sanitizer is None:
        return StepResult(tool, "skipped", 0.0, timeout,
                          "compute-sanitizer is not installed (CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)")
    shown = subprocess.run([sanitizer, "--help"], capture_output=True, text=True)
    help_text = shown.stdout + shown.stderr
    script = ROOT / "tests" / "cuda_sanitize" / "sanitize_workload.py"
    run = run_command(sanitizer_command(sanitizer, tool, help_text, ctx.python, script), timeout,
                      env=ctx.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"), log=ctx.log(tool))
    ok, summary = sanitizer_verdict(run.output, run.returncode, "sanitize workload: ok")
    return command_step_result(tool, run, timeout, summary, ok)


BENCHMARKS = (
    ("machine", ["bench_machine.py", "--quick"]),
    ("gemm", ["bench_gemm.py", "--quick", "--dtype", "bfloat16", "--shapes", "4096x4096x4096"]),
    ("adam", ["bench_adam.py", "--quick", "--dtype", "float32,bfloat16"]),
)


def benchmarks_step(ctx: Context, timeout: float) -> StepResult:
    out = ctx.report_dir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    lines, rows, failures, seconds, last = [], {}, [], 0.0, None
    for subject, args in BENCHMARKS:
        json_path = out / f"{subject}_cuda.json"
        command = [ctx.python, str(ROOT / "benchmarks" / args[0]), *args[1:], "--device", "cuda",
                   "--no-progress", "--json", str(json_path), "--machine", str(out / "machine_cuda.json")]
        last = run_command(command, deadline - time.monotonic(), env=ctx.env(), log=ctx.log("benchmarks"))
        seconds += last.seconds
        if last.timed_out:
            break
        if last.returncode != 0 or not json_path.exists():
            failures.append(f"{subject}: exit {last.returncode}")
            continue
        data = json.loads(json_path.read_text())
        if not data.get("available", True) or (subject != "machine" and not data.get("rows")):
            failures.append(f"{subject}: {data.get('reason') or 'no rows'}")
            continue
        if subject == "machine":
            cuda = (data.get("peaks") or {}).get("cuda") or {}
            lines.append(f"{cuda.get('name')}: cuBLAS bf16 GEMM 8192^3 {cuda.get('bf16_tflops', 0):.0f} TFLOP/s, "
                         f"device copy {cuda.get('copy_gbps', 0):.0f} GB/s")
            continue
        rows[subject] = benchmark_rows(data)
        for row in rows[subject]:
            lines.append(benchmark_line(row))
            if row["status"] == "WRONG":
                failures.append(f"{subject}: {row['label']} WRONG")
    summary = f"{sum(len(r) for r in rows.values())} rows" + (f"; {'; '.join(failures)}" if failures else "")
    result = command_step_result("benchmarks", last, timeout, summary, not failures,
                                 {"rows": rows, "lines": lines})
    result.seconds = seconds
    return result


def make_steps(ctx: Context) -> list[Step]:
    after_build = ("build",)
    return [
        Step("build", STEPS["build"], lambda t: build_step(ctx, t)),
        Step("port", STEPS["port"], lambda t: port_step(ctx, t)),
        Step("cuda-tests", STEPS["cuda-tests"],
             lambda t: pytest_step(ctx, t, "cuda-tests", cuda_test_files(), CUDA_TESTS_KEYWORD), after_build),
        Step("memcheck", STEPS["memcheck"], lambda t: sanitizer_step(ctx, t, "memcheck"), after_build),
        Step("racecheck", STEPS["racecheck"], lambda t: sanitizer_step(ctx, t, "racecheck"), after_build),
        Step("cuda-graphs", STEPS["cuda-graphs"],
             lambda t: pytest_step(ctx, t, "cuda-graphs", ["test_cuda_graphs.py"], None), after_build),
        Step("benchmarks", STEPS["benchmarks"], lambda t: benchmarks_step(ctx, t), after_build),
    ]


# ---------------------------------------------------------------------------------------------

def no_gpu_message(torch_version: str, torch_cuda: Optional[str]) -> str:
    return (f"gpu-check: no CUDA device visible to torch {torch_version} (CUDA {torch_cuda}); "
            "nothing was built or run. Run `make gpu-check` on a machine with an NVIDIA GPU "
            "(sm_80 or newer) and a CUDA build of torch.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report-dir", type=Path, default=Path("gpu-check-report"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs (default: every core)")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S,
                   help=f"seconds for the whole check, start-up and report included (default {TOTAL_BUDGET_S})")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415 - the pieces above are tested without torch's start-up cost

    if not torch.cuda.is_available():
        print(no_gpu_message(torch.__version__, torch.version.cuda), file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability()
    nvcc = find_tool("nvcc", os.environ.get("CUDA_HOME"))
    if nvcc is None:
        print("gpu-check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 1
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    try:
        architecture = architecture_for(capability, nvcc_architectures(listed))
    except GpuCheckError as error:
        print(error, file=sys.stderr)
        return 1
    report_dir = args.report_dir.resolve()
    if (report_dir / "logs").exists():
        shutil.rmtree(report_dir / "logs")
    ctx = Context(python=sys.executable, jobs=args.jobs, report_dir=report_dir, architecture=architecture,
                  nvcc=nvcc, cuda_home=cuda_home_of(nvcc))
    nvcc_version = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                 text=True).stdout)
    info = {"gpu": torch.cuda.get_device_name(), "capability": f"{capability[0]}.{capability[1]}",
            "architecture": architecture.cmake + (f" ({architecture.note})" if architecture.note else ""),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "nvcc": nvcc_version.group(1) if nvcc_version else nvcc, "python": sys.version.split()[0],
            "cores": os.cpu_count(), "jobs": args.jobs,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"gpu-check: {info['gpu']} (sm_{capability[0]}{capability[1]}), torch {info['torch']}, "
          f"nvcc {info['nvcc']}; building for {info['architecture']} with {args.jobs} jobs; "
          f"budget {args.total_budget:.0f} s", flush=True)
    steps_budget = args.total_budget - (time.monotonic() - STARTED) - REPORT_S
    results = run_steps(make_steps(ctx), steps_budget, announce=lambda line: print(line, flush=True))
    json_path, md_path = write_report(results, info, report_dir)
    print("\n".join(summary_lines(results)))
    print(f"gpu-check: report {json_path} and {md_path}; logs in {report_dir / 'logs'}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
