#!/usr/bin/env python3
"""The optimizer step under FSDP2: chainrule.optim.AdamW against torch.optim.AdamW(fused=True),
2 ranks on the CPU (gloo), each rank stepping its shards of the same model.

FSDP2 hands the optimizer DTensor parameters, gradients and states. torch's optimizers dispatch
their ops on DTensors (the DTensor dispatch costs more than the math for small shards: torch
reports the optimizer step going from 2.5 % to 33 % of a training step under FSDP2); chainrule's
AdamW runs its one fused kernel call on the local shards. The script spawns its 2 ranks itself
(threads split between them) and times, on every rank at once and interleaved, one optimizer step
of each contender over fixed sharded gradients from a backward of the model; rank 0's times are
reported. Bytes per parameter as bench_adam.py: 28 (fp32 params and states), of the rank's shard.
The note gives the step's share of a training step (forward + backward + step) of this model.

--shapes takes LAYERSxWIDTH: that many chainrule.nn.Linear(WIDTH, WIDTH) layers, each sharded
with fully_shard, e.g. 16x1024 (16.8M parameters).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402

WORLD_SIZE = 2
BYTES_PER_PARAM = 28
RANK_TIMEOUT_S = 600


def shapes_for(s: harness.Settings) -> list[tuple[int, int]]:
    if s.args.shapes:
        return harness.parse_shapes(s.args.shapes, 2)
    if s.mode == "smoke":
        return [(2, 64)]
    if s.mode == "quick":
        return [(16, 1024), (64, 128)]
    return [(16, 1024), (64, 128), (64, 512), (8, 4096)]


def build(layers, width, chainrule, optimizer):
    """A sharded model with one backward's gradients, and its optimizer."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[chainrule.nn.Linear(width, width, activation="gelu")
                                  for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    hyper = dict(lr=1e-3, weight_decay=1e-2)
    opt = chainrule.optim.AdamW(model.parameters(), **hyper) if optimizer == "chainrule" \
        else torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    return model, opt


def training_step(model, x):
    model(x).square().mean().backward()


def rank_main(rank, init_file, result_file, configs, repeats, warmup, threads):
    import torch.distributed as dist
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    chainrule = harness.import_chainrule()
    results = []
    device = torch.device("cpu")
    for layers, width in configs:
        models = {name: build(layers, width, chainrule, name) for name in ("chainrule", "fused")}
        x = torch.randn(64, width, generator=torch.Generator().manual_seed(rank))
        for model, _ in models.values():
            training_step(model, x)
        with torch.no_grad():  # the first step allocates the states; it is also the check
            for _, opt in models.values():
                opt.step()
        local = {name: [p.to_local() for p in model.parameters()]
                 for name, (model, _) in models.items()}
        check = harness.check_close(local["chainrule"], local["fused"], torch.float32,
                                    names=[f"param {i}" for i in range(len(local["fused"]))],
                                    tolerance=1e-5)
        contenders = [harness.Contender(name, lambda _, o=opt: o.step(), prepare=dist.barrier)
                      for name, (_, opt) in models.items()]
        with torch.no_grad():
            times = harness.measure(contenders if check.ok else contenders[1:], repeats=repeats,
                                    warmup=warmup, device=device)
        # forward + backward alone, for the step's share of a training step
        model = models["chainrule"][0]
        fwd_bwd = harness.measure([harness.Contender(
            "forward+backward", lambda _: training_step(model, x), prepare=dist.barrier)],
            repeats=repeats, warmup=min(warmup, 1), device=device)["forward+backward"]
        params = sum(p.numel() for p in model.parameters())
        local_params = sum(p.numel() for p in local["fused"])
        results.append({"layers": layers, "width": width, "params": params,
                        "local_params": local_params, "tensors": len(local["fused"]),
                        "times": times, "fwd_bwd": fwd_bwd, "check": check.as_dict()})
        del models, local, contenders, model
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    harness.end_rank(dist)


def spawn(s: harness.Settings, configs) -> list[dict]:
    import torch.multiprocessing as mp
    threads = max(1, s.threads // WORLD_SIZE)
    with tempfile.TemporaryDirectory() as directory:
        result_file = os.path.join(directory, "rank0.json")
        context = mp.start_processes(
            rank_main, nprocs=WORLD_SIZE, join=False, start_method="spawn",
            args=(os.path.join(directory, "init"), result_file, configs, s.repeats, s.warmup,
                  threads))
        deadline = time.monotonic() + RANK_TIMEOUT_S
        try:
            # join() returns False each time one rank ends while another still runs
            while not context.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench_fsdp: the {WORLD_SIZE} ranks did not finish in "
                                     f"{RANK_TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return json.loads(Path(result_file).read_text())


def fsdp2_runs_on_cpu() -> bool:
    """FSDP2 records events on the current stream; torch's CPU stream has record_event only from
    a later torch (2.14 has it; torch 2.6's FSDP2 fails on CPU ranks with an AttributeError)."""
    return hasattr(torch.cpu.current_stream(), "record_event")


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="comma-separated LAYERSxWIDTH, e.g. 16x1024")
    args = p.parse_args(argv)
    s = harness.settings("fsdp", args, repeats=(1, 7, 11), warmup=(0, 1, 3))
    rows, peaks = [], None
    import torch.distributed as dist
    if s.device.type != "cpu":
        s.available = False
        s.reason = "bench_fsdp: CPU ranks (gloo) only; nothing measured on " + str(s.device)
    elif not dist.is_available() or not dist.is_gloo_available():
        s.available = False
        s.reason = "bench_fsdp: this torch has no torch.distributed with gloo"
    elif not fsdp2_runs_on_cpu():
        s.available = False
        s.reason = (f"bench_fsdp: FSDP2 of torch {torch.__version__} cannot run on CPU ranks "
                    f"(its CPU stream has no record_event); nothing measured")
    if s.available:
        peaks = harness.load_peaks(s)
        for result in spawn(s, shapes_for(s)):
            check = harness.Check(ok=result["check"]["ok"],
                                  max_error=result["check"]["max_relative_error"],
                                  tolerance=result["check"]["tolerance"],
                                  detail=result["check"].get("detail", ""),
                                  error=result["check"].get("error"))
            peak, peak_name = harness.peak_for(peaks, s.device, torch.float32, "bandwidth")
            times = result["times"]
            fwd_bwd = sorted(result["fwd_bwd"])[len(result["fwd_bwd"]) // 2]
            shares = []
            for name in ("chainrule", "fused"):
                if times.get(name):
                    step = sorted(times[name])[len(times[name]) // 2]
                    shares.append(f"{name} {100 * step / (step + fwd_bwd):.0f}%")
            label = (f"{result['layers']}x{result['width']} fp32 AdamW step, FSDP2 x{WORLD_SIZE}")
            rows.append(harness.make_row(
                subject="fsdp", label=label, size=float(result["params"]), times=times,
                check=check, work=float(BYTES_PER_PARAM * result["local_params"]), unit="GB/s",
                peak=peak, peak_name=peak_name, threads=s.threads,
                config={"layers": result["layers"], "width": result["width"],
                        "params": result["params"], "local_params": result["local_params"],
                        "tensors": result["tensors"], "ranks": WORLD_SIZE, "device": "cpu",
                        "threads_per_rank": max(1, s.threads // WORLD_SIZE),
                        "forward_backward_median_s": fwd_bwd},
                extra={"series": f"fp32 FSDP2 x{WORLD_SIZE}",
                       "note": "share of a training step: " + ", ".join(shares)}))
    harness.write_results(s, rows, peaks=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
