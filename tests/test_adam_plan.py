"""Adam's kept op calls (chainrule/optim_plan.py): whatever changes between steps, a step with the
kept calls gives bitwise what the full path gives, and the calls are kept while nothing changes.

Each case trains a small model for six steps and changes one thing before the fourth. The same
run with the plans dropped before every step (the full path, as every step was before plans were
kept) is the reference.
"""
from __future__ import annotations

import copy

import pytest
import torch

import chainrule

EVENT_STEP = 3
STEPS = 6

# events that must make the step rebuild its calls (the plan object changes at EVENT_STEP)
REBUILDING_EVENTS = [
    "add_param_group",           # params added through the optimizer
    "params_list_edited",        # a param appended to a group's list in place
    "grad_none",                 # a param's grad becomes None
    "load_state_dict",           # a state saved earlier is loaded
    "load_torch_state_dict",     # a state saved by torch.optim.Adam (step on the CPU) is loaded
    "state_value_replaced",      # opt.state[p]["exp_avg"] = another tensor
    "state_dict_replaced",       # opt.state[p] = another dict
    "state_deleted",             # del opt.state[p]: the param starts over
    "dtype_float64",             # model.to(torch.float64): moments follow the param's dtype
    "dtype_bfloat16_master",     # model.to(torch.bfloat16) with master_weights=True: a master appears
    "amsgrad_turned_on",         # group["amsgrad"] = True: max_exp_avg_sq appears
    "param_groups_copied",       # opt.param_groups replaced by copies of its dicts
]
# events that keep the calls
KEEPING_EVENTS = [
    "noncontiguous_grad",        # the grads are made contiguous for this step only
    "lr_changed",                # group options other than amsgrad/master_weights are read per step
    "state_tensor_updated",      # opt.state[p]["exp_avg"].mul_(0.5): same tensor, new values
]


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p in params]


