"""What chainrule reports about its own build."""
import torch

import chainrule


def test_build_info():
    info = chainrule.build_info()
    assert set(info) >= {"version", "torch_version", "cuda_compiled", "cuda_architectures",
                         "cpu_simd", "cpu_gemm", "cpu_caches", "emulator_available"}
    assert info["version"] == chainrule.__version__
    assert info["torch_version"] == torch.__version__
    if info["cuda_compiled"]:
        assert info["cuda_architectures"] and all(a.startswith("sm_") for a in info["cuda_architectures"])
    else:
        assert info["cuda_architectures"] == []
    caches = info["cpu_caches"]
    assert set(caches) == {"l1d", "l2", "l3", "l2_shared_by", "l3_shared_by"}
    assert all(isinstance(v, int) and v >= 0 for v in caches.values())


def test_ops_are_registered_custom_ops():
    for name in ("linear_forward", "linear_backward", "linear_backward_accumulate", "adam_"):
        assert hasattr(torch.ops.chainrule, name)
    schema = str(torch.ops.chainrule.adam_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor(e!)[] state_steps" in schema
