"""chainrule.optim.Adam / AdamW against torch.optim.Adam / AdamW, on every backend."""
from __future__ import annotations

import copy

import pytest
import torch

import chainrule

TOLERANCES = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# name -> (optimizer kwargs, how many param groups, whether some grads are None at some steps)
CONFIGS = {
    "defaults": ({}, 1, False),
    "lr_1e-2": (dict(lr=1e-2), 1, False),
    "weight_decay": (dict(weight_decay=0.1), 1, False),
    "maximize": (dict(maximize=True), 1, False),
    "amsgrad": (dict(amsgrad=True), 1, False),
    "tensor_lr": (dict(lr="tensor"), 1, False),
    "grad_none_sometimes": ({}, 1, True),
    "two_param_groups": (dict(lr=1e-2), 2, False),
    "everything": (dict(lr=3e-3, weight_decay=0.05, amsgrad=True, maximize=True), 2, True),
}


def make_params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (11,), (1,), (4, 5, 2)]
    return [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_() for s in shapes]


def param_groups(params, n_groups, kwargs):
    if n_groups == 1:
        return [{"params": params}]
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": kwargs.get("lr", 1e-3) * 0.5,
                                        "betas": (0.8, 0.99)}]


def resolve_lr(kwargs, device, dtype):
    kwargs = dict(kwargs)
    if kwargs.get("lr") == "tensor":
        kwargs["lr"] = torch.tensor(2e-3, device=device, dtype=dtype)
    return kwargs


def set_grads(params, step, seed, none_sometimes):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p in enumerate(params):
        if none_sometimes and (step + i) % 3 == 0:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def run(optimizer_cls, params, groups_kwargs, steps, seed, none_sometimes, start=0, optimizer=None):
    opt = optimizer or optimizer_cls(**groups_kwargs)
    for step in range(start, start + steps):
        set_grads(params, step, seed, none_sometimes)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_matches_torch(backend, kind, config, dtype):
    kwargs, n_groups, none_sometimes = CONFIGS[config]
    kwargs = resolve_lr(kwargs, backend.device, dtype)
    ours_params = make_params(dtype, backend.device)
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours_cls = getattr(chainrule.optim, kind)
    torch_cls = getattr(torch.optim, kind)
    group_kwargs = {k: v for k, v in kwargs.items()}
    lr = group_kwargs.pop("lr", 1e-3)
    ours = ours_cls(param_groups(ours_params, n_groups, {"lr": lr if not torch.is_tensor(lr) else 1e-3}),
                    lr=lr, **group_kwargs)
    theirs = torch_cls(param_groups(torch_params, n_groups, {"lr": lr if not torch.is_tensor(lr) else 1e-3}),
                       lr=lr.clone() if torch.is_tensor(lr) else lr, foreach=False, **group_kwargs)
    for step in range(20):
        set_grads(ours_params, step, 1, none_sometimes)
        set_grads(torch_params, step, 1, none_sometimes)
        ours.step()
        theirs.step()
    for p_ours, p_theirs in zip(ours_params, torch_params):
        torch.testing.assert_close(p_ours, p_theirs, **TOLERANCES[dtype])
        s_ours, s_theirs = ours.state[p_ours], theirs.state[p_theirs]
        assert float(s_ours["step"]) == float(s_theirs["step"])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in s_ours) == (key in s_theirs)
            if key in s_ours:
                torch.testing.assert_close(s_ours[key], s_theirs[key], **TOLERANCES[dtype])


@pytest.mark.parametrize("direction", ["chainrule_to_torch", "torch_to_chainrule"])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_state_dict_round_trip(backend_one_order, kind, direction):
    """Train 5 steps with one optimizer, move its state_dict to the other, train 5 more: the
    result is what 10 steps of the first one give."""
    device = backend_one_order.device
    first_cls, second_cls = (getattr(chainrule.optim, kind), getattr(torch.optim, kind))
    if direction == "torch_to_chainrule":
        first_cls, second_cls = second_cls, first_cls
    kwargs = dict(lr=1e-2, weight_decay=0.02, amsgrad=True)
    params_a = make_params(torch.float64, device)
    params_b = [p.detach().clone().requires_grad_() for p in params_a]
    straight = first_cls(params_a, **kwargs)
    run(None, params_a, None, 10, 7, False, optimizer=straight)

    first = first_cls(params_b, **kwargs)
    run(None, params_b, None, 5, 7, False, optimizer=first)
    saved = copy.deepcopy(first.state_dict())
    second = second_cls(params_b, **kwargs)
    second.load_state_dict(saved)
    run(None, params_b, None, 5, 7, False, start=5, optimizer=second)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert set(second.state_dict()["state"][0]) >= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_grad_scaler_unscales_in_kernel_and_skips_inf(backend_one_order):
    device = backend_one_order.device
    params = make_params(torch.float32, device)
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    opt = chainrule.optim.AdamW(params, lr=1e-2)
    reference = torch.optim.AdamW(reference_params, lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=1000)
    for step in range(4):
        set_grads(reference_params, step, 3, False)
        set_grads(params, step, 3, False)
        # A loss whose gradient is the drawn grad, scaled the way a user's training loop does.
        wanted = [p.grad.clone() for p in params]
        if step == 2:
            wanted[1][0] = float("inf")  # this step must change nothing
        else:
            reference.step()
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, wanted))
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            for p, b in zip(params, before):
                assert torch.equal(p, b)
            assert float(opt.state[params[0]]["step"]) == 2
    for p, r in zip(params, reference_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_found_inf_changes_nothing(backend_one_order):
    device = backend_one_order.device
    params = make_params(torch.float32, device)
    opt = chainrule.optim.Adam(params, amsgrad=True)
    set_grads(params, 0, 0, False)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    set_grads(params, 1, 0, False)
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    del opt.found_inf
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(snapshot["state"][i][key])), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_keep_float32_states(backend_one_order, dtype):
    device = backend_one_order.device
    params = [torch.randn(33, dtype=dtype, device=device, requires_grad=True)]
    opt = chainrule.optim.Adam(params, lr=1e-2, master_weights=True)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert state["master_param"].dtype == torch.float32
    torch.testing.assert_close(params[0], state["master_param"].to(dtype), rtol=0, atol=0)


def test_defaults_match_torch():
    import inspect
    for kind in ("Adam", "AdamW"):
        ours = inspect.signature(getattr(chainrule.optim, kind)).parameters
        theirs = inspect.signature(getattr(torch.optim, kind)).parameters
        for name in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable"):
            assert ours[name].default == theirs[name].default, (kind, name)
