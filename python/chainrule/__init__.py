"""chainrule: a fused linear layer and fused Adam/AdamW for PyTorch, with hand-written kernels.

Layers, each usable on its own:
    torch.ops.chainrule.*        the custom ops (chainrule.ops pairs each with its fake kernel)
    chainrule.LinearFunction     the torch.autograd.Function
    chainrule.functional.linear  the functional API
    chainrule.nn.Linear          a drop-in torch.nn.Linear
    chainrule.optim.Adam/AdamW   drop-in torch.optim.Adam / AdamW
    chainrule.backends           backend selection (emulated_cuda)
    chainrule.convert            an existing model's nn.Linear layers -> chainrule.nn.Linear
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers the ops)
from . import ops  # noqa: F401  (registers the fake kernels)
from . import backends, functional, nn, optim
from .functional import LinearFunction
from .convert import ConversionReport, convert  # noqa: E402  (the function shadows the module)

__version__ = _C.build_info()["version"]

ACTIVATIONS = functional.ACTIVATIONS


def build_info() -> dict:
    """How this chainrule was built: version, torch version, CUDA architectures, CPU SIMD level,
    whether the CUDA emulator backend is available."""
    return dict(_C.build_info())


__all__ = [
    "ACTIVATIONS",
    "ConversionReport",
    "LinearFunction",
    "backends",
    "build_info",
    "convert",
    "functional",
    "nn",
    "ops",
    "optim",
]
