"""The CUDA launchers' host code, run without a GPU.

The planners (csrc/cuda/adam_plan.h, csrc/cuda/linear_plan.h) are shared by the CUDA launchers
and their emulated twins, so what a GPU would trip on in them shows here, through the emulated
path and the planner hooks of chainrule._C:

* the Adam metadata cache has no size bound and drops an entry only when its tensors are freed
  (a captured CUDA graph reads that buffer; with more than 16 sets an LRU re-uploaded every step);
* while a stream is capturing, the planner sends nothing through host memory (a captured copy
  would read the freed pinned staging buffer at replay);
* each Adam launch gets its own zeroed completion counter (two streams, or a launch that failed
  part-way, never share one);
* the GEMM grid keeps every dimension within CUDA's limits for any N (gridDim.y stops at 65535);
* a CPU lr tensor is read on the host, never copied to the device each step;
* (the emulator's 48 KiB dynamic shared memory limit without an opt-in is tests/emu/test_basics.cpp.)

The same behaviours on a real GPU: tests/test_cuda_graphs.py.
"""
from __future__ import annotations

import gc

import pytest
import torch

import chainrule
from chainrule.backends import emulated_cuda, emulator_available

needs_emulator = pytest.mark.skipif(not emulator_available(),
                                    reason="chainrule was built without the CUDA emulator")

C = chainrule._C

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def make_set(sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "params": [torch.randn(n, generator=g).to(dtype) for n in sizes],
        "grads": [torch.randn(n, generator=g).to(dtype) for n in sizes],
        "exp_avgs": [torch.zeros(n) for n in sizes],
        "exp_avg_sqs": [torch.zeros(n) for n in sizes],
        "max_exp_avg_sqs": [],
        "state_steps": [torch.zeros(()) for _ in sizes],
        "master_params": [],
    }


def clone_set(s):
    return {k: [t.clone() for t in v] for k, v in s.items()}


def step(s, **options):
    torch.ops.chainrule.adam_(
        s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max_exp_avg_sqs"],
        s["state_steps"], s["master_params"], lr=options.get("lr", 1e-3), beta1=0.9, beta2=0.999,
        weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False,
        grad_scale=None, found_inf=None)


def assert_bitwise_equal(a, b):
    for key in a:
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), \
                f"{key}[{i}] differs"


class simulated_capture:
    """The emulated Adam launcher plans as if its stream were capturing a CUDA graph."""

    def __enter__(self):
        C._emu_set_simulated_capture(True)

    def __exit__(self, *exc):
        C._emu_set_simulated_capture(False)


# ---------------------------------------------------------------------------------------------
# Defect 1: the metadata cache.

@needs_emulator
def test_twenty_parameter_sets_upload_their_metadata_once():
    """20 (param group x dtype) sets stepped in turn: each set's metadata is uploaded once (a
    16-entry LRU uploaded all of them on every step) and its buffer stays where it was."""
    sets = [make_set([5, 17 + i], seed=i) for i in range(20)]
    reference = [clone_set(s) for s in sets]
    before = C._adam_plan_stats()["metadata_uploads"]
    buffers = {}
    for _ in range(3):
        for i, s in enumerate(sets):
            with emulated_cuda():
                step(s)
            launch, = C._adam_plan_launches(s["params"], s["grads"], s["exp_avgs"],
                                            s["exp_avg_sqs"], s["state_steps"], False)
            assert buffers.setdefault(i, launch["buffer"]) == launch["buffer"]
            step(reference[i])
    assert C._adam_plan_stats()["metadata_uploads"] - before == 20
    for s, r in zip(sets, reference):
        assert_bitwise_equal(s, r)


@needs_emulator
def test_entries_of_freed_tensors_are_dropped():
    gc.collect()
    kept = make_set([3, 4], seed=1)
    with emulated_cuda():
        step(kept)  # a miss drops whatever earlier tests left behind
    baseline = C._adam_plan_stats()["entries"]
    sets = [make_set([7, i + 1], seed=i) for i in range(5)]
    with emulated_cuda():
        for s in sets:
            step(s)
    assert C._adam_plan_stats()["entries"] == baseline + 5
    del sets, s
    gc.collect()
    with emulated_cuda():
        step(make_set([9], seed=99))  # the next miss sweeps the freed sets' entries
    assert C._adam_plan_stats()["entries"] == baseline + 1


# ---------------------------------------------------------------------------------------------
# Defect 2: nothing through host memory while capturing.

