"""`make gpu-check` (tools/gpu_check.py) without a GPU: the pieces that need none.

- the choice of architecture from the GPU's compute capability, as nvcc flags and as the CMake
  configure command (whose CHAINRULE_CUDA_ARCHITECTURES really reaches the build: a configure run);
- the step runner's budgets (each step gets min(its budget, what is left), prerequisites,
  exceptions) and the command runner's timeout, which kills the whole process group;
- reading pytest's JUnit XML, port_check's lines, compute-sanitizer's summary and the benchmark
  JSON (rows made by the benchmarks' own harness);
- the JSON and Markdown report, the summary and the exit code;
- the port check program (tests/cuda_port/port_check.cu) compiled by nvcc for sm_90 and its
  emulated half run here, where every case is checked against the PTX ISA's layouts;
- the selection of the suite's CUDA rows (pytest -k) collects only `cuda` rows;
- without a CUDA device, `make gpu-check` exits at once with the reason and builds nothing.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check", ROOT / "tools" / "gpu_check.py")
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402

NVCC = gpu_check.find_tool("nvcc", None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda*)")


# ---- architecture ------------------------------------------------------------------------------

NVCC_13_LIST = "compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_88\ncompute_89\ncompute_90\n" \
               "compute_90a\ncompute_100\ncompute_100a\ncompute_103\ncompute_110\ncompute_120\ncompute_121\n"


def test_nvcc_architecture_list_is_parsed():
    assert gpu_check.nvcc_architectures(NVCC_13_LIST) == [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]


@needs_nvcc
def test_this_nvcc_lists_sm_80_and_sm_90():
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout
    assert {80, 90} <= set(gpu_check.nvcc_architectures(listed)), listed


@pytest.mark.parametrize("capability,cmake,flag", [
    ((9, 0), "90", "arch=compute_90,code=sm_90"),         # H100 / H200
    ((8, 0), "80", "arch=compute_80,code=sm_80"),         # A100
    ((8, 6), "86", "arch=compute_86,code=sm_86"),
    ((12, 0), "120", "arch=compute_120,code=sm_120"),
])
def test_capability_gives_one_architecture(capability, cmake, flag):
    arch = gpu_check.architecture_for(capability, gpu_check.nvcc_architectures(NVCC_13_LIST))
    assert arch.cmake == cmake
    assert arch.nvcc_flags == ("-gencode", flag)
    assert arch.note == ""


def test_gpu_newer_than_nvcc_gets_ptx_of_the_newest_known_architecture():
    arch = gpu_check.architecture_for((13, 0), [75, 80, 90, 120])
    assert arch.cmake == "120-virtual"
    assert arch.nvcc_flags == ("-gencode", "arch=compute_120,code=compute_120")
    assert "nvcc knows no sm_130" in arch.note


@pytest.mark.parametrize("capability,supported,message", [
    ((7, 5), [75, 80, 90], "compute capability 7.5; chainrule's CUDA kernels need 8.0"),
    ((9, 0), [70, 75], "nvcc can compile for none of sm_80 ... sm_90"),
])
def test_unsupported_architectures_are_refused(capability, supported, message):
    with pytest.raises(gpu_check.GpuCheckError, match=re.escape(message)):
        gpu_check.architecture_for(capability, supported)


def test_configure_command_requires_cuda_for_that_architecture_only(tmp_path):
    arch = gpu_check.architecture_for((9, 0), [80, 90])
    command = gpu_check.cmake_configure_command("cmake", "/usr/bin/python3", arch, tmp_path, "/bin/ninja")
    assert command[:5] == ["cmake", "-S", str(ROOT), "-B", str(tmp_path)]
    assert "-DCHAINRULE_CUDA_ARCHITECTURES=90" in command
    assert "-DCHAINRULE_CUDA=ON" in command
    assert "-DPython_EXECUTABLE=/usr/bin/python3" in command
    assert command[5:8] == ["-G", "Ninja", "-DCMAKE_MAKE_PROGRAM=/bin/ninja"]
    assert "-G" not in gpu_check.cmake_configure_command("cmake", "python", arch, tmp_path, None)
    assert gpu_check.cmake_build_command("cmake", tmp_path, 16) == ["cmake", "--build", str(tmp_path),
                                                                     "--parallel", "16"]


def _cuda_kernels_buildable() -> str:
    """'' when this torch and nvcc can build the CUDA kernels, else why not."""
    if NVCC is None:
        return "nvcc not found"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    nvcc_major = re.search(r"release (\d+)", version).group(1)
    if torch.version.cuda.split(".")[0] != nvcc_major:
        return f"torch is built for CUDA {torch.version.cuda}, nvcc is CUDA {nvcc_major}"
    return ""


def test_configure_step_builds_the_cuda_kernels_for_the_chosen_architecture(tmp_path):
    why = _cuda_kernels_buildable()
    if why:
        pytest.skip(f"the CUDA kernels cannot be configured here: {why}")
    cmake = gpu_check.find_cmake(sys.executable)
    if cmake is None:
        pytest.skip("cmake >= 3.26 not found")
    arch = gpu_check.architecture_for((8, 6), [80, 86, 90])
    env = dict(__import__("os").environ, CUDA_HOME=gpu_check.cuda_home_of(NVCC))
    run = subprocess.run(gpu_check.cmake_configure_command(cmake, sys.executable, arch, tmp_path / "build",
                                                           gpu_check.find_ninja(sys.executable)),
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "chainrule: CUDA kernels for sm_86 with" in run.stdout, run.stdout[-3000:]
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "CHAINRULE_CUDA_ARCHITECTURES:STRING=86" in cache


# ---- commands and steps ------------------------------------------------------------------------

def test_command_output_and_exit_code_are_kept(tmp_path):
    log = tmp_path / "logs" / "step.log"
    result = gpu_check.run_command([sys.executable, "-c", "import sys; print('out'); "
                                    "print('err', file=sys.stderr); sys.exit(3)"], 30, log=log)
    assert result.returncode == 3 and not result.timed_out
    assert "out" in result.output and "err" in result.output
    assert "[exit 3 after" in log.read_text()


def test_command_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "survivor"
    # A child that would outlive its parent: it must be killed with the group.
    script = f"sleep 3 && touch {marker} & sleep 30"
    start = time.monotonic()
    result = gpu_check.run_command(["sh", "-c", script], 0.5)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - start < 10
    time.sleep(3.5)
    assert not marker.exists(), "a child process survived the timeout"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _step(name, seconds, clock, status="passed", needs=(), seen=None, error=None):
    def run(timeout):
        if seen is not None:
            seen[name] = timeout
        clock.now += seconds
        if error is not None:
            raise error
        return gpu_check.StepResult(name, status, summary=f"{name} ran")
    return gpu_check.Step(name, 100, run, needs)


def test_each_step_gets_its_budget_or_what_is_left():
    clock, seen = FakeClock(), {}
    steps = [_step("a", 150, clock, seen=seen), _step("b", 30, clock, seen=seen),
             _step("c", 10, clock, seen=seen), _step("d", 10, clock, seen=seen)]
    results = gpu_check.run_steps(steps, 250, clock=clock)
    assert seen == {"a": 100, "b": 100, "c": 70, "d": 60}  # c and d: what is left of 250 s
    assert [r.status for r in results][:3] == ["passed"] * 3
    assert results[0].seconds == 150 and results[0].budget_s == 100


def test_a_step_is_not_started_without_enough_time_left():
    clock = FakeClock()
    results = gpu_check.run_steps([_step("a", 248, clock), _step("b", 1, clock)], 250, clock=clock)
    assert results[1].status == "not_run"
    assert "2 s of the 250 s total budget left" in results[1].summary
    assert gpu_check.exit_code(results) == 1


def test_prerequisites_and_exceptions():
    clock = FakeClock()
    results = gpu_check.run_steps([
        _step("build", 1, clock, status="failed"),
        _step("tests", 1, clock, needs=("build",)),
        _step("port", 1, clock, error=RuntimeError("nvcc exploded")),
        _step("gpu", 1, clock, error=gpu_check.GpuCheckError("gpu-check: no cmake")),
    ], 500, clock=clock)
    assert [(r.name, r.status) for r in results] == [("build", "failed"), ("tests", "not_run"),
                                                     ("port", "failed"), ("gpu", "failed")]
    assert results[1].summary == "not run: build did not pass"
    assert results[2].summary == "RuntimeError: nvcc exploded"
    assert results[3].summary == "gpu-check: no cmake"


def test_a_command_stopped_at_its_budget_is_a_timeout():
    result = gpu_check.run_command(["sleep", "5"], 0.2)
    step = gpu_check.command_step_result("port", result, 0.2, "3 cases", True)
    assert step.status == "timeout" and "stopped at its 0 s budget" in step.summary
    assert gpu_check.exit_code([step]) == 1


def test_budgets_fit_in_nine_minutes():
    # 10 s of the 540 are left for torch's import, the detection and the report.
    assert sum(gpu_check.STEPS.values()) + 10 <= gpu_check.TOTAL_BUDGET_S == 540
    assert gpu_check.REPORT_S <= 5
    assert [s for s in gpu_check.STEPS] == ["build", "port", "cuda-tests", "memcheck", "racecheck",
                                             "cuda-graphs", "benchmarks"]


# ---- reading the tools' outputs ----------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{errors}"
 failures="{failures}" skipped="{skipped}" tests="{tests}" time="1.0">
 <testcase classname="test_linear" name="test_forward[cuda-float32]" time="0.1"/>
 {skips}</testsuite></testsuites>"""


