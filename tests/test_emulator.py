"""The CUDA emulator's own tests (csrc/emu/, csrc/cuda/port.cuh).

The C++ unit tests in tests/emu/ are plain C++ (no torch): this module compiles them with g++ under
the project's host flags, runs each suite in every schedule order, builds them once more with the
portable ucontext fibers, compiles the reference kernels and the port wrappers with nvcc for sm_80
and sm_90, and checks that oversized kernel parameters fail to compile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "emu"
HOST_FLAGS = ["-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Wextra", "-pthread"]
SCHEDULES = ["forward", "reverse", "random:1", "random:2024"]
# Suites that are correct in every order; the injected-bug suite sets its own orders.
SUITES = ["basics", "warp", "mma", "memory", "reference", "bugs"]
SM_TARGETS = ["sm_80", "sm_90"]


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    if found := shutil.which("nvcc"):
        candidates.append(Path(found))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    candidates += sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True)
    return next((str(c) for c in candidates if c.is_file()), None)


def _toolkit_of(nvcc: str) -> Path:
    """The toolkit root of an nvcc, also when the nvcc on PATH is a wrapper script elsewhere."""
    result = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    if match := re.search(r"^#\$ _HERE_=(.*)$", result.stdout + result.stderr, re.M):
        return Path(match.group(1).strip()).parent
    return Path(nvcc).resolve().parents[1]


def _cuda_include() -> Path | None:
    """The directory holding cuda_fp16.h: CUDA_HOME, nvcc's toolkit, or the nvidia/cu13 wheel."""
    candidates = []
    if cuda_home := os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        candidates.append(Path(cuda_home) / "include")
    if nvcc := _nvcc():
        candidates.append(_toolkit_of(nvcc) / "include")
    for site in [sysconfig.get_paths()["purelib"], *sys.path]:
        for name in ("cu13", "cuda_runtime", "cu12"):
            candidates.append(Path(site) / "nvidia" / name / "include")
    # vector_types.h includes crt/host_defines.h, which some wheels leave out
    usable = (c for c in candidates if (c / "cuda_fp16.h").is_file() and (c / "crt" / "host_defines.h").is_file())
    return next(usable, None)


CUDA_INCLUDE = _cuda_include()
NVCC = _nvcc()
CXX = os.environ.get("CXX", "g++")
needs_cuda_headers = pytest.mark.skipif(
    CUDA_INCLUDE is None, reason="no usable cuda_fp16.h (with crt/host_defines.h) in CUDA_HOME, nvcc's toolkit or site-packages/nvidia/cu13"
)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda*)")


