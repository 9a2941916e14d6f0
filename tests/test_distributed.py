"""chainrule under torch.distributed (gloo, 2 ranks on the CPU): DDP, DDP no_sync, FSDP2 (resharding
after forward or not, bf16 mixed precision, gradient accumulation), gradient hooks with
accumulate_grad, DTensor parameters in the optimizer, torch.distributed.checkpoint round trips,
and the distributed example under torchrun.

The ranks run every case of distributed_cases.py in one spawned job (start-up dominates); each
case's result becomes a test here. The job and the example have bounded timeouts, so a hang fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases

WORLD_SIZE = 2
JOB_TIMEOUT_S = 300  # the whole job; each case takes a few seconds
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no torch.distributed with gloo")

CASE_NAMES = [f"{name}-{mode}" for name in distributed_cases.cases("").keys()
              for mode in ("plain", "accumulate")
              if not (name == "dtensor_optimizer" and mode == "accumulate")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distributed")
    result_file = directory / "results.json"
    context = mp.start_processes(
        distributed_cases.worker, nprocs=WORLD_SIZE, join=False, start_method="spawn",
        args=(WORLD_SIZE, str(directory / "init"), str(result_file), str(directory / "ckpt")))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2-rank job did not finish in {JOB_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    merged = {}
    for rank in range(WORLD_SIZE):
        with open(f"{result_file}.{rank}") as f:
            for name, result in json.load(f).items():
                if result != "ok":
                    merged.setdefault(name, []).append(f"rank {rank}:\n{result}")
                else:
                    merged.setdefault(name, [])
    return merged


FSDP2_SKIP_REASON = (f"FSDP2 of torch {torch.__version__} cannot run on CPU ranks (its CPU stream "
                     f"has no record_event, which torch 2.14 has)")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(results, name):
    if name.rsplit("-", 1)[0] in distributed_cases.NEEDS_FSDP2 and \
            not distributed_cases.fsdp2_runs_on_cpu():
        pytest.skip(FSDP2_SKIP_REASON)
    assert name in results, f"the job did not run {name}"
    failures = results[name]
    assert not failures, "\n".join(failures)


def test_example_under_torchrun(tmp_path):
    """The README's command, a few steps of each wrapper."""
    wrappers = ("--ddp", "--fsdp") if distributed_cases.fsdp2_runs_on_cpu() else ("--ddp",)
    for wrapper in wrappers:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(EXAMPLE), wrapper, "--steps", "4", "--no-plot"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
        assert "final loss" in done.stdout, done.stdout

    if "--fsdp" not in wrappers:
        pytest.skip(f"--ddp ran; --fsdp not: {FSDP2_SKIP_REASON}")