def _junit(tests, failures=0, errors=0, reasons=()):
    skips = "".join(f'<testcase classname="t" name="s{i}"><skipped type="pytest.skip" message="{r}"/></testcase>'
                    for i, r in enumerate(reasons))
    return JUNIT.format(tests=tests, failures=failures, errors=errors, skipped=len(reasons), skips=skips)


def test_pytest_counts_and_verdict():
    counts = gpu_check.pytest_counts(_junit(10, failures=1, reasons=["this CPU cannot run avx2"] * 2))
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (7, 1, 2)
    assert counts["skip_reasons"] == {"this CPU cannot run avx2": 2}
    assert gpu_check.pytest_verdict(counts) == (False, "7 passed, 1 failed, 0 errors, 2 skipped")
    ok, text = gpu_check.pytest_verdict(gpu_check.pytest_counts(_junit(5, reasons=["x"])))
    assert ok and text == "4 passed, 0 failed, 0 errors, 1 skipped"


def test_pytest_lines_name_failed_tests_and_skip_reasons():
    xml = _junit(4, failures=1, reasons=["a"] * 2).replace(
        'name="test_forward[cuda-float32]" time="0.1"/>',
        'name="test_forward[cuda-float32]" time="0.1"><failure message="assert 1 == 2"/></testcase>')
    counts = gpu_check.pytest_counts(xml)
    assert counts["failed_tests"] == ["test_linear::test_forward[cuda-float32]"]
    assert gpu_check.pytest_lines(counts) == ["failed: test_linear::test_forward[cuda-float32]",
                                              "skipped 2x: a"]
    many = dict(counts, failed_tests=[f"t{i}" for i in range(25)])
    assert gpu_check.pytest_lines(many)[20] == "... and 5 more failed"


