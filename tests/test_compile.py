"""torch.compile(fullgraph=True) of a model built from chainrule.nn.Linear."""
from __future__ import annotations

import torch

import chainrule


def make_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        chainrule.nn.Linear(16, 32, activation="gelu"),
        chainrule.nn.Linear(32, 32, activation="silu"),
        chainrule.nn.Linear(32, 4),
    )


def test_compiled_mlp_matches_eager():
    torch._dynamo.reset()
    eager, compiled_model = make_mlp(0), make_mlp(0)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(8, 16)
    target = torch.randn(8, 4)
    for model in (eager, compiled):
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
    torch.testing.assert_close(compiled(x), eager(x))
    for p_eager, p_compiled in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad)


def test_compiled_accumulate_grad_falls_back_to_returned_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = chainrule.nn.Linear(6, 3, activation="relu", accumulate_grad=True)
    reference = torch.nn.Linear(6, 3)
    reference.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 6)
    compiled(x).sum().backward()
    torch.relu(reference(x)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
