"""chainrule.convert: an existing model uses chainrule's fused linear layer, in place.

    model = chainrule.convert(model)            # every torch.nn.Linear -> chainrule.nn.Linear
    opt = chainrule.optim.AdamW(model.parameters())

What it does:
  * every module whose type is exactly torch.nn.Linear becomes a chainrule.nn.Linear holding the
    same Parameter objects (an optimizer built before still steps them; state_dict keys, values,
    hooks and attributes carried over);
  * an activation applied right after a Linear, as that Linear's only user, is fused into it
    (activation="relu" | "gelu" | "gelu_tanh" | "silu") and the activation module is replaced by
    torch.nn.Identity, so the model's own forward code runs unchanged. Patterns are found in
    nn.Sequential (adjacent children) and, for any other module that holds a Linear, by tracing
    that module's forward with torch.fx (in train and in eval mode; a fusion is made only when
    both traces show it). Modules that do not trace keep the plain swap;
  * modules it must not touch are left alone and named in the report: parametrized Linears,
    subclasses of nn.Linear (quantization-aware, LoRA, NonDynamicallyQuantizableLinear, ...),
    Linears with forward hooks that fusing would bypass, and layers that compute a linear map
    with another weight layout (transformers' Conv1D, W stored (in, out)).

Activations recognised: torch.nn.ReLU, GELU (approximate "none" and "tanh"), SiLU, and the
activation modules of transformers (GELUActivation, NewGELUActivation, GELUTanh /
PytorchGELUTanh, SiLUActivation), each checked numerically against chainrule's formula before it
is fused. An activation called as a function inside forward (F.gelu(self.fc(x))) is reported,
not fused: fusing it would mean replacing the module's forward with the traced graph, which
freezes its control flow and drops its class.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as chainrule_nn
from .functional import _native_activation

__all__ = ["convert", "ConversionReport"]

logger = logging.getLogger("chainrule.convert")

NameFilter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class ConversionReport:
    """What chainrule.convert did. Names are qualified module names ("" is the root)."""

    swapped: list = dataclasses.field(default_factory=list)    # Linear names now chainrule's
    fused: list = dataclasses.field(default_factory=list)      # (linear, activation, act module)
    left: list = dataclasses.field(default_factory=list)       # (name, reason) not converted
    not_fused: list = dataclasses.field(default_factory=list)  # (name, reason) swapped, not fused
    traced: list = dataclasses.field(default_factory=list)     # modules analysed with torch.fx
    untraced: list = dataclasses.field(default_factory=list)   # (module, reason) fx failed

    def summary(self) -> str:
        lines = [f"chainrule.convert: {len(self.swapped)} Linear layer(s) swapped, "
                 f"{len(self.fused)} activation(s) fused, {len(self.left)} module(s) left"]
        by_activation: dict[str, int] = {}
        for _, activation, _ in self.fused:
            by_activation[activation] = by_activation.get(activation, 0) + 1
        if by_activation:
            lines.append("  fused: " + ", ".join(f"{n} x {a}" for a, n in by_activation.items()))
        for name, reason in self.left:
            lines.append(f"  left {name or '<root>'}: {reason}")
        for name, reason in self.not_fused:
            lines.append(f"  not fused {name}: {reason}")
        if self.untraced:
            lines.append(f"  {len(self.untraced)} module(s) did not trace with torch.fx (plain "
                         f"swap): " + ", ".join(f"{n} ({r})" for n, r in self.untraced[:4])
                         + (" ..." if len(self.untraced) > 4 else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---- activations --------------------------------------------------------------------------------

_TRANSFORMERS_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
                             "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                             "SiLUActivation": "silu"}
_FUNCTIONAL_ACTIVATIONS = {F.relu, torch.relu, F.gelu, F.silu, torch.nn.functional.silu}


def activation_of(module: nn.Module) -> Optional[str]:
    """chainrule's name for the activation this module computes, or None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    name = _TRANSFORMERS_ACTIVATIONS.get(kind.__name__)
    if name is None or not kind.__module__.startswith("transformers."):
        return None
    # A version of transformers may spell the class differently: check the numbers.
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    x = torch.linspace(-8.0, 8.0, 257)
    try:
        with torch.no_grad():
            same = torch.allclose(module(x), _native_activation(x, name), rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001  (any failure means: not this activation)
        return None
    return name if same else None


def _functional_activation(node: torch.fx.Node) -> Optional[str]:
    """The name of a functional activation call in a traced graph (only for the report)."""
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return f"Tensor.{node.target}"
    return None


# ---- what is converted --------------------------------------------------------------------------

def _why_left(module: nn.Module) -> Optional[str]:
    """None for a plain nn.Linear that can be swapped, else the reason it is left alone."""
    kind = type(module)
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "parametrized (torch.nn.utils.parametrize): its weight is computed, not stored"
    if kind is not nn.Linear:
        if kind.forward is not nn.Linear.forward:
            return f"subclass of nn.Linear with its own forward ({kind.__module__}.{kind.__qualname__})"
        return (f"subclass of nn.Linear ({kind.__module__}.{kind.__qualname__}); its class may "
                f"carry behaviour or be read directly by its parent")
    return None


def _left_reason_for_non_linear(module: nn.Module) -> Optional[str]:
    """Linear-like modules that are not nn.Linear and are reported as left."""
    kind = type(module)
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers."):
        return ("transformers Conv1D computes x @ W + b with W stored (in, out); chainrule's "
                "layer needs (out, in): converting would change the state_dict or transpose W "
                "on every step")
    module_path = kind.__module__
    if ("quantized" in module_path or module_path.startswith("torch.ao.nn")) and \
            "Linear" in kind.__name__:
        return f"quantized linear layer ({module_path}.{kind.__qualname__})"
    return None


def _matcher(spec: NameFilter, argument: str) -> Optional[Callable[[str, nn.Module], bool]]:
    if spec is None:
        return None
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"chainrule.convert: {argument} must be a glob pattern, a list of "
                            f"them or a callable(name, module), got an item {p!r}")
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _swapped(linear: nn.Linear, accumulate_grad: bool) -> chainrule_nn.Linear:
    """A chainrule.nn.Linear that is `linear` in every respect but its class: the same Parameter
    objects, buffers, hooks and attributes (the containers copied, not shared)."""
    new = chainrule_nn.Linear.__new__(chainrule_nn.Linear)
    state = dict(linear.__dict__)
    for key, value in state.items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules, the hook dicts
            state[key] = value.copy()
    new.__dict__.update(state)
    new.activation = None
    new.accumulate_grad = accumulate_grad
    return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = module


