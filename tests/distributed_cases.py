"""What each rank of tests/test_distributed.py runs.

One spawned job of 2 ranks runs every configuration in sequence (process start-up and importing
torch cost more than the cases), and writes one result per case to a JSON file: "ok", or the
failure's traceback. test_distributed.py turns each result into a test.

Every training case runs the same model twice under the same wrapper and the same data (each rank
its own): chainrule.nn.Linear + chainrule.optim.AdamW, and torch.nn.Linear + torch.optim.AdamW;
the losses over the steps and the final parameters must agree.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import chainrule

STEPS = 6
IN, HIDDEN, OUT = 16, 33, 7  # odd sizes: FSDP2 shards them unevenly over 2 ranks
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
BF16_TOLERANCE = dict(rtol=2e-2, atol=2e-3)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ChainruleMLP(torch.nn.Module):
    """TorchMLP's parameters under the same names, so state dicts and checkpoints are shared."""

    def __init__(self, accumulate_grad=False):
        super().__init__()
        self.fc1 = chainrule.nn.Linear(IN, HIDDEN, activation="gelu",
                                       accumulate_grad=accumulate_grad)
        self.fc2 = chainrule.nn.Linear(HIDDEN, OUT, accumulate_grad=accumulate_grad)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def make_model(kind, accumulate_grad=False, seed=0):
    torch.manual_seed(seed)
    reference = TorchMLP()
    if kind == "torch":
        return reference
    model = ChainruleMLP(accumulate_grad)
    model.load_state_dict(reference.state_dict())
    return model


def make_optimizer(kind, params, lr=1e-2):
    if kind == "torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    return chainrule.optim.AdamW(params, lr=lr, weight_decay=0.1)


def batch(step, micro=0):
    """The data of one (step, micro-batch) on this rank: different on every rank."""
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + dist.get_rank())
    return (torch.randn(8, IN, generator=generator), torch.randn(8, OUT, generator=generator))


def full_parameters(model):
    return {name: (p.full_tensor() if chainrule.distributed.is_dtensor(p) else p).detach().clone()
            for name, p in model.named_parameters()}


def wrap(model, wrapper, reshard=True, mixed_precision=False):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
    return fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)


def no_sync(model, wrapper):
    """The wrapper's way of skipping gradient reduction for a micro-batch."""
    if wrapper == "ddp":
        return model.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return fsdp_no_sync()


def train(kind, wrapper, steps=STEPS, micro_batches=1, accumulate_grad=False, reshard=True,
          mixed_precision=False, hooks=None):
    """Losses and final (full) parameters of `steps` optimizer steps of a freshly built model."""
    model = wrap(make_model(kind, accumulate_grad), wrapper, reshard, mixed_precision)
    if hooks is not None:
        hooks(model.module if wrapper == "ddp" else model)
    optimizer = make_optimizer(kind, model.parameters())
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(micro_batches):
            x, target = batch(step, micro)
            context = no_sync(model, wrapper) if micro < micro_batches - 1 \
                else contextlib.nullcontext()
            with context:
                loss = F.mse_loss(model(x).float(), target) / micro_batches
                loss.backward()
            total += loss.item()
        optimizer.step()
        # Keep .grad allocated, so that accumulate_grad adds into an existing gradient.
        optimizer.zero_grad(set_to_none=False)
        losses.append(total)
    return torch.tensor(losses), full_parameters(model)


def assert_same_training(ours, theirs, tolerance):
    torch.testing.assert_close(ours[0], theirs[0], **tolerance)
    for name, p in theirs[1].items():
        torch.testing.assert_close(ours[1][name], p, **tolerance, msg=lambda m: f"{name}: {m}")


# ---- the cases ----------------------------------------------------------------------------------

@contextlib.contextmanager
def counting_in_place_backwards():
    """Counts the backwards that add into an existing .grad (chainrule.linear_backward_accumulate)."""
    original = chainrule.ops.linear_backward_accumulate
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    chainrule.ops.linear_backward_accumulate = counted
    try:
        yield calls
    finally:
        chainrule.ops.linear_backward_accumulate = original


def training_case(wrapper, micro_batches=1, reshard=True, mixed_precision=False,
                  grad_exists=True):
    """grad_exists: whether the layers' .grad is allocated at backward (DDP keeps .grad between
    steps; FSDP2 frees the unsharded .grad after each reduce-scatter, so only its micro-batches
    without reduction leave one), i.e. whether accumulate_grad adds in place."""
    def case(accumulate_grad):
        settings = dict(micro_batches=micro_batches, reshard=reshard,
                        mixed_precision=mixed_precision)
        theirs = train("torch", wrapper, **settings)
        with counting_in_place_backwards() as in_place:
            ours = train("chainrule", wrapper, accumulate_grad=accumulate_grad, **settings)
        assert bool(in_place) == (accumulate_grad and grad_exists), len(in_place)
        assert_same_training(ours, theirs, BF16_TOLERANCE if mixed_precision else FP32_TOLERANCE)
        # Every rank ends with the same parameters (the wrapper reduced the gradients).
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ours[1])
        for other in gathered[1:]:
            for name, p in gathered[0].items():
                torch.testing.assert_close(other[name], p, rtol=0, atol=0)
    return case