def run(event, device, keep_plans):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)).to(device)
    extra = torch.nn.Parameter(torch.randn(6, device=device))
    master_weights = event == "dtype_bfloat16_master"
    opt = chainrule.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01,
                               master_weights=master_weights)
    saved = None
    plans = []
    for step in range(STEPS):
        params = [p for group in opt.param_groups for p in group["params"]]
        first = params[0]
        if step == EVENT_STEP:
            if event == "add_param_group":
                opt.add_param_group({"params": [extra], "lr": 3e-2})
            elif event == "params_list_edited":
                opt.param_groups[0]["params"].append(extra)
            elif event in ("load_state_dict", "load_torch_state_dict"):
                opt.load_state_dict(copy.deepcopy(saved))
            elif event == "state_value_replaced":
                opt.state[first]["exp_avg"] = opt.state[first]["exp_avg"] * 0.5
            elif event == "state_dict_replaced":
                opt.state[first] = {key: value.clone() * 0.5 if key == "exp_avg" else value.clone()
                                    for key, value in opt.state[first].items()}
            elif event == "state_deleted":
                del opt.state[first]
            elif event == "dtype_float64":
                model.to(torch.float64)
            elif event == "dtype_bfloat16_master":
                model.to(torch.bfloat16)
            elif event == "amsgrad_turned_on":
                opt.param_groups[0]["amsgrad"] = True
            elif event == "param_groups_copied":
                opt.param_groups = [dict(group) for group in opt.param_groups]
            elif event == "lr_changed":
                opt.param_groups[0]["lr"] = 5e-2
            elif event == "state_tensor_updated":
                opt.state[first]["exp_avg"].mul_(0.5)
            params = [p for group in opt.param_groups for p in group["params"]]
        for p, grad in zip(params, grads_for(params, step)):
            p.grad = grad
        if step == EVENT_STEP and event == "grad_none":
            params[1].grad = None
        if step == EVENT_STEP and event == "noncontiguous_grad":
            weight = params[0]
            weight.grad = grads_for([weight.t()], step)[0].t()
            assert not weight.grad.is_contiguous()
        if not keep_plans:
            opt._drop_plans()
        opt.step()
        plans.append(opt._plans.get(id(opt.param_groups[0])))
        if step == 1:
            if event == "load_torch_state_dict":
                reference = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
                reference.load_state_dict(opt.state_dict())
                saved = reference.state_dict()
                assert saved["state"][0]["step"].device.type == "cpu"
            else:
                saved = opt.state_dict()
            saved = copy.deepcopy(saved)
    if keep_plans:
        assert set(opt._plans) == {id(group) for group in opt.param_groups}
    params = [p for group in opt.param_groups for p in group["params"]]
    states = [{key: value.clone() for key, value in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], states, plans


@pytest.mark.parametrize("event", REBUILDING_EVENTS + KEEPING_EVENTS)
def test_kept_calls_follow_changes(backend_one_order, event):
    device = backend_one_order.device
    params, states, plans = run(event, device, keep_plans=True)
    reference_params, reference_states, _ = run(event, device, keep_plans=False)
    assert len(params) == len(reference_params)
    for i, (p, q) in enumerate(zip(params, reference_params)):
        assert p.dtype == q.dtype and torch.equal(p, q), f"param {i}"
    for i, (state, reference) in enumerate(zip(states, reference_states)):
        assert set(state) == set(reference), f"state {i}: {set(state)} != {set(reference)}"
        for key in state:
            assert state[key].dtype == reference[key].dtype, f"state {i} {key}"
            assert state[key].device == reference[key].device, f"state {i} {key}"
            assert torch.equal(state[key], reference[key]), f"state {i} {key}"
    # the calls were kept on the quiet steps, and rebuilt (or not) where the event says
    assert all(plan is not None for plan in plans)
    assert plans[1] is plans[2], "a step with nothing changed rebuilt its calls"
    assert plans[EVENT_STEP + 1] is plans[EVENT_STEP + 2]
    if event in REBUILDING_EVENTS:
        assert plans[EVENT_STEP] is not plans[EVENT_STEP - 1], f"{event} kept stale calls"
    else:
        assert plans[EVENT_STEP] is plans[EVENT_STEP - 1], f"{event} rebuilt the calls"


def test_kept_calls_match_torch_across_changes(backend_one_order):
    """Params added, a grad None, a state loaded: the same steps as torch.optim.Adam."""
    device = backend_one_order.device
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((7, 3), (11,), (1,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    extra_ours = torch.nn.Parameter(torch.randn(5, device=device))
    extra_theirs = torch.nn.Parameter(extra_ours.detach().clone())
    opt = chainrule.optim.Adam(ours, lr=1e-2, amsgrad=True)
    reference = torch.optim.Adam(theirs, lr=1e-2, amsgrad=True, foreach=False)
    saved = None
    for step in range(8):
        if step == 2:
            opt.add_param_group({"params": [extra_ours], "lr": 2e-2})
            reference.add_param_group({"params": [extra_theirs], "lr": 2e-2})
            ours.append(extra_ours)
            theirs.append(extra_theirs)
        if step == 5:
            opt.load_state_dict(copy.deepcopy(saved[0]))
            reference.load_state_dict(copy.deepcopy(saved[1]))
        for a, b, grad in zip(ours, theirs, grads_for(ours, step)):
            a.grad, b.grad = grad, grad.clone()
        if step in (3, 6):
            ours[1].grad = theirs[1].grad = None
        opt.step()
        reference.step()
        if step == 3:
            saved = copy.deepcopy((opt.state_dict(), reference.state_dict()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], reference.state[b][key],
                                       rtol=1e-6, atol=1e-7)
        assert float(opt.state[a]["step"]) == float(reference.state[b]["step"])


def test_sparse_grad_after_kept_calls():
    p = torch.nn.Parameter(torch.randn(4))
    opt = chainrule.optim.Adam([p])
    for _ in range(2):
        p.grad = torch.randn(4)
        opt.step()
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match=r"chainrule.optim.Adam does not support sparse gradients"):
        opt.step()


def test_pickled_optimizer_starts_without_plans():
    import pickle
    p = torch.nn.Parameter(torch.randn(4))
    opt = chainrule.optim.AdamW([p])
    p.grad = torch.randn(4)
    opt.step()
    assert opt._plans
    copied = pickle.loads(pickle.dumps(opt))
    assert copied._plans == {} and copied._state_snapshot is None
    deep = copy.deepcopy(opt)
    assert deep._plans == {}
