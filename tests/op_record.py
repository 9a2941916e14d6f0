"""RecordOps: the ops that run inside a `with` block, as torch's dispatcher sees them (names like
"chainrule.linear_forward", "aten.addmm"), for tests that ask which ops a call ran."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def chainrule_ops(self) -> list[str]:
        return [op for op in self.ops if op.startswith("chainrule.")]