def test_cuda_rows_skipped_for_want_of_a_gpu_fail_the_step():
    counts = gpu_check.pytest_counts(_junit(3, reasons=["no CUDA device on this machine"] * 2))
    ok, text = gpu_check.pytest_verdict(counts)
    assert not ok and "2 skipped because the CUDA rows could not run" in text
    ok, text = gpu_check.pytest_verdict(gpu_check.pytest_counts(_junit(0)))
    assert not ok and "nothing ran" in text


def test_test_files_that_cannot_be_imported_name_the_missing_module():
    xml = """<testsuites><testsuite errors="1" failures="0" skipped="0" tests="3">
      <testcase classname="" name="test_properties_linear"><error message="collection failure">
      ImportError while importing test module ...
      E   ModuleNotFoundError: No module named 'hypothesis'</error></testcase></testsuite></testsuites>"""
    counts = gpu_check.pytest_counts(xml)
    assert counts["missing_modules"] == ["hypothesis"]
    assert gpu_check.pytest_verdict(counts) == (
        False, "2 passed, 0 failed, 1 errors, 0 skipped (not installed: hypothesis)")


def test_port_check_lines_are_counted():
    counts = gpu_check.port_check_counts("port check on H200\nPASS a gpu == emulator\nPASS b x\n"
                                         "FAIL c gpu: launch\nEMULATED d\nport check: 4 cases\n")
    assert counts == {"passed": 2, "failed": 1, "emulator_only": 1, "failures": ["FAIL c gpu: launch"]}


