"""Where chainrule ops on CPU tensors run.

By default a chainrule op on CPU tensors runs the CPU kernels. Inside emulated_cuda() it runs the
CUDA kernel source instead, compiled for the host and executed by chainrule's CUDA emulator
(csrc/emu): blocks on worker threads, the threads of a block as fibers. That is how the CUDA
kernels are tested on machines without a GPU. CUDA tensors always run the CUDA kernels.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from . import _C

SCHEDULES = ("forward", "reverse", "random")


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
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"chainrule.backends.emulated_cuda: unknown schedule {schedule!r}; "
                         f"expected one of {SCHEDULES}")
    if not emulator_available():
        raise RuntimeError("chainrule.backends.emulated_cuda: this chainrule was built without "
                           "the CUDA emulator (no CUDA headers were found at build time)")
    previous = _C._host_backend()
    previous_schedule = _C._emu_get_schedule()
    _C._set_host_backend("emulated_cuda")
    if schedule is not None:
        _C._emu_set_schedule(schedule, seed)
    try:
        yield
    finally:
        _C._emu_set_schedule(*previous_schedule)
        _C._set_host_backend(previous)


def emulated_launch_count() -> int:
    """Kernels the emulator has launched in this process (for tests that count launches)."""
    return int(_C._emu_launch_count())
