"""chainrule ops called from several Python threads at once.

Four threads each run linear forward/backward (plain and accumulating) and Adam steps on their
own tensors, all at the same time (the ops release the GIL, so the kernels really overlap); each
thread's results must be bitwise those of the same work run alone, one thread after the other.
The last tests pin down the scope of chainrule.backends.emulated_cuda(): the switch is
process-wide, so another thread's ops follow it while one thread is inside the context manager
(docs/reliability.md).
"""
from __future__ import annotations

import threading

import pytest
import torch

import chainrule
from chainrule.functional import linear

THREADS = 4
ROUNDS = 3
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def _work(seed: int, device: str) -> dict[str, torch.Tensor]:
    """One thread's work: every activation forward and backward, an accumulating backward and
    Adam steps, on tensors drawn from its own seed. Returns every result tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for round_ in range(ROUNDS):
        for activation in ACTIVATIONS:
            x = torch.randn(67, 96, generator=g).to(device).requires_grad_()
            w = (torch.randn(80, 96, generator=g) / 10).to(device).requires_grad_()
            b = torch.randn(80, generator=g).to(device).requires_grad_()
            y = linear(x, w, b, activation)
            y.backward(torch.randn(67, 80, generator=g).to(device))
            key = f"{round_}.{activation}"
            out.update({f"{key}.y": y.detach(), f"{key}.dx": x.grad, f"{key}.dw": w.grad,
                        f"{key}.db": b.grad})
            # A second backward adds into .grad in the kernel (accumulate_grad).
            linear(x, w, b, activation, accumulate_grad=True).backward(
                torch.randn(67, 80, generator=g).to(device))
            out[f"{key}.dw_accumulated"] = w.grad
        params = [torch.randn(s, generator=g).to(device).requires_grad_()
                  for s in [(40, 9), (1000,), (3,)]]
        opt = chainrule.optim.AdamW(params, lr=1e-2, amsgrad=round_ % 2 == 1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        out.update({f"{round_}.adam{i}": p.detach() for i, p in enumerate(params)})
        out.update({f"{round_}.adam{i}.exp_avg_sq": opt.state[p]["exp_avg_sq"]
                    for i, p in enumerate(params)})
    return out


def _run_threads(target, count):
    """Runs target(index) on `count` threads released together; re-raises the first error."""
    start = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def body(index):
        try:
            start.wait()
            results[index] = target(index)
        except BaseException as error:  # noqa: BLE001  (handed to the main thread)
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a thread did not finish within 300 s"
    if errors:
        raise errors[0]
    return results


def test_concurrent_ops_match_sequential(backend):
    sequential = [_work(seed, backend.device) for seed in range(THREADS)]
    concurrent = _run_threads(lambda i: _work(i, backend.device), THREADS)
    for seed in range(THREADS):
        for name, want in sequential[seed].items():
            got = concurrent[seed][name]
            assert torch.equal(got.cpu().view(torch.uint8), want.cpu().view(torch.uint8)), (
                f"thread {seed}: {name} differs from the sequential run")


def test_concurrent_autograd_of_one_model(backend):
    """Four threads run forward and backward through the same chainrule.nn.Linear layers (shared
    weights, their own inputs) under torch.autograd.grad, as data-parallel threads would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(chainrule.nn.Linear(48, 64, activation="gelu"),
                                chainrule.nn.Linear(64, 8)).to(backend.device)
    inputs = [torch.randn(33, 48, generator=torch.Generator().manual_seed(i)).to(backend.device)
              for i in range(THREADS)]

    def grads(i):
        loss = model(inputs[i]).square().sum()
        return torch.autograd.grad(loss, list(model.parameters()))

    sequential = [grads(i) for i in range(THREADS)]
    concurrent = _run_threads(grads, THREADS)
    for i in range(THREADS):
        for want, got in zip(sequential[i], concurrent[i]):
            assert torch.equal(want, got), f"thread {i}: gradients differ from the sequential run"


# ---- the emulated_cuda switch is process-wide ------------------------------------------------------

pytestmark_emulator = pytest.mark.skipif(
    not chainrule.backends.emulator_available(),
    reason="chainrule was built without the CUDA emulator (no CUDA headers found)")


def _launches_of_one_op() -> int:
    before = chainrule.backends.emulated_launch_count()
    linear(torch.randn(4, 8), torch.randn(3, 8), None, "relu")
    return chainrule.backends.emulated_launch_count() - before


@pytestmark_emulator
def test_emulated_cuda_switch_is_seen_by_other_threads():
    """While one thread is inside emulated_cuda(), ops that any other thread runs on CPU tensors
    go to the emulator too; after it leaves, they go back to the CPU kernels."""
    entered, observed, leave = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def inside():
        with chainrule.backends.emulated_cuda():
            entered.set()
            assert leave.wait(60)

    def other():
        assert entered.wait(60)
        seen["backend_inside"] = chainrule.backends.host_backend()
        seen["launches_inside"] = _launches_of_one_op()
        observed.set()

    holder = threading.Thread(target=inside)
    watcher = threading.Thread(target=other)
    holder.start()
    watcher.start()
    assert observed.wait(60)
    leave.set()
    holder.join(60)
    watcher.join(60)
    assert seen == {"backend_inside": "emulated_cuda", "launches_inside": 1}, seen
    assert chainrule.backends.host_backend() == "cpu"
    assert _launches_of_one_op() == 0


@pytestmark_emulator
def test_emulated_cuda_switch_reaches_autograd_threads():
    """A backward that autograd runs on another thread (here: a thread of our own calling
    backward while the main thread holds the context) uses the emulator as well."""
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    with chainrule.backends.emulated_cuda():
        y = linear(x, w, None, "silu")
        before = chainrule.backends.emulated_launch_count()
        worker = threading.Thread(target=lambda: y.sum().backward())
        worker.start()
        worker.join(60)
        assert chainrule.backends.emulated_launch_count() > before
    ref = torch.nn.functional.silu(x.detach() @ w.detach().T)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)


@pytestmark_emulator
def test_emulated_cuda_overlapping_contexts_of_two_threads():
    """Contexts of two threads that overlap without nesting (A enters, B enters, A leaves,
    B leaves): the switch stays on the emulator while B is still inside and returns to the CPU
    kernels when B, the last one, leaves."""
    a_in, b_in, a_out, b_may_leave = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with chainrule.backends.emulated_cuda():
            a_in.set()
            assert b_in.wait(60)
        a_out.set()

    def thread_b():
        assert a_in.wait(60)
        with chainrule.backends.emulated_cuda():
            b_in.set()
            assert a_out.wait(60)
            seen["after_a_left"] = chainrule.backends.host_backend()
            assert b_may_leave.wait(60)
        seen["after_b_left"] = chainrule.backends.host_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    assert a_out.wait(60)
    b_may_leave.set()
    for t in threads:
        t.join(60)
    assert seen == {"after_a_left": "emulated_cuda", "after_b_left": "cpu"}, seen
