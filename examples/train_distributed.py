"""Data-parallel training with chainrule's fused Linear and AdamW, under DDP or FSDP2.

    torchrun --nproc_per_node=2 examples/train_distributed.py --ddp
    torchrun --nproc_per_node=2 examples/train_distributed.py --fsdp --bf16 --accumulate-grad

Each rank draws its own batches of a synthetic regression task (a fixed random "teacher" MLP
plus noise) and trains a student MLP built from chainrule.nn.Linear layers. --ddp wraps it in
DistributedDataParallel, --fsdp shards every layer with FSDP2 (fully_shard); --micro-batches N
accumulates gradients over N micro-batches, reducing only on the last (DDP's no_sync(), FSDP2's
set_requires_gradient_sync(False)), and --accumulate-grad lets the layers add their weight
gradients into .grad in place. Runs on the CPU with gloo, on GPUs with nccl (one per rank).
Rank 0 shows a progress bar and plots the loss curve; --checkpoint DIR saves the model and the
optimizer with torch.distributed.checkpoint at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import chainrule


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    wrapper = parser.add_mutually_exclusive_group(required=True)
    wrapper.add_argument("--ddp", action="store_true", help="DistributedDataParallel")
    wrapper.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank and micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accumulate-grad", action="store_true",
                        help="chainrule.nn.Linear(accumulate_grad=True)")
    parser.add_argument("--bf16", action="store_true",
                        help="FSDP2 mixed precision: bf16 parameters, fp32 gradient reduction")
    parser.add_argument("--checkpoint", metavar="DIR", help="save model and optimizer here")
    parser.add_argument("--plot", default="train_distributed_loss.png")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    if args.bf16 and not args.fsdp:
        parser.error("--bf16 is FSDP2's mixed-precision policy; use it with --fsdp")
    return args


def mlp(width, accumulate_grad):
    return torch.nn.Sequential(
        chainrule.nn.Linear(32, width, activation="gelu", accumulate_grad=accumulate_grad),
        chainrule.nn.Linear(width, width, activation="gelu", accumulate_grad=accumulate_grad),
        chainrule.nn.Linear(width, 8, accumulate_grad=accumulate_grad),
    )


def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model and teacher on every rank
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                                  torch.nn.Linear(64, 8)).to(device).requires_grad_(False)
    model = mlp(args.width, args.accumulate_grad).to(device)
    if args.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
        no_sync = model.no_sync
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.bf16 else MixedPrecisionPolicy()
        for layer in model:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
    optimizer = chainrule.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)

    generator = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own data
    losses = []
    bar = tqdm(range(args.steps), disable=rank != 0, desc=f"{'DDP' if args.ddp else 'FSDP2'} "
               f"x{world_size}")
    for _ in bar:
        total = torch.zeros((), device=device)
        for micro in range(args.micro_batches):
            x = torch.randn(args.batch_size, 32, device=device, generator=generator)
            target = teacher(x) + 0.01 * torch.randn(args.batch_size, 8, device=device,
                                                     generator=generator)
            last = micro == args.micro_batches - 1
            with contextlib.nullcontext() if last else no_sync():
                loss = F.mse_loss(model(x).float(), target) / args.micro_batches
                loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep .grad for accumulate_grad to add into
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=args.checkpoint)
    if rank == 0:
        print(f"final loss {losses[-1]:.5f} (first {losses[0]:.5f}) after {args.steps} steps")
        if not args.no_plot:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            plt.semilogy(losses)
            plt.xlabel("step")
            plt.ylabel("mean training loss over ranks")
            plt.title(f"chainrule Linear + AdamW, {'DDP' if args.ddp else 'FSDP2'}, "
                      f"{world_size} ranks")
            plt.savefig(args.plot, dpi=120)
            print(f"loss curve: {args.plot}")
    # Release the wrapped model (DDP's reducer holds the process group) and let every rank get
    # here before the group goes: a rank tearing gloo down while its peer still talks to it can
    # abort at exit ("terminate called without an active exception").
    # FSDP2's module states are reference cycles: collect them while the group is alive.
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
