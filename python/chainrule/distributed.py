"""chainrule under torch.distributed: DTensor parameters in the fused optimizers.

FSDP2 (torch.distributed.fsdp.fully_shard) and tensor parallelism hand the optimizer DTensor
parameters, gradients and states. The fused Adam kernel works on the local shards: one kernel call
over the local tensors of every parameter of a group, with no DTensor dispatch per element-wise
op (the cost torch's own foreach optimizers pay under FSDP2). The states are DTensors with the
parameter's mesh and placements, so torch.distributed.checkpoint saves, reshards and loads them as
it does torch.optim.Adam's; the step count stays a plain tensor, as in torch.

The linear layer needs nothing here: FSDP2 and DDP run the forward and backward on ordinary
(unsharded) tensors, and with accumulate_grad=True the gradient still goes through AccumulateGrad
and its hooks (see chainrule.functional).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["is_dtensor", "local_tensor"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _layout(tensor: Any) -> str:
    if is_dtensor(tensor):
        return f"a DTensor on {tensor.device_mesh} with placements {tuple(tensor.placements)}"
    return f"a {type(tensor).__name__}"


def local_tensor(op: str, param: Tensor, tensor: Tensor, argument: str) -> Tensor:
    """tensor's local shard when param is a DTensor (tensor must then be a DTensor with param's
    mesh and placements), tensor itself when neither is. Anything else is an error naming op,
    argument and both layouts."""
    param_is_dtensor, tensor_is_dtensor = is_dtensor(param), is_dtensor(tensor)
    if not param_is_dtensor and not tensor_is_dtensor:
        return tensor
    if param_is_dtensor and tensor_is_dtensor and tensor.device_mesh == param.device_mesh and \
            tuple(tensor.placements) == tuple(param.placements):
        return tensor.to_local()
    raise ValueError(
        f"{op}: {argument} must have its parameter's layout, {_layout(param)}; got "
        f"{_layout(tensor)}")


def local_scalar(tensor: Any) -> Any:
    """A tensor lr, grad_scale or found_inf given as a DTensor, as the plain tensor the kernel reads."""
    return tensor.to_local() if is_dtensor(tensor) else tensor
