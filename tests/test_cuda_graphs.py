"""CUDA graphs, streams and launch limits on a real GPU (skipped without one).

What the emulator cannot run: stream capture, replays, two streams at once, the driver's grid
limits. The host-code halves of these checks run without a GPU in tests/test_cuda_host_code.py.
`make gpu-check` runs this file.
"""
from __future__ import annotations

import copy

import pytest
import torch

import chainrule

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    pytest.mark.skipif(not chainrule.build_info()["cuda_compiled"],
                       reason="chainrule was built without its CUDA kernels"),
]

TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def make_model(seed=0, width=96):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        chainrule.nn.Linear(64, width, activation="gelu"),
        chainrule.nn.Linear(width, width, activation="relu"),
        chainrule.nn.Linear(width, 10),
    ).cuda()


def batches(count, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(32, 64, device="cuda", generator=g),
             torch.randint(0, 10, (32,), device="cuda", generator=g)) for _ in range(count)]


def train_step(model, opt, x, target):
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    opt.step()
    return loss


def capture_training(model, opt, data, warmup=3):
    """PyTorch's whole-network capture recipe (CUDA semantics, "Whole-network capture"): warm up
    on a side stream, zero_grad(set_to_none=True), capture forward, backward and step."""
    static_x, static_target = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, target in data[:warmup]:
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(model, opt, static_x, static_target)

    def replay(x, target):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        return static_loss.clone()

    return replay


def eager_training(model, opt, data, warmup=3):
    for x, target in data[:warmup]:
        opt.zero_grad(set_to_none=True)
        train_step(model, opt, x, target)

    def run(x, target):
        # The captured backward saw grads of None: each replay writes them afresh.
        opt.zero_grad(set_to_none=True)
        return train_step(model, opt, x, target).detach()

    return run


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_whole_network_capture_recipe():
    data = batches(8)
    model = make_model()
    twin = copy.deepcopy(model)
    replay = capture_training(model, chainrule.optim.AdamW(model.parameters(), lr=1e-2), data)
    eager = eager_training(twin, chainrule.optim.AdamW(twin.parameters(), lr=1e-2), data)
    for x, target in data[3:]:
        torch.testing.assert_close(replay(x, target), eager(x, target), **TOLERANCE)
    torch.cuda.synchronize()
    assert_same_parameters(model, twin)


def test_twenty_param_groups_survive_other_optimizers():
    """20 param groups (20 metadata buffers) captured, then 40 more sets stepped eagerly between
    replays: no captured buffer is freed or rewritten (a 16-entry LRU would have evicted them)."""
    data = batches(6)

    def groups(model):
        return [{"params": [p], "lr": 1e-3 * (1 + i)} for i, p in enumerate(model.parameters())]

    model = torch.nn.Sequential(*[chainrule.nn.Linear(64, 64) for _ in range(10)]).cuda()
    twin = copy.deepcopy(model)
    assert len(groups(model)) == 20
    replay = capture_training(model, chainrule.optim.Adam(groups(model)), data)
    eager = eager_training(twin, chainrule.optim.Adam(groups(twin)), data)
    churn = [torch.nn.Parameter(torch.randn(100 + i, device="cuda")) for i in range(40)]
    churn_opt = chainrule.optim.Adam([{"params": [p]} for p in churn])
    for x, target in data[3:]:
        for p in churn:
            p.grad = torch.randn_like(p)
        churn_opt.step()
        torch.testing.assert_close(replay(x, target), eager(x, target), **TOLERANCE)
    torch.cuda.synchronize()
    assert_same_parameters(model, twin)


def test_cpu_lr_tensor_under_capture():
    """A CPU lr tensor: no host-to-device copy in the step, so capture succeeds; the graph keeps
    the value lr had at capture, as torch's fused Adam does."""
    data = batches(6)
    model = make_model(width=32)
    twin = copy.deepcopy(model)
    lr = torch.tensor(5e-3)
    replay = capture_training(model, chainrule.optim.Adam(model.parameters(), lr=lr), data)
    eager = eager_training(twin, chainrule.optim.Adam(twin.parameters(), lr=5e-3), data)
    for x, target in data[3:]:
        torch.testing.assert_close(replay(x, target), eager(x, target), **TOLERANCE)
    torch.cuda.synchronize()
    assert_same_parameters(model, twin)


def test_two_streams_step_at_once():
    """Two optimizers stepping concurrently on two streams (each launch has its own completion
    counter) give what sequential steps give; the metadata planned on one stream is used on
    another (the allocator is told)."""
    def make(seed):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1, 4097, 300_000)]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    a, b = make(1), make(2)
    ref_a, ref_b = copy.deepcopy(a), copy.deepcopy(b)
    for p, q in zip(a + b, ref_a + ref_b):
        q.grad = p.grad.clone()
    opt_a, opt_b = chainrule.optim.Adam(a), chainrule.optim.Adam(b)
    ref_opt_a, ref_opt_b = chainrule.optim.Adam(ref_a), chainrule.optim.Adam(ref_b)
    for _ in range(5):
        ref_opt_a.step()
        ref_opt_b.step()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(5):
        with torch.cuda.stream(streams[0]):
            opt_a.step()
        with torch.cuda.stream(streams[1]):
            opt_b.step()
    torch.cuda.synchronize()
    for p, q in zip(a + b, ref_a + ref_b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for opt in (opt_a, opt_b):
        assert all(float(st["step"]) == 5 for st in opt.state.values())


@pytest.mark.parametrize("dtype,n", [(torch.bfloat16, 8_500_000), (torch.float64, 4_300_000)],
                         ids=["bf16", "fp64"])
def test_wide_output_launches(dtype, n):
    """N beyond 65535 tiles of gridDim.y (8.4M for 128-wide tiles, 4.2M for fp64's 64)."""
    x = torch.randn(2, 16, device="cuda", dtype=dtype)
    w = torch.randn(n, 16, device="cuda", dtype=dtype)
    y = chainrule.functional.linear(x, w, None, None)
    expected = (x.double() @ w.double().T)
    tolerance = 1e-9 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance * 16)