# ---- torch.fx -----------------------------------------------------------------------------------

class _Tracer(torch.fx.Tracer):
    """Keeps Linear layers and recognised activation modules as leaves. `activations` maps
    id(module) to activation_of(module), computed before tracing (activation_of runs the module,
    which must not happen inside a trace)."""

    def __init__(self, activations: dict):
        super().__init__()
        self.activations = activations

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Linear) or self.activations.get(id(m)) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, training: bool, activations: dict) -> torch.fx.Graph:
    was_training = module.training
    module.train(training)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer(activations).trace(module)
    finally:
        module.train(was_training)


def _fusions_in_graph(module: nn.Module, graph: torch.fx.Graph, activations: dict):
    """(linear name, activation name, activation module name) for each Linear whose only user is
    a recognised activation module taking only its output; and (linear name, reason) for the
    Linears that feed an activation that cannot be fused."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fusions, refusals = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target),
                                                      nn.Linear):
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        user = users[0]
        functional = _functional_activation(user)
        if functional is not None:
            refusals.append((node.target, f"its activation is the function {functional} called "
                                          f"in forward (only activation modules are fused)"))
            continue
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        activation = activations.get(id(module.get_submodule(user.target)))
        if activation is None:
            continue
        if calls[node.target] != 1 or calls[user.target] != 1:
            refusals.append((node.target, "the Linear or its activation is called more than once "
                                          "in forward"))
            continue
        fusions.append((node.target, activation, user.target))
    return fusions, refusals


def _sequential_fusions(seq: nn.Sequential, activations: dict):
    fusions = []
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        a, b = seq._modules[first], seq._modules[second]
        if isinstance(a, nn.Linear) and b is not None:
            activation = activations.get(id(b))
            if activation is not None:
                fusions.append((first, activation, second))
    return fusions


# ---- the pass -----------------------------------------------------------------------------------

def convert(module: nn.Module, *, fuse_activations: bool = True, accumulate_grad: bool = False,
            include: NameFilter = None, exclude: NameFilter = None,
            return_report: bool = False):
    """Makes `module` use chainrule.nn.Linear, in place; returns the module (and, with
    return_report=True, a ConversionReport as well). The report is also logged on the
    "chainrule.convert" logger at INFO level.

    fuse_activations: fuse an activation applied right after a Linear into it.
    accumulate_grad: the swapped layers' accumulate_grad (see chainrule.functional; not with DDP).
    include / exclude: which Linear layers to consider, by qualified name: a glob pattern
        ("encoder.*"), a list of patterns, or a callable(name, module) -> bool.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"chainrule.convert: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    included = _matcher(include, "include")
    excluded = _matcher(exclude, "exclude")
    report = ConversionReport()

    # Each module object once (shared submodules appear under several names: the first is used
    # in the report, and every place that holds it gets the same replacement).
    places: dict[int, list[str]] = {}
    objects: dict[int, nn.Module] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        places.setdefault(id(sub), []).append(name)
        objects[id(sub)] = sub

    to_swap: dict[int, str] = {}
    left_alone: list[str] = []  # a module left alone is left whole: its insides are not reported
    for key, names in places.items():
        sub, name = objects[key], names[0]
        if any(name.startswith(f"{outer}.") for outer in left_alone):
            continue
        if not isinstance(sub, nn.Linear):
            reason = _left_reason_for_non_linear(sub)
            if reason is not None:
                report.left.append((name, reason))
                left_alone.append(name)
            continue
        if isinstance(sub, chainrule_nn.Linear):
            continue
        if included is not None and not included(name, sub):
            continue
        if excluded is not None and excluded(name, sub):
            report.left.append((name, "excluded"))
            continue
        reason = _why_left(sub)
        if reason is not None:
            report.left.append((name, reason))
            continue
        to_swap[key] = name

    # Find the fusions before anything changes (the traces see the original modules).
    fusions: dict[int, tuple[str, int]] = {}  # linear id -> (activation, activation module id)
    if fuse_activations:
        activations = {key: activation_of(sub) for key, sub in objects.items()}
        parents = {}
        for name, sub in module.named_modules():
            if any(id(child) in to_swap or isinstance(child, chainrule_nn.Linear)
                   for child in sub.children()):
                parents[name] = sub
        for name, parent in parents.items():
            prefix = f"{name}." if name else ""
            if type(parent) is nn.Sequential:
                found, refusals = _sequential_fusions(parent, activations), []
            else:
                try:
                    found_by_mode = []
                    for training in (True, False):
                        graph = _trace(parent, training, activations)
                        found_by_mode.append(_fusions_in_graph(parent, graph, activations))
                except Exception as error:  # noqa: BLE001  (fx raises many kinds)
                    report.untraced.append((name or "<root>", f"{type(parent).__name__}: "
                                            f"{type(error).__name__}"))
                    continue
                report.traced.append(name or "<root>")
                found = [f for f in found_by_mode[0][0] if f in found_by_mode[1][0]]
                refusals = found_by_mode[0][1]
                for (mode, other), (fusable, _) in zip((("train", "eval"), ("eval", "train")),
                                                       found_by_mode):
                    for f in fusable:
                        if f not in found:
                            refusals.append((f[0], f"fusable in {mode} mode only (its forward "
                                                   f"depends on self.training)"))
            for linear_name, activation, act_name in found:
                linear = parent.get_submodule(linear_name)
                act = parent.get_submodule(act_name)
                full = prefix + linear_name
                if not (id(linear) in to_swap or (isinstance(linear, chainrule_nn.Linear)
                                                  and linear.activation is None)):
                    continue
                if len(places[id(linear)]) != 1 or len(places[id(act)]) != 1:
                    report.not_fused.append((full, "the Linear or its activation module is "
                                                   "shared by several parents"))
                    continue
                if linear._forward_hooks or linear._forward_pre_hooks:
                    report.not_fused.append((full, "it has forward hooks, which would see the "
                                                   "activated output"))
                    continue
                fusions[id(linear)] = (activation, id(act))
            for linear_name, reason in refusals:
                report.not_fused.append((prefix + linear_name, reason))

    replacements: dict[int, nn.Module] = {}
    for key, name in to_swap.items():
        replacements[key] = _swapped(objects[key], accumulate_grad)
        report.swapped.append(name)
    for key, (activation, act_key) in fusions.items():
        linear = replacements.get(key, objects[key])
        linear.activation = activation
        replacements[act_key] = nn.Identity()
        report.fused.append((places[key][0], activation, places[act_key][0]))
    for key, new in replacements.items():
        for name in places[key]:
            if name == "":
                module = new
            else:
                _set_submodule(module, name, new)

    logger.info("%s", report.summary())
    return (module, report) if return_report else module

