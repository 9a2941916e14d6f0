"""One test suite, every backend.

The `backend` fixture runs a test on each place chainrule's kernels run:
  cpu                      the CPU kernels as a user gets them: the best SIMD path this CPU has, and
                           our GEMM or ATen's as the path rule picks per call (cpu/gemm_path.h)
  cpu-ours                 the same ISA with our GEMM forced wherever it runs the dtype
                           (CHAINRULE_CPU_GEMM=ours), so our kernels are tested on every CPU
  cpu-<isa>                the CPU kernels forced onto a lower path (avx2 with our GEMM, or
                           fallback: ATen's GEMM with scalar epilogues), as CHAINRULE_CPU_ISA=<isa>
  emulated_cuda-<order>    the CUDA kernel source under the CUDA emulator, with the block's threads
                           scheduled in forward, reverse and seeded random order
  cuda                     the CUDA kernels on a GPU (skipped, with the reason, where there is none)
A backend that is missing is skipped with the reason, never silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

import chainrule


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str

    def __str__(self) -> str:
        return self.name


EMULATOR_ORDERS = ("forward", "reverse", "random")
FORCED_CPU_ISAS = ("avx2", "fallback")
BACKEND_NAMES = (["cpu", "cpu-ours"] + [f"cpu-{isa}" for isa in FORCED_CPU_ISAS]
                 + [f"emulated_cuda-{order}" for order in EMULATOR_ORDERS] + ["cuda"])


@contextlib.contextmanager
def running_on(name: str):
    """Enters backend `name` for the duration of the block; skips the test if it is missing."""
    if name == "cpu":
        yield Backend(name, "cpu")
    elif name == "cpu-ours":
        chainrule._C._set_cpu_gemm("ours")
        try:
            yield Backend(name, "cpu")
        finally:
            chainrule._C._set_cpu_gemm(None)
    elif name.startswith("cpu-"):
        isa = name.split("-", 1)[1]
        try:
            chainrule._C._set_cpu_isa(isa)
        except RuntimeError as error:
            pytest.skip(f"this CPU cannot run chainrule's {isa} kernels: {error}")
        chainrule._C._set_cpu_gemm("ours")
        try:
            yield Backend(name, "cpu")
        finally:
            chainrule._C._set_cpu_isa(None)
            chainrule._C._set_cpu_gemm(None)
    elif name.startswith("emulated_cuda"):
        if not chainrule.backends.emulator_available():
            pytest.skip("chainrule was built without the CUDA emulator (no CUDA headers found)")
        order = name.split("-", 1)[1]
        with chainrule.backends.emulated_cuda(schedule=order, seed=1234):
            yield Backend(name, "cpu")
    elif name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device on this machine")
        if not chainrule.build_info()["cuda_compiled"]:
            pytest.skip("chainrule was built without its CUDA kernels")
        yield Backend(name, "cuda")
    else:
        raise ValueError(name)


# Subprocesses that tests start (distributed ranks, the memory soak) inherit this.
os.environ["CHAINRULE_CPU_TORCH_OPS"] = "0"


@pytest.fixture(autouse=True)
def _kernels_at_every_size():
    """Tiny CPU layers run as torch's own F.linear + activation for users (auto mode); the suite
    tests chainrule's kernels at every size, so it turns that off. test_gemm_path.py tests it."""
    chainrule._C._set_cpu_small_layers_to_torch(False)
    yield
    chainrule._C._set_cpu_small_layers_to_torch(True)


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    with running_on(request.param) as b:
        yield b


@pytest.fixture(params=["cpu", "emulated_cuda-forward", "cuda"])
def backend_one_order(request):
    """For the most expensive tests: each backend once, the emulator in forward order only."""
    with running_on(request.param) as b:
        yield b


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = chainrule.build_info()
    return [f"chainrule {info['version']} built against torch {info['torch_version']}; "
            f"cuda compiled: {info['cuda_compiled']} {info['cuda_architectures']}; "
            f"cpu simd: {info['cpu_simd']}; cpu gemm: {info['cpu_gemm']} "
            f"{chainrule._C._cpu_traits()}; emulator: {info['emulator_available']}; "
            f"torch threads: {torch.get_num_threads()}; "
            f"CHAINRULE_CPU_ISA={os.environ.get('CHAINRULE_CPU_ISA', '')} "
            f"CHAINRULE_CPU_GEMM={os.environ.get('CHAINRULE_CPU_GEMM', '')}"]