@needs_emulator
def test_new_gradients_under_capture_are_uploaded_by_kernel():
    """PyTorch's whole-network capture recipe zeroes grads with set_to_none=True before capture:
    the first captured step sees gradients at new addresses."""
    s = make_set([1, 33, 16385, 4097])
    reference = clone_set(s)
    with emulated_cuda():
        step(s)  # warm-up, outside capture: the metadata is cached
    step(reference)
    s["grads"] = [g.clone() * 0.5 for g in s["grads"]]
    reference["grads"] = [g.clone() for g in s["grads"]]
    before = C._adam_plan_stats()
    with emulated_cuda(), simulated_capture():
        step(s)
    after = C._adam_plan_stats()
    assert after["staged_uploads"] == before["staged_uploads"]
    assert after["gradient_uploads"] == before["gradient_uploads"] + 1
    assert after["kernel_uploads"] == before["kernel_uploads"] + 1
    step(reference)
    assert_bitwise_equal(s, reference)


@needs_emulator
def test_first_step_under_capture_uploads_every_byte_by_kernel():
    """A set first seen under capture: the whole metadata buffer (here over one 4 KiB kernel
    parameter block: 300 tensors) goes up in copy kernels."""
    s = make_set([1 + i % 37 for i in range(300)], seed=5)
    reference = clone_set(s)
    before = C._adam_plan_stats()
    with simulated_capture():
        launch, = C._adam_plan_launches(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"],
                                        s["state_steps"], True)
    assert launch["kernel_uploads"] >= 2
    del launch
    gc.collect()
    s = clone_set(reference)  # new tensors: the planned entry above is not reused
    with emulated_cuda(), simulated_capture():
        step(s)
    after = C._adam_plan_stats()
    assert after["staged_uploads"] == before["staged_uploads"]
    step(reference)
    assert_bitwise_equal(s, reference)


# ---------------------------------------------------------------------------------------------
# Defect 5: one completion counter per launch.

@needs_emulator
def test_each_launch_has_its_own_zeroed_counter():
    """Two launches of one parameter set (two streams at once, or a launch after one that failed
    with the counter part-way) must not share a counter."""
    s = make_set([100, 20000])
    args = (s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["state_steps"], False)
    first, = C._adam_plan_launches(*args)
    second, = C._adam_plan_launches(*args)
    assert first["buffer"] == second["buffer"]  # the cached metadata is shared...
    assert first["counter"] != second["counter"]  # ...the counter is not
    assert first["counter_value"] == second["counter_value"] == 0


# ---------------------------------------------------------------------------------------------
# Defect 4: grids within CUDA's limits.

@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("role", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize("m,n,k", [(2, 9_000_000, 16), (9_000_000, 3, 16), (4096, 256, 4096),
                                   (1, 1, 1)])
def test_linear_grids_fit_cuda_limits(dtype, role, m, n, k):
    if not hasattr(C, "_linear_plan_launches"):
        pytest.skip("chainrule was built without the CUDA emulator (the planner hooks live there)")
    launches = C._linear_plan_launches(dtype, role, m, n, k, False)
    assert launches
    for name, grid, block, smem in launches:
        assert all(1 <= g <= limit for g, limit in zip(grid, MAX_GRID)), (name, grid)
        assert smem <= 48 * 1024, (name, smem)  # none of today's kernels needs the opt-in


@needs_emulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flattened_tile_grid_covers_every_tile(dtype):
    """Several tiles in M and N, neither a multiple of the tile: every output element is right."""
    x = torch.randn(300, 40).to(dtype)
    w = torch.randn(260, 40).to(dtype)
    with emulated_cuda():
        y = chainrule.functional.linear(x, w, None, None)
    expected = (x.double() @ w.double().T)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance * 10)


# ---------------------------------------------------------------------------------------------
# Defect 3: a CPU lr tensor is read on the host.

def test_cpu_lr_tensor_is_not_copied_to_the_device(monkeypatch):
    """Params on another device (meta stands in for cuda): the op receives lr as a float, as
    torch's fused Adam does, rather than a per-step host-to-device copy."""
    seen = []

    def record(*args, lr, **kwargs):
        seen.append(lr)

    monkeypatch.setattr(chainrule.optim.ops, "adam_", record)
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    p.grad = torch.zeros(4, device="meta")
    opt = chainrule.optim.Adam([p], lr=torch.tensor(0.25))
    opt.step()
    assert seen == [0.25] and isinstance(seen[0], float)