def test_sanitizer_filters_our_kernels_when_it_can():
    with_filter = gpu_check.sanitizer_command("cs", "racecheck", "  --kernel-name arg  filter", "py", Path("w.py"))
    assert with_filter == ["cs", "--tool", "racecheck", "--error-exitcode", "1", "--print-limit", "20",
                           "--kernel-name", "kns=chainrule", "py", "w.py", "--quick"]
    older = gpu_check.sanitizer_command("cs", "memcheck", "--kernel-regex", "py", Path("w.py"))
    assert older[7:9] == ["--kernel-regex", "kns=chainrule"]
    assert "kns=chainrule" not in gpu_check.sanitizer_command("cs", "memcheck", "", "py", Path("w.py"))


@pytest.mark.parametrize("output,returncode,ok,text", [
    ("sanitize workload: ok\n========= ERROR SUMMARY: 0 errors\n", 0, True, "0 errors"),
    ("========= Invalid __global__ read of size 4\nsanitize workload: ok\n"
     "========= ERROR SUMMARY: 3 errors\n", 1, False, "3 errors"),
    ("sanitize workload: ok\n========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
     "========= ERROR SUMMARY: 1 error\n", 1, False, "1 errors; racecheck: 1 error hazards, 1 warnings"),
    ("Traceback ...\n========= ERROR SUMMARY: 0 errors\n", 1, False, "0 errors; the workload did not finish"),
    ("Error: Target application terminated before first instrumented API call\n", 1, False,
     "compute-sanitizer gave no ERROR SUMMARY (exit 1): it did not run"),
])
def test_sanitizer_verdict(output, returncode, ok, text):
    assert gpu_check.sanitizer_verdict(output, returncode, "sanitize workload: ok") == (ok, text)


def test_benchmark_rows_from_the_harness():
    good = harness.make_row(subject="gemm", label="4096x4096x4096 bf16 gemm", size=1.0, config={},
                            times={"chainrule": [0.002, 0.002], "mm": [0.001, 0.001]},
                            check=harness.Check(ok=True, max_error=0.0, tolerance=1e-2), work=2 * 4096**3, unit="TFLOP/s",
                            peak=800.0, peak_name="measured bf16 cuBLAS GEMM")
    wrong = harness.make_row(subject="adam", label="16M params / 50 tensors fp32", size=1.0, config={},
                             times={"chainrule": [0.001], "fused": [0.001]},
                             check=harness.Check(ok=False, max_error=1.0, tolerance=1e-5, detail="param 3"), work=28 * 16e6, unit="GB/s",
                             peak=4000.0, peak_name="measured device copy")
    rows = gpu_check.benchmark_rows({"rows": [good, wrong]})
    assert rows[0]["chainrule_ms"] == pytest.approx(2.0) and rows[0]["ratios"]["mm"] == pytest.approx(0.5)
    line = gpu_check.benchmark_line(rows[0])
    assert line.startswith("4096x4096x4096 bf16 gemm: 2.000 ms, 0.50x mm (1.000 ms), 68.7 TFLOP/s")
    assert line.endswith("9% of measured bf16 cuBLAS GEMM")
    assert rows[1]["status"] == "WRONG" and gpu_check.benchmark_line(rows[1]).endswith("WRONG (no time)")


