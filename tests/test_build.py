"""What chainrule reports about its own build."""
import torch

import chainrule


def test_build_info():
    info = chainrule.build_info()
    assert set(info) >= {"version", "torch_version", "cuda_compiled", "cuda_architectures",
                         "cpu_simd", "emulator_available"}
    assert info["version"] == chainrule.__version__
    assert info["torch_version"] == torch.__version__
    if info["cuda_compiled"]:
        assert info["cuda_architectures"] and all(a.startswith("sm_") for a in info["cuda_architectures"])
    else:
        assert info["cuda_architectures"] == []


def test_ops_are_registered_custom_ops():
    for name in ("linear_forward", "linear_backward", "linear_backward_accumulate", "adam_"):
        assert hasattr(torch.ops.chainrule, name)
    schema = str(torch.ops.chainrule.adam_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor(e!)[] state_steps" in schema
