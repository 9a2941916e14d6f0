"""Drop-in Adam and AdamW with one fused multi-tensor kernel call per parameter group.

Per-parameter state uses torch.optim.Adam's keys (step, exp_avg, exp_avg_sq, max_exp_avg_sq), so
a state_dict saved from one loads into torch.optim.Adam/AdamW and back. Two differences in the
stored tensors, both converted on load in either direction as torch and chainrule do:
  * step is a float32 tensor on the parameter's device (torch's layout for fused/capturable Adam);
  * for bfloat16/float16 parameters the moments are float32, and with master_weights=True a
    float32 copy of the parameter is kept under the extra key "master_param" (torch ignores it).

The step never reads a device tensor on the host: lr may be a tensor, and GradScaler's grad_scale
and found_inf are consumed inside the kernel (a step with found_inf != 0 changes nothing, its step
count included). A step can be captured in a CUDA graph (capturable is accepted for torch's
signature and changes nothing); an lr tensor on the CPU is read on the host, as torch's fused
Adam does, so a captured graph keeps the value it had at capture: put lr on the device to change
it between replays.

The argument lists of each group's op calls are kept from one step to the next while the group's
params, their gradients' presence and the state are unchanged (chainrule/optim_plan.py): a step
re-reads only the gradients, so its host cost per parameter is a few C-level list passes.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from . import distributed, ops
from .optim_plan import Call, GroupPlan, StateSnapshot, dense_contiguous, gradient_mask

__all__ = ["Adam", "AdamW"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam's algorithm and options, one fused kernel call per parameter group.

    master_weights=True keeps a float32 copy of each bfloat16/float16 parameter, updated in
    float32 and rounded into the parameter after every step.
    """

    _decoupled_weight_decay = False

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, master_weights: bool = False) -> None:
        name = type(self).__name__
        # torch.optim.Adam's checks and wording, with the optimizer's name in front.
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"chainrule.optim.{name}: a tensor lr must have one element, "
                                 f"got shape {tuple(lr.shape)}")
        elif not 0.0 <= lr:
            raise ValueError(f"chainrule.optim.{name}: invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"chainrule.optim.{name}: invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"chainrule.optim.{name}: betas must be a pair (beta1, beta2), got "
                             f"{betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"chainrule.optim.{name}: invalid beta parameter at index "
                                 f"{index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"chainrule.optim.{name}: invalid weight_decay value: "
                             f"{weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=None, capturable=capturable,
                        differentiable=False, fused=True,
                        decoupled_weight_decay=self._decoupled_weight_decay,
                        master_weights=master_weights)
        self._drop_plans()
        super().__init__(params, defaults)
        # GradScaler hands over grad_scale / found_inf as attributes instead of unscaling grads.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._drop_plans()
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("decoupled_weight_decay", self._decoupled_weight_decay)
            group.setdefault("master_weights", False)

    def state_dict(self) -> dict:
        state = super().state_dict()
        # torch.optim.Adam's groups have no master_weights: without it (when off) the state dict,
        # and a torch.distributed.checkpoint of it, has exactly torch's keys and loads both ways.
        for group in state["param_groups"]:
            if not group.get("master_weights", False):
                group.pop("master_weights", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # A group saved without master_weights (by torch, or with it off) keeps this optimizer's.
        groups = [{"master_weights": group["master_weights"], **saved}
                  for group, saved in zip(self.param_groups, state_dict["param_groups"])]
        # Groups beyond ours stay in, so torch's own check reports a different group count.
        groups += state_dict["param_groups"][len(groups):]
        super().load_state_dict({**state_dict, "param_groups": groups})
        self._drop_plans()

    def _check_state(self, state: dict, p: Tensor, where: str) -> None:
        """A state loaded or set by hand must fit its parameter; the kernel would only name list
        positions, this names the state key and the parameter."""
        name = type(self).__name__
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
            value = state.get(key)
            if value is None:
                continue
            prefix = f"chainrule.optim.{name}: state[{key!r}] of {where}"
            if not isinstance(value, Tensor):
                raise TypeError(f"{prefix} must be a tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise RuntimeError(f"{prefix} must be a floating-point tensor, got {value.dtype}")
            if distributed.is_dtensor(value) != distributed.is_dtensor(p):
                continue  # a layout mismatch, which distributed.local_tensor reports
            if value.shape != p.shape:
                raise RuntimeError(f"{prefix} must have the parameter's shape {tuple(p.shape)}, "
                                   f"got {tuple(value.shape)} (a state dict of another model?)")
            if value.device != p.device:
                raise RuntimeError(f"{prefix} must be on the parameter's device {p.device}, got "
                                   f"{value.device}")
        step = state.get("step")
        if isinstance(step, Tensor) and step.numel() != 1:
            raise RuntimeError(f"chainrule.optim.{name}: state['step'] of {where} must be a number "
                               f"or a one-element tensor, got shape {tuple(step.shape)}")

    def _init_state(self, group: dict, p: Tensor, where: str = "a parameter") -> dict:
        state = self.state[p]
        self._check_state(state, p, where)
        dtype = _state_dtype(p)
        if len(state) == 0 or "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.contiguous_format)
        # Bring a state loaded from torch.optim.Adam (step on the CPU, moments in the param's
        # dtype) to the kernel's layout.
        step = state["step"]
        if not isinstance(step, Tensor):
            step = torch.tensor(float(step))
        if step.device != p.device or step.dtype != torch.float32:
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state and state[key].dtype != dtype:
                state[key] = state[key].to(dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                       memory_format=torch.contiguous_format)
        if group["master_weights"] and p.dtype in _LOW_PRECISION and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
        return state

    # ---- the step ------------------------------------------------------------------------------
    # Each group's op calls are kept in a GroupPlan (chainrule/optim_plan.py) while the params,
    # which of them have gradients, and the state they were built from stay the same; otherwise
    # _build_plan makes them again from the state, as every step did before plans were kept.

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._drop_plans()

    def _drop_plans(self) -> None:
        self._plans: dict[int, GroupPlan] = {}
        self._state_snapshot: Optional[StateSnapshot] = None

    def _dense_gradient(self, grad: Tensor, where: str) -> Tensor:
        if grad.layout != torch.strided:
            raise RuntimeError(
                f"chainrule.optim.{type(self).__name__} does not support sparse gradients "
                f"(consider torch.optim.SparseAdam), got a {grad.layout} grad for {where}")
        return grad if grad.is_contiguous() else grad.contiguous()

    def _build_plan(self, group: dict, group_index: int, params: list, grads: list,
                    has_grad: tuple) -> GroupPlan:
        name = type(self).__name__
        calls: dict[tuple, Call] = {}
        keep = True
        for index, (p, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            where = f"param {index} of param group {group_index}"
            if grad.layout != torch.strided:
                self._dense_gradient(grad, where)  # raises, before any state is created
            if torch.is_complex(p):
                raise RuntimeError(f"chainrule.optim.{name} does not support complex "
                                   f"parameters, got {p.dtype} for {where}")
            state = self._init_state(group, p, where)
            master = state.get("master_param") if group["master_weights"] else None
            key = (p.device, master is not None)
            call = calls.get(key)
            if call is None:
                call = calls[key] = Call(p.device, len(params))
            call.select[index] = True
            keep = keep and not distributed.is_dtensor(p)

            # DTensor parameters (FSDP2, tensor parallelism): the kernel steps the local shards.
            def local(tensor, argument, p=p):
                return distributed.local_tensor(f"chainrule.optim.{name}", p, tensor, argument)
            param = local(p, "param")
            if not param.is_contiguous() and distributed.is_dtensor(p):
                # A DTensor shard can be a strided view (torch 2.6 pads Shard(1) chunks): step a
                # contiguous copy and write it back after the op.
                stepped = param.contiguous()
                call.write_backs.append((param, stepped))
                keep = False
                param = stepped
            call.params.append(param)
            call.grads.append(self._dense_gradient(local(grad, "grad"), where))
            call.exp_avgs.append(local(state["exp_avg"], "state['exp_avg']"))
            call.exp_avg_sqs.append(local(state["exp_avg_sq"], "state['exp_avg_sq']"))
            if group["amsgrad"]:
                call.max_exp_avg_sqs.append(
                    local(state["max_exp_avg_sq"], "state['max_exp_avg_sq']"))
            call.state_steps.append(state["step"])
            if master is not None:
                call.master_params.append(local(master, "state['master_param']"))
        for call in calls.values():
            call.finish()
        return GroupPlan(group, params, has_grad, list(calls.values()), keep)

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plans = self._plans
        # Under torch.compile the step is traced as written, through the full path.
        keep_plans = not torch.compiler.is_compiling()
        if plans and not (keep_plans and self._state_snapshot is not None and
                          self._state_snapshot.holds(self.state)):
            plans.clear()
        rebuilt = False
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            has_grad = gradient_mask(grads)
            plan = plans.get(id(group))
            fresh = plan is None or not plan.holds(group, params, has_grad)
            if fresh:
                plan = self._build_plan(group, group_index, params, grads, has_grad)
                rebuilt = True
                if plan.keep and keep_plans:
                    plans[id(group)] = plan
                else:
                    plans.pop(id(group), None)
            beta1, beta2 = group["betas"]
            for call in plan.calls:
                if fresh:
                    call_grads, call.grads = call.grads, []  # kept plans hold no gradients
                else:
                    call_grads = call.gradients(grads)
                    if not dense_contiguous(call_grads):
                        call_grads = [self._dense_gradient(
                            g, f"param {_index_of(g, grads)} of param group {group_index}")
                            for g in call_grads]
                lr = distributed.local_scalar(group["lr"])
                if isinstance(lr, Tensor) and lr.device != call.device:
                    # A CPU lr is read on the host: a copy to the device each step would be a
                    # host synchronisation, and an error under CUDA graph capture.
                    lr = float(lr) if lr.device.type == "cpu" else lr.to(call.device)
                ops.adam_(
                    call.params, call_grads, call.exp_avgs, call.exp_avg_sqs,
                    call.max_exp_avg_sqs, call.state_steps, call.master_params,
                    lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    grad_scale=None if grad_scale is None else grad_scale.to(call.device),
                    found_inf=None if found_inf is None else found_inf.to(call.device))
                for param, stepped in call.write_backs:
                    param.copy_(stepped)
        if len(plans) > len(self.param_groups):  # param_groups replaced by other dicts
            current = {id(group) for group in self.param_groups}
            for key in [key for key in plans if key not in current]:
                del plans[key]
        if rebuilt and plans:
            self._state_snapshot = StateSnapshot(self.state)
        return loss


def _index_of(tensor: Tensor, tensors: list) -> int:
    return next(i for i, t in enumerate(tensors) if t is tensor)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default weight_decay=1e-2)."""

    _decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, master_weights=master_weights)
