"""Where chainrule ops on CPU tensors run.

By default a chainrule op on CPU tensors runs the CPU kernels. Inside emulated_cuda() it runs the
CUDA kernel source instead, compiled for the host and executed by chainrule's CUDA emulator
(csrc/emu): blocks on worker threads, the threads of a block as fibers. That is how the CUDA
kernels are tested on machines without a GPU. CUDA tensors always run the CUDA kernels.

The switch is process-wide, not per thread: autograd runs a backward on its own threads, which
must follow the switch of the thread that ran the forward. While any thread is inside
emulated_cuda(), chainrule ops that every thread runs on CPU tensors go to the emulator; the
switch returns to the CPU kernels when the last context, in any thread, exits (a count, so
contexts of several threads may overlap in any order). The emulator's schedule is process-wide too.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

from . import _C

SCHEDULES = ("forward", "reverse", "random")

# How many emulated_cuda() contexts are open, over all threads; the switch is on while it is > 0.
_emulated_contexts = 0
_emulated_contexts_lock = threading.Lock()


def emulator_available() -> bool:
    """Whether this chainrule was built with the CUDA emulator (it needs CUDA's headers)."""
    return bool(_C.build_info()["emulator_available"])


def host_backend() -> str:
    """'cpu' or 'emulated_cuda': what chainrule ops on CPU tensors run now."""
    return _C._host_backend()


@contextlib.contextmanager
def emulated_cuda(schedule: Optional[str] = None, seed: int = 0) -> Iterator[None]:
    """Run chainrule ops on CPU tensors through the CUDA kernels under the emulator.

    schedule: the order in which the emulator runs a block's threads between synchronisation
    points, "forward", "reverse" or "random" (seeded by `seed`); None keeps the emulator's
    current order (from the environment variable CHAINRULE_EMU_SCHEDULE, else "forward"). A
    correct kernel gives the same result in every order; a missing __syncthreads shows up as a
    difference.

    Process-wide: while this context is open, chainrule ops on CPU tensors run on the emulator in
    every thread (autograd's backward threads included), and they return to the CPU kernels when
    the last open context of any thread exits. The schedule is process-wide as well: each context
    restores on exit the schedule it found on entry.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"chainrule.backends.emulated_cuda: unknown schedule {schedule!r}; "
                         f"expected one of {SCHEDULES}")
    if not emulator_available():
        raise RuntimeError("chainrule.backends.emulated_cuda: this chainrule was built without "
                           "the CUDA emulator (no CUDA headers were found at build time)")
    global _emulated_contexts
    previous_schedule = _C._emu_get_schedule()
    with _emulated_contexts_lock:
        _emulated_contexts += 1
        _C._set_host_backend("emulated_cuda")
    if schedule is not None:
        _C._emu_set_schedule(schedule, seed)
    try:
        yield
    finally:
        _C._emu_set_schedule(*previous_schedule)
        with _emulated_contexts_lock:
            _emulated_contexts -= 1
            if _emulated_contexts == 0:
                _C._set_host_backend("cpu")


def emulated_launch_count() -> int:
    """Kernels the emulator has launched in this process (for tests that count launches)."""
    return int(_C._emu_launch_count())


GEMM_MODES = ("auto", "ours", "aten")


def cpu_gemm_path(m: int, k: int, n: int, dtype=None, *, backward: bool = False,
                  accumulate_grad: bool = False, requires_grad: bool = True) -> str:
    """'ours', 'aten', 'gemv' or 'torch': how a CPU linear call with an (m, k) input and an
    (n, k) weight runs now (forward, or backward when `backward`); `requires_grad=False` asks
    about a forward that needs no gradient (inference, decoding).

    chainrule's own GEMM fuses the epilogues into the kernel; ATen's (MKL / oneDNN) is followed by
    chainrule's one-pass epilogues; 'gemv' is the forward of at most 8 rows on chainrule's GEMV
    (the weight streamed once, then the one-pass epilogue); 'torch' is a layer that
    chainrule.functional.linear runs as torch's own F.linear + activation, because it is tiny (at
    most 2^21 multiply-adds) or would take ATen's GEMM both ways without accumulate_grad anyway,
    except a forward that the GEMV runs: without gradient always, with one for at most 4 rows of a
    weight of at least 2^18 values. The rule (csrc/cpu/gemm_path.cpp, docs/cpu_gemm.md) depends
    only on the CPU, the dtype and the shape, so a call always takes the same path. The
    environment variable CHAINRULE_CPU_GEMM=auto|ours|aten (read once) overrides it; `ours` still
    uses ATen where chainrule has no kernel for the dtype on this CPU.
    """
    import torch  # noqa: PLC0415

    from .functional import DTYPE_NAMES as names  # noqa: PLC0415

    dtype = torch.float32 if dtype is None else dtype
    if dtype not in names:
        raise ValueError(f"chainrule.backends.cpu_gemm_path: dtype must be a floating dtype, "
                         f"got {dtype}")
    if _C._cpu_prefers_torch_ops(names[dtype], m, n, k, accumulate_grad,
                                 requires_grad or backward):
        return "torch"
    return _C._cpu_gemm_path(names[dtype], backward, m, n, k)


def cpu_gemm_blocking(dtype=None) -> Optional[dict]:
    """The cache blocking chainrule's CPU GEMM runs `dtype` (default float32) with on this CPU,
    with the active ISA and torch's thread count: the micro-tile (mr x nr), kc, the bound on mc,
    nc, and the bytes of the packed A block that pick mc per call; None where chainrule has no
    GEMM kernel for the dtype here. Fitted to the caches cpuid reports
    (`chainrule.build_info()["cpu_caches"]`; docs/cpu_gemm.md, "Blocking per CPU").
    """
    import torch  # noqa: PLC0415

    from .functional import DTYPE_NAMES as names  # noqa: PLC0415

    dtype = torch.float32 if dtype is None else dtype
    if dtype not in names:
        raise ValueError(f"chainrule.backends.cpu_gemm_blocking: dtype must be a floating dtype, "
                         f"got {dtype}")
    return _C._cpu_gemm_blocking(names[dtype])


def cpu_gemm_mode() -> str:
    """'auto', 'ours' or 'aten': how CPU linear calls choose their GEMM now."""
    return _C._cpu_gemm_mode()