# ---- steps that run here too (they fail: there is no GPU) -------------------------------------

def _context(tmp_path):
    arch = gpu_check.architecture_for((9, 0), [80, 90])
    return gpu_check.Context(python=sys.executable, jobs=2, report_dir=tmp_path, architecture=arch,
                             nvcc=NVCC or "nvcc", cuda_home=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_pytest_step_fails_when_the_cuda_rows_are_skipped(tmp_path):
    result = gpu_check.pytest_step(_context(tmp_path), 300, "cuda-tests", ["test_zero_size.py"],
                                   gpu_check.CUDA_TESTS_KEYWORD)
    assert result.status == "failed"
    assert re.fullmatch(r"0 passed, 0 failed, 0 errors, (\d+) skipped \(\1 skipped because the CUDA rows "
                        r"could not run\)", result.summary), result.summary
    assert result.data["counts"]["skip_reasons"] == {"no CUDA device on this machine": 15}
    assert (tmp_path / "logs" / "cuda-tests.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_benchmarks_step_fails_without_cuda_rows(tmp_path):
    result = gpu_check.benchmarks_step(_context(tmp_path), 300)
    assert result.status == "failed"
    assert result.summary.startswith("0 rows; machine: --device cuda: no CUDA device"), result.summary
    assert "gemm: --device cuda: no CUDA device" in result.summary
    assert "adam: --device cuda: no CUDA device" in result.summary


def _fake_cmake(tmp_path, configure_exit=0, build_script="exit 0"):
    """A cmake stand-in: the configure call exits with configure_exit, --build runs build_script."""
    fake = tmp_path / "cmake"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --build ]; then {build_script}; fi\n"
                    f"echo configured; exit {configure_exit}\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("configure_exit,build_script,status,summary", [
    (1, "exit 0", "failed", "CMake's configure step failed"),
    (0, "echo 'error: linear.cu'; exit 1", "failed", "the build failed"),
    (0, "sleep 30", "timeout", "stopped at its 20 s budget; the build failed"),
])
def test_build_step_reports_a_failed_or_slow_build(tmp_path, monkeypatch, configure_exit, build_script,
                                                    status, summary):
    monkeypatch.setattr(gpu_check, "find_cmake", lambda python: _fake_cmake(tmp_path, configure_exit, build_script))
    monkeypatch.setattr(gpu_check, "BUILD_DIR", tmp_path / "build")
    start = time.monotonic()
    result = gpu_check.build_step(_context(tmp_path), 20)
    assert (result.status, result.summary) == (status, summary)
    assert time.monotonic() - start < 20
    assert "$ " in (tmp_path / "logs" / "build.log").read_text()


def test_build_step_stages_the_built_module_and_imports_it_from_there(tmp_path, monkeypatch):
    import chainrule  # noqa: PLC0415
    built = Path(chainrule._C.__file__)
    monkeypatch.setattr(gpu_check, "find_cmake", lambda python: _fake_cmake(
        tmp_path, build_script=f"cp {built} {tmp_path / 'build'}/"))
    monkeypatch.setattr(gpu_check, "BUILD_DIR", tmp_path / "build")
    (tmp_path / "build").mkdir()
    info = chainrule.build_info()
    # The check passes only when the module has the CUDA kernels for exactly the chosen architecture.
    ctx = _context(tmp_path)
    result = gpu_check.build_step(ctx, 120)
    assert ctx.staged == tmp_path / "build" / "python"
    assert (ctx.staged / "chainrule" / built.name).exists() and (ctx.staged / "chainrule" / "optim.py").exists()
    assert result.data["build_info"] == info
    expected = info["cuda_compiled"] and info["cuda_architectures"] == ["sm_90"]
    assert result.status == ("passed" if expected else "failed"), result.summary