def hooks_case(wrapper):
    """Gradient hooks under DDP / FSDP2 gradient accumulation (2 micro-batches, the first without
    reduction) see what they see with torch.nn.Linear; with accumulate_grad the accumulated .grad
    keeps its storage (no copy)."""
    def case(accumulate_grad):
        records = {}

        def install(kind):
            seen = records.setdefault(kind, {"tensor": [], "post": [], "same_storage": []})

            def register(model):
                if wrapper == "ddp":
                    # A tensor hook on fc1 (which therefore takes the ordinary path) sees each
                    # micro-batch's gradient; a post-accumulate-grad hook on fc2 (accumulated in
                    # place) sees .grad after every micro-batch.
                    model.fc1.weight.register_hook(
                        lambda g: seen["tensor"].append(g.detach().clone()))
                    previous = {}

                    def post(p):
                        seen["post"].append(p.grad.detach().clone())
                        seen["same_storage"].append(previous.get("ptr") == p.grad.data_ptr())
                        previous["ptr"] = p.grad.data_ptr()
                    model.fc2.weight.register_post_accumulate_grad_hook(post)
                else:
                    # FSDP2 runs the sharded parameters' post-accumulate-grad hooks after the
                    # reduce-scatter of each synchronised micro-batch.
                    for layer in (model.fc1, model.fc2):
                        layer.weight.register_post_accumulate_grad_hook(
                            lambda p: seen["post"].append(p.grad.to_local().clone()))
            return register

        def run(kind):
            return train(kind, wrapper, steps=2, micro_batches=2,
                         accumulate_grad=accumulate_grad, hooks=install(kind))
        assert_same_training(run("chainrule"), run("torch"), FP32_TOLERANCE)
        ours, theirs = records["chainrule"], records["torch"]
        for key in ("tensor", "post"):
            assert len(ours[key]) == len(theirs[key]), (key, len(ours[key]), len(theirs[key]))
            for a, b in zip(ours[key], theirs[key]):
                torch.testing.assert_close(a, b, **FP32_TOLERANCE)
        assert len(theirs["post"]) == 4  # DDP: 2 steps x 2 micro-batches; FSDP2: 2 steps x 2 layers
        if wrapper == "ddp":
            assert len(theirs["tensor"]) == 4
            # .grad stays one tensor through accumulation (zero_grad keeps it), with or without
            # accumulate_grad: the in-place path hands AccumulateGrad the same storage back.
            assert ours["same_storage"] == theirs["same_storage"] == [False, True, True, True]
    return case


def dtensor_optimizer_case(accumulate_grad):
    """Tensor-parallel style DTensors (Shard(0), Shard(1), Replicate) stepped by chainrule's AdamW
    with a tensor lr, against torch.optim.AdamW on the full tensors; mismatched layouts raise."""
    del accumulate_grad
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(3)
    fulls = [torch.randn(6, 5), torch.randn(4, 9), torch.randn(7)]
    placements = [[Shard(0)], [Shard(1)], [Replicate()]]
    ours = [torch.nn.Parameter(distribute_tensor(t, mesh, pl)) for t, pl in zip(fulls, placements)]
    theirs = [torch.nn.Parameter(t.clone()) for t in fulls]
    lr = torch.tensor(0.02)
    opt_ours = chainrule.optim.AdamW(ours, lr=lr, weight_decay=0.1, amsgrad=True)
    opt_theirs = torch.optim.AdamW(theirs, lr=0.02, weight_decay=0.1, amsgrad=True)
    for step in range(4):
        grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(step * 10 + i))
                 for i, t in enumerate(fulls)]
        for p, g, pl in zip(ours, grads, placements):
            p.grad = distribute_tensor(g, mesh, pl)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q, pl in zip(ours, theirs, placements):
        torch.testing.assert_close(p.full_tensor(), q.detach(), **FP32_TOLERANCE)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state = opt_ours.state[p][key]
            assert chainrule.distributed.is_dtensor(state), key
            assert state.device_mesh == mesh and tuple(state.placements) == tuple(pl), key
            torch.testing.assert_close(state.full_tensor(), opt_theirs.state[q][key],
                                       **FP32_TOLERANCE)
    # A gradient whose placements differ from its parameter's.
    ours[0].grad = distribute_tensor(torch.randn(6, 5), mesh, [Replicate()])
    try:
        opt_ours.step()
    except ValueError as error:
        assert "chainrule.optim.AdamW: grad must have its parameter's layout" in str(error), error
        assert "Replicate" in str(error) and "Shard(dim=0)" in str(error), error
    else:
        raise AssertionError("a gradient with other placements than its parameter was accepted")
    # A state that is a plain tensor while the parameter is a DTensor.
    ours[0].grad = distribute_tensor(torch.randn(6, 5), mesh, [Shard(0)])
    opt_ours.state[ours[0]]["exp_avg"] = torch.zeros(3, 5)
    try:
        opt_ours.step()
    except ValueError as error:
        assert "state['exp_avg'] must have its parameter's layout" in str(error), error
    else:
        raise AssertionError("a plain-tensor state of a DTensor parameter was accepted")