def _compile(sources, output: Path, extra=()):
    command = [CXX, *HOST_FLAGS, *extra, "-I", str(ROOT / "csrc"), "-I", str(CUDA_INCLUDE), *map(str, sources), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert not warnings, "new warnings in the emulator or its tests:\n" + "\n".join(warnings[:20])
    return output


def _build(tmp_path_factory, name: str, extra=(), suites=None) -> Path:
    """Compiles each test file to an object (two at a time: the machine is shared), then links."""
    directory = tmp_path_factory.mktemp(name)
    tests = sorted(TESTS.glob("test_*.cpp"))
    if suites is not None:
        tests = [TESTS / f"test_{suite}.cpp" for suite in suites]
    sources = [TESTS / "main.cpp", *tests]
    objects = []
    running = []
    for source in sources:
        obj = directory / (source.stem + ".o")
        command = [CXX, *HOST_FLAGS, *extra, "-I", str(ROOT / "csrc"), "-I", str(CUDA_INCLUDE), "-c", str(source), "-o", str(obj)]
        running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        objects.append(obj)
        if len(running) == 2:
            _finish(running.pop(0))
    while running:
        _finish(running.pop(0))
    binary = directory / "emu_tests"
    link = [CXX, "-pthread", *map(str, objects), "-o", str(binary)]
    subprocess.run(link, check=True)
    return binary


def _finish(job):
    command, process = job
    output, _ = process.communicate()
    assert process.returncode == 0, f"{' '.join(command)}\n{output[-6000:]}"
    warnings = [line for line in output.splitlines() if "warning:" in line]
    assert not warnings, "new warnings in the emulator or its tests:\n" + "\n".join(warnings[:20])


@pytest.fixture(scope="module")
def emu_tests(tmp_path_factory):
    if CUDA_INCLUDE is None:
        pytest.skip("no usable cuda_fp16.h (with crt/host_defines.h) in CUDA_HOME, nvcc's toolkit or site-packages/nvidia/cu13")
    return _build(tmp_path_factory, "emu_tests")


def _run(binary: Path, suite: str, schedule: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("CHAINRULE_EMU_SCHEDULE", None)
    if schedule is not None:
        env["CHAINRULE_EMU_SCHEDULE"] = schedule
    result = subprocess.run([str(binary), suite], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{suite} ({schedule}):\n{result.stdout[-8000:]}{result.stderr[-2000:]}"
    assert re.search(r"^[1-9]\d* tests, 0 failed checks$", result.stdout, re.M), result.stdout
    return result.stdout


@needs_cuda_headers
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("suite", [s for s in SUITES if s != "reference"])
def test_emulator_suite(emu_tests, suite, schedule):
    _run(emu_tests, suite, schedule)


@needs_cuda_headers
@pytest.mark.parametrize("schedule", ["forward", "random:7"])
def test_reference_kernels_match_fp64(emu_tests, schedule):
    _run(emu_tests, "reference_", schedule)


@needs_cuda_headers
def test_gemm_256_cost(emu_tests):
    """Acceptance 4: prints the emulated 256^3 fp32 GEMM time (run pytest with -s to see it)."""
    output = _run(emu_tests, "perf_gemm_256")
    seconds = float(re.search(r"EMU_GEMM_256_SECONDS ([0-9.]+)", output).group(1))
    print(f"\nemulated 256x256x256 fp32 tiled GEMM, 128-thread blocks: {seconds:.3f} s")
    assert seconds < 5.0  # generous on a shared machine; the target (< 0.5 s) is in ARCHITECTURE.md


@needs_cuda_headers
def test_ucontext_fallback(tmp_path_factory):
    """The portable fibers (what non-x86-64 hosts use) pass the same suites."""
    binary = _build(tmp_path_factory, "emu_tests_ucontext", ["-DCHAINRULE_EMU_UCONTEXT", "-O0"],
                    suites=["basics", "warp", "injected_bugs"])
    for suite in ("basics", "warp", "bugs"):
        _run(binary, suite, "random:3")


@needs_cuda_headers
def test_kernel_parameters_over_the_limit_do_not_compile(tmp_path):
    source = tmp_path / "big_params.cpp"
    source.write_text(
        '#include "cuda/port.cuh"\n'
        "struct Huge { float values[1100]; };\n"
        "__global__ void k(Huge h, float* out) { out[threadIdx.x] = h.values[threadIdx.x]; }\n"
        "void run(float* out) { Huge h{}; chainrule::emu::launch(\"k\", k, dim3(1), dim3(32), 0, h, out); }\n"
    )
    command = [CXX, *HOST_FLAGS, "-fsyntax-only", "-I", str(ROOT / "csrc"), "-I", str(CUDA_INCLUDE), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert "kernel parameters exceed the 4 KiB CUDA parameter limit" in result.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", SM_TARGETS)
@pytest.mark.parametrize("source", ["reference_kernels.cu", "port_wrappers.cu"])
def test_kernel_source_compiles_with_nvcc(tmp_path, source, arch):
    """Acceptance 3: the emulated source is real CUDA; every port wrapper becomes its PTX instruction."""
    base = [NVCC, "-std=c++20", f"-arch={arch}", "-Werror", "all-warnings", "-I", str(ROOT / "csrc"), str(TESTS / source)]
    result = subprocess.run([*base, "-cubin", "-o", str(tmp_path / "out.cubin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    if source == "port_wrappers.cu":
        ptx = subprocess.run([*base, "-ptx", "-o", "-"], capture_output=True, text=True, check=True).stdout
        for instruction in (
            "cp.async.cg.shared.global", "cp.async.ca.shared.global", "cp.async.commit_group", "cp.async.wait_group",
            "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32", "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32",
        ):
            assert instruction in ptx, instruction


def _tsan_binary(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("emu_tsan")
    binary = directory / "tsan_missing_sync"
    command = [CXX, *HOST_FLAGS, "-g", "-fsanitize=thread", "-I", str(ROOT / "csrc"), "-I", str(CUDA_INCLUDE),
               str(TESTS / "tsan_missing_sync.cpp"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and ("tsan" in result.stderr and "cannot find" in result.stderr):
        pytest.skip("no ThreadSanitizer runtime (libtsan) for " + CXX)
    assert result.returncode == 0, result.stderr[-6000:]
    return binary


@needs_cuda_headers
def test_thread_sanitizer_mode_reports_a_missing_syncthreads(tmp_path_factory):
    """Optional mode: built with -fsanitize=thread, every CUDA thread is a TSan fiber and only
    barriers order them, so a missing __syncthreads is a data race at the exact lines, in every
    schedule order; correct kernels (GEMM, reduction, cp.async pipeline) report nothing."""
    binary = _tsan_binary(tmp_path_factory)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66")
    correct = subprocess.run([str(binary), "correct"], capture_output=True, text=True, env=env, timeout=300)
    assert correct.returncode == 0 and "ThreadSanitizer" not in correct.stderr, correct.stderr[-6000:]
    source_lines = (TESTS / "tsan_missing_sync.cpp").read_text().splitlines()
    write_line = next(i for i, line in enumerate(source_lines, 1) if "TILE_WRITE" in line)
    read_line = next(i for i, line in enumerate(source_lines, 1) if "TILE_READ" in line)
    for schedule in ("forward", "reverse", "random:11"):
        env["CHAINRULE_EMU_SCHEDULE"] = schedule
        buggy = subprocess.run([str(binary), "buggy"], capture_output=True, text=True, env=env, timeout=300)
        assert buggy.returncode == 66, buggy.stderr[-3000:]
        assert "WARNING: ThreadSanitizer: data race" in buggy.stderr
        assert f"tsan_missing_sync.cpp:{read_line}" in buggy.stderr
        assert f"tsan_missing_sync.cpp:{write_line}" in buggy.stderr
        assert re.search(r"gemm<missing sync> block \(\d,\d,0\) thread \(\d+,0,0\)", buggy.stderr)  # CUDA threads by name


@needs_cuda_headers
def test_address_sanitizer_mode_reports_out_of_bounds_kernels(tmp_path):
    """Built with -fsanitize=address, fiber switches are announced to ASan and the unused part of the
    dynamic shared memory buffer is poisoned: a kernel reading past a tensor or writing past its
    dynamic shared memory is reported at its line; correct kernels (and one that fails with an
    emu::Error) report nothing."""
    binary = tmp_path / "asan_out_of_bounds"
    command = [CXX, *HOST_FLAGS, "-g", "-fsanitize=address", "-I", str(ROOT / "csrc"), "-I", str(CUDA_INCLUDE),
               str(TESTS / "asan_out_of_bounds.cpp"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and ("asan" in result.stderr and "cannot find" in result.stderr):
        pytest.skip("no AddressSanitizer runtime (libasan) for " + CXX)
    assert result.returncode == 0, result.stderr[-6000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    correct = subprocess.run([str(binary), "correct"], capture_output=True, text=True, env=env, timeout=300)
    assert correct.returncode == 0 and "AddressSanitizer" not in correct.stderr, correct.stderr[-6000:]
    source_lines = (TESTS / "asan_out_of_bounds.cpp").read_text().splitlines()
    for mode, marker, kind in (("global", "GLOBAL_OVERFLOW", "heap-buffer-overflow"),
                               ("dynamic", "DYNAMIC_OVERFLOW", "use-after-poison")):
        line = next(i for i, text in enumerate(source_lines, 1) if marker in text)
        run = subprocess.run([str(binary), mode], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode != 0
        assert f"ERROR: AddressSanitizer: {kind}" in run.stderr, run.stderr[-3000:]
        assert f"asan_out_of_bounds.cpp:{line}" in run.stderr, run.stderr[-3000:]


def test_only_port_has_inline_asm():
    """port.cuh is the one file with inline PTX; kernel files have no asm and no <<<>>>."""
    offenders = []
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in {".h", ".cuh", ".cu", ".cpp"} or path.name == "port.cuh" or path.name == "fiber.h":
            continue
        text = path.read_text(errors="replace")
        if re.search(r"\basm\s*(volatile\s*)?\(", text):
            offenders.append(str(path.relative_to(ROOT)))
        if "kernels" in path.parts and "<<<" in text:
            offenders.append(str(path.relative_to(ROOT)) + " (<<<>>>)")
    assert not offenders, offenders