def test_sanitizer_step_is_skipped_where_the_tool_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_tool", lambda name, cuda_home: None)
    result = gpu_check.sanitizer_step(_context(tmp_path), 60, "memcheck")
    assert (result.status, result.summary) == ("skipped", "compute-sanitizer is not installed "
                                                          "(CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)")
    assert gpu_check.exit_code([result]) == 0


# ---- the report --------------------------------------------------------------------------------

def _results():
    return [gpu_check.StepResult("build", "passed", 41.5, 120, "sm 90, 16 jobs"),
            gpu_check.StepResult("port", "passed", 3.0, 30, "42 cases equal", data={"lines": []}),
            gpu_check.StepResult("memcheck", "skipped", 0.0, 60, "compute-sanitizer is not installed"),
            gpu_check.StepResult("cuda-tests", "failed", 90.0, 150, "400 passed, 2 failed | x",
                                 "E assert 1 == 2\nFAILED test_linear.py::test_forward[cuda]"),
            gpu_check.StepResult("benchmarks", "timeout", 90.0, 90, "stopped", "bench...",
                                 {"lines": ["4096x4096x4096 bf16 gemm: 1.000 ms"]}),
            gpu_check.StepResult("cuda-graphs", "not_run", 0.0, 30, "not run: build did not pass")]


def test_report_json_and_markdown(tmp_path):
    info = {"gpu": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0"}
    json_path, md_path = gpu_check.write_report(_results(), info, tmp_path / "report")
    data = json.loads(json_path.read_text())
    assert data["status"] == "failed" and data["info"] == info and data["total_seconds"] == 224.5
    assert [s["name"] for s in data["steps"]] == ["build", "port", "memcheck", "cuda-tests", "benchmarks",
                                                  "cuda-graphs"]
    assert data["steps"][3]["output_tail"].endswith("test_forward[cuda]")
    md = md_path.read_text()
    assert md.startswith("# chainrule GPU check\n\n- gpu: NVIDIA H200\n")
    assert "**failed** in 224.5 s" in md
    assert "| cuda-tests | failed | 90.0 | 150 | 400 passed, 2 failed \\| x |" in md
    assert "| memcheck | skipped | 0.0 | 60 | compute-sanitizer is not installed |" in md
    assert "## benchmarks\n\n- 4096x4096x4096 bf16 gemm: 1.000 ms" in md
    assert "## cuda-tests: last lines of its output\n\n```\nE assert 1 == 2" in md
    assert "## build: last lines" not in md


def test_summary_and_exit_code():
    results = _results()
    lines = gpu_check.summary_lines(results)
    assert lines[0].split() [:4] == ["build", "passed", "41.5", "s"]
    assert lines[-1] == "gpu-check: failed in 224.5 s"
    assert gpu_check.exit_code(results) == 1
    passing = [r for r in results if r.status in ("passed", "skipped")]
    assert gpu_check.exit_code(passing) == 0
    assert gpu_check.summary_lines(passing)[-1] == "gpu-check: passed in 44.5 s"


# ---- the port check program --------------------------------------------------------------------

@pytest.fixture(scope="module")
def port_check(tmp_path_factory):
    """tests/cuda_port/port_check built by nvcc for sm_90, as gpu-check builds it for an H200."""
    if NVCC is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda*)")
    arch = gpu_check.architecture_for((9, 0), [80, 90])
    source = ROOT / "tests" / "cuda_port"
    exe = tmp_path_factory.mktemp("port_check") / "port_check"
    command = [NVCC, "-std=c++20", "-O2", *arch.nvcc_flags, "-I", str(ROOT / "csrc"),
               "-I", str(ROOT / "csrc" / "include"), "-I", str(source),
               "-Xcompiler", "-ffp-contract=off,-fno-strict-aliasing,-pthread,-Wall,-Wextra",
               str(source / "port_check.cu"), str(source / "port_emulated.cpp"), "-o", str(exe)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-6000:]
    assert "warning" not in build.stderr, build.stderr[-3000:]
    return exe