def checkpoint_case(checkpoint_dir):
    """FSDP2, torch.distributed.checkpoint: chainrule's AdamW saves, torch.optim.AdamW loads it
    and trains on, saves, chainrule's AdamW loads that and trains on; the whole run matches one
    that used torch.optim.AdamW throughout."""
    def case(accumulate_grad):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
            set_optimizer_state_dict)
        reference = train("torch", "fsdp")
        losses, model = [], None
        segments = (("chainrule", range(0, 2)), ("torch", range(2, 4)), ("chainrule", range(4, 6)))
        for index, (kind, steps) in enumerate(segments):
            # The reference's initialisation first; later a freshly built model and optimizer
            # (another initialisation) that the checkpoint then overwrites.
            model = wrap(make_model(kind, accumulate_grad, seed=100 * index), "fsdp")
            optimizer = make_optimizer(kind, model.parameters())
            if index > 0:
                state = {"model": get_model_state_dict(model),
                         "optim": get_optimizer_state_dict(model, optimizer)}
                dcp.load(state, checkpoint_id=os.path.join(checkpoint_dir, str(index - 1)))
                set_model_state_dict(model, state["model"])
                set_optimizer_state_dict(model, optimizer, state["optim"])
            for step in steps:
                x, target = batch(step)
                loss = F.mse_loss(model(x), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                losses.append(loss.item())
            if index < len(segments) - 1:
                state = {"model": get_model_state_dict(model),
                         "optim": get_optimizer_state_dict(model, optimizer)}
                if kind == "chainrule":  # the states are DTensors, the step a plain tensor
                    some = next(iter(state["optim"]["state"].values()))
                    assert chainrule.distributed.is_dtensor(some["exp_avg"])
                    assert not chainrule.distributed.is_dtensor(some["step"])
                dcp.save(state, checkpoint_id=os.path.join(checkpoint_dir, str(index)))
        assert_same_training((torch.tensor(losses), full_parameters(model)), reference,
                             FP32_TOLERANCE)
    return case


# Cases that wrap the model in FSDP2, which needs record_event on torch's CPU stream (not in torch
# 2.6): skipped there, with the reason, by test_distributed.py.
NEEDS_FSDP2 = {"fsdp_reshard", "fsdp_no_reshard", "fsdp_bf16_mixed_precision", "fsdp_no_sync",
               "hooks_fsdp", "checkpoint_round_trip"}


def fsdp2_runs_on_cpu() -> bool:
    return hasattr(torch.cpu.current_stream(), "record_event")


def cases(checkpoint_dir):
    """name -> case(accumulate_grad). The names are test_distributed.py's test ids."""
    return {
        "ddp": training_case("ddp"),
        "ddp_no_sync": training_case("ddp", micro_batches=2),
        "fsdp_reshard": training_case("fsdp", reshard=True, grad_exists=False),
        "fsdp_no_reshard": training_case("fsdp", reshard=False, grad_exists=False),
        "fsdp_bf16_mixed_precision": training_case("fsdp", mixed_precision=True,
                                                   grad_exists=False),
        "fsdp_no_sync": training_case("fsdp", micro_batches=2),
        "hooks_ddp": hooks_case("ddp"),
        "hooks_fsdp": hooks_case("fsdp"),
        "dtensor_optimizer": dtensor_optimizer_case,
        "checkpoint_round_trip": checkpoint_case(checkpoint_dir),
    }


def worker(rank, world_size, init_file, result_file, checkpoint_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, case in cases(checkpoint_dir).items():
            if name in NEEDS_FSDP2 and not fsdp2_runs_on_cpu():
                continue
            for accumulate_grad in (False, True):
                key = f"{name}-{'accumulate' if accumulate_grad else 'plain'}"
                try:
                    case(accumulate_grad)
                    results[key] = "ok"
                except BaseException:  # noqa: B036 (CheckpointException is a BaseException)
                    # reported per case by the test; the next case still runs
                    results[key] = traceback.format_exc()
                dist.barrier()
                if name == "dtensor_optimizer":
                    break  # no layer involved: accumulate_grad does not apply
    finally:
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(results, f)
    # Free what still holds the process group (FSDP2's module states are reference cycles), meet,
    # destroy the group and leave without interpreter finalization: a gloo group freed there
    # aborts a rank now and then ("terminate called without an active exception", about 1 run in
    # 20 of benchmarks/bench_fsdp.py on a loaded 2-core machine).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
