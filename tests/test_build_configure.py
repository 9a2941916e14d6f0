"""Configure-only checks of how the build copes with incomplete CUDA installations.

Each test runs CMake's configure step (no compilation) in a fresh directory with a CUDA_HOME that
is wrong in one way: a prefix whose include/ has no CUDA headers (as for an `nvcc` on the PATH
that is a wrapper script), headers copied without the crt/ directory they include (as in the pip
wheel nvidia/cu13), complete headers but no nvcc, and a CPU-only torch. The configure step must
name the missing header and where it looked in one line, and go on with what it can build.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CMAKE = str(BIN / "cmake") if (BIN / "cmake").exists() else shutil.which("cmake")
NINJA = str(BIN / "ninja") if (BIN / "ninja").exists() else shutil.which("ninja")
pytestmark = pytest.mark.skipif(CMAKE is None or NINJA is None, reason="cmake and ninja needed")

from test_linear_sanitizers import CUDA_INCLUDE  # noqa: E402  (a complete set of CUDA headers)


def _site_packages() -> Path:
    import torch  # noqa: PLC0415
    return Path(torch.__file__).resolve().parents[1]


def configure(tmp_path: Path, cuda_home: Path | None, extra_env: dict | None = None):
    """Runs the configure step; returns (chainrule's status lines, emulator on, CUDA on)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
    env.update(extra_env or {})
    build = tmp_path / "build"
    run = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                          f"-DCMAKE_MAKE_PROGRAM={NINJA}", f"-DPython_EXECUTABLE={sys.executable}",
                          "-DSKBUILD_PROJECT_VERSION=0.0.0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line[3:] for line in run.stdout.splitlines() if line.startswith("-- chainrule:")]
    summary = next(line for line in lines if "building the CPU kernels" in line)
    match = re.search(r"emulated_cuda: (\w+); CUDA kernels: (\w+)", summary)
    return lines, match.group(1) == "ON", match.group(2) == "ON"


def _wrapper_prefix(tmp_path: Path) -> Path:
    """A prefix like /usr/local: bin/nvcc is a wrapper script, include/ has no CUDA headers."""
    prefix = tmp_path / "prefix"
    (prefix / "include").mkdir(parents=True)
    (prefix / "bin").mkdir()
    nvcc = prefix / "bin" / "nvcc"
    real = shutil.which("nvcc")
    nvcc.write_text(f"#!/bin/sh\nexec {real} \"$@\"\n" if real else "#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    return prefix


def test_wrapper_prefix_as_cuda_home_builds_cpu_only(tmp_path):
    prefix = _wrapper_prefix(tmp_path)
    lines, emulator, cuda = configure(tmp_path, prefix)
    missing = [line for line in lines if "no complete CUDA headers" in line]
    assert len(missing) == 1, lines
    assert f"{prefix}/include has no cuda_fp16.h" in missing[0]
    wheel = _site_packages() / "nvidia" / "cu13" / "include"
    if (wheel / "cuda_fp16.h").exists() and not (wheel / "crt" / "host_defines.h").exists():
        # The real-world case: the pip wheel's cuda_fp16.h without its crt/ headers.
        assert re.search(rf"{re.escape(str(wheel))} lacks crt/host_defines.h \(included by \w+\.h\)",
                         missing[0]), missing[0]
    assert not cuda and not emulator


def test_headers_without_crt_are_named(tmp_path):
    """cuda_fp16.h present, what it includes absent: the line names the missing header."""
    source = CUDA_INCLUDE or str(_site_packages() / "nvidia" / "cu13" / "include")
    if not Path(source, "cuda_fp16.h").exists():
        pytest.skip("no cuda_fp16.h on this machine to copy")
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    for name in ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp"):
        if Path(source, name).exists():
            shutil.copy(Path(source, name), home / "include" / name)
    lines, emulator, cuda = configure(tmp_path, home)
    missing = [line for line in lines if "no complete CUDA headers" in line]
    assert len(missing) == 1, lines
    assert re.search(rf"{re.escape(str(home))}/include lacks [\w/]+\.h \(included by \w+\.h\)",
                     missing[0]), missing[0]
    assert not emulator and not cuda


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="no complete CUDA headers on this machine")
def test_complete_headers_without_nvcc_build_the_emulator(tmp_path):
    home = tmp_path / "cuda"
    home.mkdir()
    (home / "include").symlink_to(CUDA_INCLUDE)
    lines, emulator, cuda = configure(tmp_path, home)
    assert emulator and not cuda
    assert any("CUDA kernels not compiled: nvcc was not found" in line for line in lines), lines
    assert not any("no complete CUDA headers" in line for line in lines), lines


def test_cpu_only_torch_builds_without_cuda_kernels(tmp_path):
    """A CPU-only torch (torch.version.cuda is None, here made so by a sitecustomize)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import torch\ntorch.version.cuda = None\n")
    pythonpath = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    lines, _, cuda = configure(tmp_path, None, {"PYTHONPATH": pythonpath})
    assert not cuda
    assert any(re.search(r"CUDA kernels not compiled: torch \S+ is a CPU-only build", line)
               for line in lines), lines
