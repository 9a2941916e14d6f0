"""The CUDA linear kernels under the emulator's sanitizer modes (no torch involved).

tests/cuda_linear/sanitized_linear.cpp runs every GEMM role on both arithmetic paths (tails, the
unaligned fallback, split-K) and the bias-gradient pass through the extension's own launch planning
and checks the results against float64. Built with -fsanitize=thread, every CUDA thread is a TSan
fiber ordered only by barriers, so a missing __syncthreads or cp.async wait in a kernel is a
reported data race; built with -fsanitize=address, a read or write past a tensor or past the
dynamic shared memory is reported. (Removing the main-loop __syncthreads of the tensor-core GEMM
makes the TSan run fail with races at the lines that fill and read the shared tiles.)
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_linear" / "sanitized_linear.cpp"
CXX = os.environ.get("CXX", "g++")
HOST_FLAGS = ["-std=c++20", "-O1", "-g", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
              "-Wextra", "-pthread"]


def _cuda_include() -> str | None:
    """Directory with cuda_fp16.h / cuda_bf16.h (the emulator uses CUDA's own half types)."""
    places = []
    if os.environ.get("CUDA_HOME"):
        places.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        places.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include"))
    places += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    try:
        import nvidia  # noqa: PLC0415  (torch's pip wheels ship the headers)
        places += [os.path.join(root, "cu13", "include") for root in nvidia.__path__]
    except ImportError:
        pass
    for place in places:
        if os.path.exists(os.path.join(place, "cuda_fp16.h")) and \
                os.path.exists(os.path.join(place, "crt", "host_defines.h")):
            return place
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None,
                                reason="no usable cuda_fp16.h (CUDA_HOME, nvcc or nvidia wheels)")


def _build(tmp_path: Path, sanitizer: str) -> Path:
    binary = tmp_path / f"sanitized_linear_{sanitizer}"
    command = [CXX, *HOST_FLAGS, f"-fsanitize={sanitizer}", "-I", str(ROOT / "csrc"),
               "-I", str(ROOT / "csrc" / "include"), "-I", CUDA_INCLUDE, str(SOURCE), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and "cannot find" in result.stderr and sanitizer[0] + "san" in result.stderr:
        pytest.skip(f"no {sanitizer} sanitizer runtime for {CXX}")
    assert result.returncode == 0, result.stderr[-6000:]
    return binary


def test_no_data_races_under_thread_sanitizer(tmp_path):
    binary = _build(tmp_path, "thread")
    for schedule in ("forward", "random:5"):
        env = dict(os.environ, CHAINRULE_EMU_SCHEDULE=schedule,
                   TSAN_OPTIONS="halt_on_error=0 exitcode=66")
        run = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]


def test_no_out_of_bounds_accesses_under_address_sanitizer(tmp_path):
    binary = _build(tmp_path, "address")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stderr[-6000:]
