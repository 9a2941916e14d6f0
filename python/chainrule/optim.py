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
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from . import distributed, ops

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
        super().__init__(params, defaults)
        # GradScaler hands over grad_scale / found_inf as attributes instead of unscaling grads.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
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

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        name = type(self).__name__
        for group_index, group in enumerate(self.param_groups):
            # One kernel call per (device, master-weights) subset of the group: a group may span
            # devices, as in torch; one call never does.
            calls: dict[tuple, dict[str, list]] = {}
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param {index} of param group {group_index}"
                if p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"chainrule.optim.{name} does not support sparse gradients (consider "
                        f"torch.optim.SparseAdam), got a {p.grad.layout} grad for {where}")
                if torch.is_complex(p):
                    raise RuntimeError(f"chainrule.optim.{name} does not support complex "
                                       f"parameters, got {p.dtype} for {where}")
                state = self._init_state(group, p, where)
                master = state.get("master_param") if group["master_weights"] else None
                key = (p.device, master is not None)
                lists = calls.setdefault(key, {k: [] for k in (
                    "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                    "state_steps", "master_params")})
                # DTensor parameters (FSDP2, tensor parallelism): the kernel steps the local shards.
                def local(tensor, argument, p=p):
                    return distributed.local_tensor(f"chainrule.optim.{name}", p, tensor, argument)
                lists["params"].append(local(p, "param"))
                grad = local(p.grad, "grad")
                lists["grads"].append(grad if grad.is_contiguous() else grad.contiguous())
                lists["exp_avgs"].append(local(state["exp_avg"], "state['exp_avg']"))
                lists["exp_avg_sqs"].append(local(state["exp_avg_sq"], "state['exp_avg_sq']"))
                if group["amsgrad"]:
                    lists["max_exp_avg_sqs"].append(
                        local(state["max_exp_avg_sq"], "state['max_exp_avg_sq']"))
                lists["state_steps"].append(state["step"])
                if master is not None:
                    lists["master_params"].append(local(master, "state['master_param']"))
            beta1, beta2 = group["betas"]
            for (device, _), lists in calls.items():
                lr = distributed.local_scalar(group["lr"])
                if isinstance(lr, Tensor) and lr.device != device:
                    # A CPU lr is read on the host: a copy to the device each step would be a
                    # host synchronisation, and an error under CUDA graph capture.
                    lr = float(lr) if lr.device.type == "cpu" else lr.to(device)
                ops.adam_(
                    lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                    lists["max_exp_avg_sqs"], lists["state_steps"], lists["master_params"],
                    lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    grad_scale=None if grad_scale is None else grad_scale.to(device),
                    found_inf=None if found_inf is None else found_inf.to(device))
        return loss


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default weight_decay=1e-2)."""

    _decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, master_weights=master_weights)
