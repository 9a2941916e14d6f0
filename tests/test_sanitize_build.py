"""`make test-sanitize` exists and its CMake configuration instruments the extension.

The sanitized build itself (ASan + UBSan, several minutes on 2 cores) and its test run are not
part of `make test`; these configure-only checks keep the target from rotting: the Makefile
target configures with CHAINRULE_SANITIZE=ON and CHAINRULE_CUDA=OFF into its own build folder and
preloads libasan, and CMake then compiles and links _C with -fsanitize=address,undefined.
"""
from __future__ import annotations

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


def test_makefile_target():
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^test-sanitize:.*?(?=^\S|\Z)", makefile, re.M | re.S)
    assert match, "no test-sanitize target in the Makefile"
    recipe = match.group(0)
    assert "-DCHAINRULE_SANITIZE=ON" in recipe and "-DCHAINRULE_CUDA=OFF" in recipe
    assert "$(SANITIZE_DIR)" in recipe and "SANITIZE_DIR ?= build/sanitize" in makefile
    assert "$(SANITIZE_ENV)" in recipe
    env = re.search(r"^SANITIZE_ENV = (.*?)(?<!\\)\n", makefile, re.M | re.S).group(1)
    assert "libasan.so" in env and "LD_PRELOAD" in env
    assert "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1" in env
    tests = re.search(r"^SANITIZE_TESTS \?= (.*?)(?<!\\)\n", makefile, re.M | re.S).group(1)
    for name in tests.replace("\\", " ").split():
        assert (ROOT / "tests" / name).exists(), f"SANITIZE_TESTS names a missing file {name}"
    assert "test-sanitize" in (ROOT / "README.md").read_text()


def _configure(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
                           f"-DCMAKE_MAKE_PROGRAM={NINJA}", f"-DPython_EXECUTABLE={sys.executable}",
                           "-DSKBUILD_PROJECT_VERSION=0.0.0", *options],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(CMAKE is None or NINJA is None, reason="cmake and ninja needed")
def test_configure_instruments_the_extension(tmp_path):
    run = _configure(tmp_path, "-DCHAINRULE_CUDA=OFF", "-DCHAINRULE_SANITIZE=ON")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "CHAINRULE_SANITIZE=ON: -fsanitize=address,undefined" in run.stdout
    ninja = (tmp_path / "build" / "build.ninja").read_text()
    compile_flags = [line for line in ninja.splitlines()
                     if line.strip().startswith("FLAGS =") and "-fsanitize=address,undefined" in line]
    assert compile_flags, "no compile line of _C carries -fsanitize=address,undefined"
    assert any("-fsanitize=address,undefined" in line for line in ninja.splitlines()
               if line.strip().startswith("LINK_FLAGS =")), "_C is not linked with the sanitizers"


@pytest.mark.skipif(CMAKE is None or NINJA is None, reason="cmake and ninja needed")
def test_default_configuration_is_not_instrumented(tmp_path):
    run = _configure(tmp_path, "-DCHAINRULE_CUDA=OFF")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "-fsanitize" not in (tmp_path / "build" / "build.ninja").read_text()
