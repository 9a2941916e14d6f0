"""No memory growth over long training: 10,000 iterations of a small model.

A small MLP of chainrule.nn.Linear layers (every activation, one layer accumulating into .grad)
trained with chainrule.optim.AdamW, in a fresh Python process so that the resident set (RSS,
/proc/self/statm) starts from a clean baseline. After a warm-up (allocator pools, first-call
caches, the optimizer's states), the RSS and the number of live tensors that gc can see are
recorded; after the remaining iterations neither may have grown beyond a bound. A leak of one
small tensor per iteration (the model's smallest gradient is 8 x 32 float32 = 1 KiB, plus
~0.5 KiB of metadata) over 9,000 iterations would be >= 13 MiB and fails the RSS bound; a
Python-side leak of any tensor fails the exact tensor count. The model: three layers (gelu,
silu with accumulate_grad=True, none), AdamW with amsgrad; every other iteration runs two
micro-batches, so the second adds into .grad in the kernel; zero_grad alternates between
set_to_none and zeroing in place.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import chainrule

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import gc, json, os, sys, time
    import torch
    import chainrule

    backend, iterations, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    L = chainrule.nn.Linear
    model = torch.nn.Sequential(
        L(16, 32, activation="gelu"), L(32, 32, activation="silu", accumulate_grad=True),
        L(32, 8))
    opt = chainrule.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    x = torch.randn(4, 16)
    target = torch.randn(4, 8)

    def iteration(i):
        # every other iteration two micro-batches: the second adds into .grad (accumulate_grad)
        for _ in range(1 + i % 2):
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=i % 2 == 0)

    with torch.no_grad():
        loss_before = float(torch.nn.functional.mse_loss(model(x), target))
    context = chainrule.backends.emulated_cuda() if backend == "emulated_cuda" else None
    if context is not None:
        context.__enter__()
    start = time.perf_counter()
    for i in range(warmup):
        iteration(i)
    samples = [(warmup, rss_bytes())]
    tensors_after_warmup = live_tensors()
    step = (iterations - warmup) // 4
    for i in range(warmup, iterations):
        iteration(i)
        if (i + 1 - warmup) % step == 0:
            samples.append((i + 1, rss_bytes()))
    tensors_at_end = live_tensors()
    if context is not None:
        context.__exit__(None, None, None)
    print(json.dumps({"samples": samples, "tensors_after_warmup": tensors_after_warmup,
                      "tensors_at_end": tensors_at_end, "seconds": time.perf_counter() - start,
                      "loss_before": loss_before,
                      "loss": float(torch.nn.functional.mse_loss(model(x), target))}))
""")

# backend -> (iterations, warm-up iterations). The emulator runs the same loop 25x shorter: a
# launch there costs milliseconds of fiber switching.
RUNS = {"cpu": (10_000, 1_000), "emulated_cuda": (400, 100)}
RSS_BOUND = 4 * 2**20


@pytest.mark.parametrize("backend", list(RUNS))
def test_no_growth_over_training(backend):
    if backend == "emulated_cuda" and not chainrule.backends.emulator_available():
        pytest.skip("chainrule was built without the CUDA emulator (no CUDA headers found)")
    iterations, warmup = RUNS[backend]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(chainrule.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, backend, str(iterations), str(warmup)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    samples = report["samples"]
    growth = samples[-1][1] - samples[0][1]
    described = ", ".join(f"{i}: {rss / 2**20:.1f} MiB" for i, rss in samples)
    assert growth <= RSS_BOUND, (
        f"RSS grew by {growth / 2**20:.2f} MiB over {iterations - warmup} iterations after the "
        f"warm-up ({described})")
    assert report["tensors_at_end"] == report["tensors_after_warmup"], report
    print(f"{backend}: {iterations} iterations in {report['seconds']:.1f} s; RSS {described}; "
          f"{report['tensors_at_end']} live tensors")
    assert report["loss"] < 0.5 * report["loss_before"], report  # it trained: not a no-op loop
