"""The op calls of an Adam step, kept from one step to the next.

Collecting chainrule.adam_'s argument lists is Python work per parameter: a state lookup, the
conversion of a state loaded from torch.optim.Adam, DTensor checks, list appends. At 1000
parameters of 1000 elements that came to about 8 microseconds per parameter, several times the
kernel's own time. A GroupPlan keeps, for one param group, what does not change between steps:
for each (device, master-weights) subset, the lists of params and states handed to the op, and
which of the group's params it takes. Each step reads the gradients afresh
(zero_grad(set_to_none=True) makes new ones) and checks with C-level passes over the lists (map,
compress: no Python frame per parameter) that what the plan was built from still holds:

  * the group's params are the same objects in the same order, with the same dtypes
    (Module.to changes a Parameter's dtype in place);
  * the same params have a gradient;
  * amsgrad and master_weights are unchanged (they decide which states exist);
  * the optimizer's state is the same dict, holding the same per-parameter dicts, holding the same
    objects (StateSnapshot): a state set, deleted or loaded is seen.

Anything else rebuilds the plan through the optimizer's full path, so the behaviour is the full
path's. Groups with DTensor parameters are not kept: their local tensors are taken at every step.
"""
from __future__ import annotations

from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Call", "GroupPlan", "StateSnapshot", "dense_contiguous", "gradient_mask"]

_DTYPE = attrgetter("dtype")
_IS_CONTIGUOUS = Tensor.is_contiguous


def gradient_mask(grads: list) -> tuple:
    """(True, False, ...): which entries of grads are not None."""
    return tuple(map(is_not, grads, repeat(None)))


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


class Call:
    """One chainrule.adam_ call: a (device, master-weights) subset of a param group."""

    __slots__ = ("device", "select", "params", "grads", "exp_avgs", "exp_avg_sqs",
                 "max_exp_avg_sqs", "state_steps", "master_params", "write_backs")

    def __init__(self, device: torch.device, group_size: int) -> None:
        self.device = device
        # which of the group's params this call takes; None once it is all of them
        self.select: Optional[list] = [False] * group_size
        self.params: list = []
        self.grads: list = []  # the building step's gradients; later steps pass their own
        self.exp_avgs: list = []
        self.exp_avg_sqs: list = []
        self.max_exp_avg_sqs: list = []
        self.state_steps: list = []
        self.master_params: list = []
        # (parameter, contiguous copy stepped in its place): strided parameter shards, written
        # back after the op; a call that has any is never kept (it is built each step)
        self.write_backs: list = []

    def finish(self) -> None:
        if all(self.select):
            self.select = None

    def gradients(self, grads: list) -> list:
        """This call's gradients out of the group's (grads[i] is params[i]'s .grad)."""
        return grads if self.select is None else list(compress(grads, self.select))


def dense_contiguous(grads: list) -> bool:
    """Whether every gradient can go to the op as it is. A sparse gradient answers False (or
    raises, for the compressed layouts), sending the step to the full path's checks."""
    try:
        return all(map(_IS_CONTIGUOUS, grads))
    except RuntimeError:
        return False


class GroupPlan:
    """The op calls of one param group, valid while holds() says so."""

    __slots__ = ("group", "params", "dtypes", "has_grad", "amsgrad", "master_weights", "calls",
                 "keep")

    def __init__(self, group: dict, params: list, has_grad: tuple, calls: list,
                 keep: bool) -> None:
        self.group = group
        self.params = list(params)  # a copy: the group's list can be edited in place
        self.dtypes = tuple(map(_DTYPE, params))
        self.has_grad = has_grad
        self.amsgrad = group["amsgrad"]
        self.master_weights = group["master_weights"]
        self.calls = calls
        self.keep = keep  # False: DTensor params, whose local tensors are taken at every step

    def holds(self, group: dict, params: list, has_grad: tuple) -> bool:
        return (self.group is group and has_grad == self.has_grad
                and _same_objects(params, self.params)
                and tuple(map(_DTYPE, params)) == self.dtypes
                and group["amsgrad"] == self.amsgrad
                and group["master_weights"] == self.master_weights)


class StateSnapshot:
    """Which per-parameter dicts an optimizer's state holds, and which objects they hold.

    The references are kept, so an object cannot be freed and another one take its place."""

    __slots__ = ("state", "dicts", "values")

    def __init__(self, state: dict) -> None:
        self.state = state
        self.dicts = list(state.values())
        self.values = self._values(self.dicts)

    @staticmethod
    def _values(dicts: list) -> Optional[list]:
        try:
            return list(chain.from_iterable(map(dict.values, dicts)))
        except TypeError:  # a per-parameter state that is not a dict: never trusted
            return None

    def holds(self, state: dict) -> bool:
        if state is not self.state or self.values is None:
            return False
        dicts = list(state.values())
        if not _same_objects(dicts, self.dicts):
            return False
        values = self._values(dicts)
        return values is not None and _same_objects(values, self.values)