def test_port_check_holds_sm_90_code_only(port_check):
    from test_cuda_build import _find_cuobjdump  # noqa: PLC0415
    cuobjdump = _find_cuobjdump(NVCC)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    listed = subprocess.run([cuobjdump, "--list-elf", str(port_check)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "sm_90" in listed.stdout and "sm_80" not in listed.stdout, listed.stdout


def test_port_check_runs_every_wrapper_and_its_emulated_half_matches_the_isa(port_check):
    exe = port_check
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    counts = gpu_check.port_check_counts(run.stdout)
    assert run.returncode == 0 and counts["failed"] == 0, run.stdout[-6000:]
    names = re.findall(r"^(?:PASS|EMULATED) (\S+)", run.stdout, re.M)
    assert len(names) == 42
    for wrapper in ("ldmatrix_x1", "ldmatrix_x2", "ldmatrix_x4", "ldmatrix_x1_trans", "ldmatrix_x2_trans",
                    "ldmatrix_x4_trans", "mma_m16n8k16_bf16_exact_0", "mma_m16n8k16_f16_random_2",
                    "mma_m16n8k8_bf16_exact_1", "mma_m16n8k8_f16_random_0"):
        assert wrapper in names
    assert {n for n in names if n.startswith("cp_async")} == {
        f"cp_async_{b}B_wait_group_{w}" for b in (4, 8, 16) for w in range(4)}
    if torch.cuda.is_available():
        assert counts["passed"] == 42, run.stdout
    else:
        assert counts["emulator_only"] == 42
        required = subprocess.run([str(exe), "--require-gpu"], capture_output=True, text=True, timeout=120)
        assert required.returncode == 2, required.stdout[-2000:]


# ---- the suite's CUDA rows ---------------------------------------------------------------------

def test_not_cuda_test_files_exist_and_the_rest_are_selected():
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert gpu_check.NOT_CUDA_TEST_FILES <= files, gpu_check.NOT_CUDA_TEST_FILES - files
    selected = gpu_check.cuda_test_files()
    assert {"test_linear.py", "test_adam.py", "test_opcheck.py"} <= set(selected)
    assert "test_cuda_graphs.py" not in selected and "test_gpu_check.py" not in selected


def test_the_cuda_keyword_collects_only_cuda_rows():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-k", gpu_check.CUDA_TESTS_KEYWORD, *gpu_check.cuda_test_files()],
                         capture_output=True, text=True, cwd=ROOT / "tests", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    assert len(ids) > 100, run.stdout[-3000:]
    assert all(("cuda" in i and "emulated_cuda" not in i) or "gpu" in i for i in ids), \
        [i for i in ids if "emulated" in i][:5]
    # Each backend-parametrized file contributes its cuda rows, and the GPU-only Adam comparison runs.
    assert {Path(i.split("::")[0]).name for i in ids} >= {"test_linear.py", "test_adam.py", "test_zero_size.py",
                                                          "test_properties_linear.py", "test_adam_kernels.py"}
    assert any("test_cpu_and_gpu_are_bitwise_identical" in i for i in ids)


# ---- without a GPU -----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_exits_at_once_with_the_reason(tmp_path):
    start = time.monotonic()
    make = shutil.which("make")
    if make:
        run = subprocess.run([make, "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_DIR={tmp_path / 'r'}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert run.returncode != 0 and "Error 2" in run.stderr, run.stderr  # the script's exit 2
    else:
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--report-dir",
                              str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
    assert time.monotonic() - start < 60
    assert "gpu-check: no CUDA device visible to torch" in run.stderr
    assert "nothing was built or run" in run.stderr
    assert not (tmp_path / "r").exists()


def test_no_gpu_message_names_torch_and_its_cuda():
    text = gpu_check.no_gpu_message("2.11.0+cu130", "13.0")
    assert text.startswith("gpu-check: no CUDA device visible to torch 2.11.0+cu130 (CUDA 13.0)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_sanitize_workload_without_a_gpu_says_so():
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_sanitize" / "sanitize_workload.py"), "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr
