"""chainrule.convert: an existing model's nn.Linear layers become chainrule.nn.Linear, the
activation after each fused where the model allows, computing the same function."""
from __future__ import annotations

import copy
import logging
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chainrule

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs, never downloaded

ACTIVATIONS = {  # module -> chainrule's name
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def mlp(activation: str, device="cpu") -> nn.Sequential:
    make = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(20, 48), make(), nn.Dropout(0.0), nn.Linear(48, 33), make(),
                         nn.Linear(33, 5)).to(device)


# ---- nn.Sequential ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_sequential_mlp_of_every_activation(activation, backend_one_order):
    device = backend_one_order.device
    original = mlp(activation, device)
    model = copy.deepcopy(original)
    parameters = list(model.parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before: must still step them

    model, report = chainrule.convert(model, return_report=True)

    assert [type(m) for m in model] == [chainrule.nn.Linear, nn.Identity, nn.Dropout,
                                        chainrule.nn.Linear, nn.Identity, chainrule.nn.Linear]
    assert [model[0].activation, model[3].activation, model[5].activation] == \
        [activation, activation, None]
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert list(model.state_dict()) == keys
    assert report.swapped == ["0", "3", "5"]
    assert report.fused == [("0", activation, "1"), ("3", activation, "4")]
    assert report.left == []

    x = torch.randn(7, 3, 20, device=device)
    expected, actual = original(x), model(x)
    assert relative_error(actual, expected) <= 1e-6
    expected.square().sum().backward()
    actual.square().sum().backward()
    for p, q in zip(model.parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_no_fusion_when_asked():
    model = chainrule.convert(mlp("gelu"), fuse_activations=False)
    assert isinstance(model[1], nn.GELU)
    assert all(m.activation is None for m in model if isinstance(m, chainrule.nn.Linear))


def test_accumulate_grad_reaches_the_layers():
    original = mlp("relu")
    model = chainrule.convert(copy.deepcopy(original), accumulate_grad=True)
    assert all(m.accumulate_grad for m in model if isinstance(m, chainrule.nn.Linear))
    x = torch.randn(4, 20)
    original(x).sum().backward()
    model(x).sum().backward()
    for p, q in zip(model.parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


# ---- traced modules -----------------------------------------------------------------------------

class GatedMLP(nn.Module):
    """LlamaMLP's shape: down(act(gate(x)) * up(x))."""

    def __init__(self, act=None):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
        self.act = act or nn.SiLU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Branchy(nn.Module):
    """Does not trace: control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)

    def forward(self, x):
        h = self.act(self.fc(x))
        if h.sum() > 0:
            h = h * 2
        return self.out(h)


class FunctionalGELU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.gelu(self.fc(x))


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        z = self.fc(x)
        return self.act(z) + z  # the pre-activation is needed: no fusion


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.noise = nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5)

    def forward(self, x):
        z = self.fc(x)
        if self.training:
            z = self.noise(z)
        return self.act(z)


def check_same_function(original, model, *shape, rtol=1e-6):
    x = torch.randn(*shape)
    original.eval(), model.eval()
    with torch.no_grad():
        assert relative_error(model(x), original(x)) <= rtol


def test_gated_mlp_fuses_silu_into_gate():
    original = GatedMLP()
    model, report = chainrule.convert(copy.deepcopy(original), return_report=True)
    assert model.gate.activation == "silu" and model.up.activation is None
    assert isinstance(model.act, nn.Identity)
    assert report.fused == [("gate", "silu", "act")]
    assert report.traced == ["<root>"]
    check_same_function(original, model, 5, 16)


def test_module_that_does_not_trace_keeps_the_plain_swap():
    original = Branchy()
    model, report = chainrule.convert(copy.deepcopy(original), return_report=True)
    assert isinstance(model.fc, chainrule.nn.Linear) and model.fc.activation is None
    assert isinstance(model.act, nn.GELU)
    assert report.untraced and report.untraced[0][0] == "<root>"
    assert "did not trace" in report.summary()
    check_same_function(original, model, 3, 8)


@pytest.mark.parametrize("module, reason", [
    (FunctionalGELU(), "function gelu"),
    (TwoUsers(), None),
    (ModeDependent(), "eval mode only"),
])
def test_patterns_that_must_not_fuse(module, reason):
    original = module
    model, report = chainrule.convert(copy.deepcopy(original), return_report=True)
    assert isinstance(model.fc, chainrule.nn.Linear) and model.fc.activation is None
    assert report.fused == []
    if reason is not None:
        assert any(name == "fc" and reason in why for name, why in report.not_fused), report
    check_same_function(original, model, 3, 8)
    model.train(), original.train()
    torch.manual_seed(1)
    a = original(torch.ones(2, 8))
    torch.manual_seed(1)
    b = model(torch.ones(2, 8))
    torch.testing.assert_close(b, a)


def test_shared_activation_module_is_not_fused():
    act = nn.GELU()
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 4), act),
                           "b": nn.Sequential(nn.Linear(4, 4), act)})
    model, report = chainrule.convert(model, return_report=True)
    assert report.fused == [] and len(report.not_fused) == 2
    assert model["a"][1] is act


def test_shared_linear_is_swapped_once_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Sequential(shared))
    model, report = chainrule.convert(model, return_report=True)
    assert report.swapped == ["0"]
    assert model[0] is model[1][0] and isinstance(model[0], chainrule.nn.Linear)


def test_linear_at_the_root():
    layer = nn.Linear(3, 2)
    converted = chainrule.convert(layer)
    assert isinstance(converted, chainrule.nn.Linear) and converted.weight is layer.weight


# ---- what is left alone -------------------------------------------------------------------------

class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_modules_it_must_not_touch_are_left_and_named():
    model = nn.Sequential(nn.Linear(8, 8), OwnForward(8, 8), nn.Linear(8, 8), nn.ReLU(),
                          nn.MultiheadAttention(8, 2, batch_first=True))
    torch.nn.utils.parametrize.register_parametrization(
        model[2], "weight", type("Double", (nn.Module,), {"forward": lambda self, w: 2 * w})())
    original = copy.deepcopy(model)
    model, report = chainrule.convert(model, return_report=True)
    left = dict(report.left)
    assert report.swapped == ["0"]
    assert type(model[1]) is OwnForward and "own forward" in left["1"]
    assert "parametrized" in left["2"] and isinstance(model[3], nn.ReLU)
    assert "NonDynamicallyQuantizableLinear" in left["4.out_proj"]
    for name in ("1", "2", "4.out_proj"):
        assert f"left {name}" in report.summary()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(model[:4](x), original[:4](x))


def test_quantized_linear_is_left_whole_and_named():
    import torch.ao.nn.qat as qat
    import torch.ao.nn.quantized.dynamic as quantized_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notes for torch.ao
        qat_linear = qat.Linear(8, 8, qconfig=torch.ao.quantization.get_default_qat_qconfig())
        model = nn.Sequential(quantized_dynamic.Linear(8, 8), nn.ReLU(), qat_linear, nn.ReLU(),
                              nn.Linear(8, 8))
    model, report = chainrule.convert(model, return_report=True)
    left = dict(report.left)
    assert sorted(left) == ["0", "2"], report  # the quantized layer's packed params are its own
    assert "quantized linear layer" in left["0"] and "own forward" in left["2"]
    assert report.swapped == ["4"] and report.fused == []


def test_forward_hooks_block_fusion():
    model = mlp("relu")
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    model, report = chainrule.convert(model, return_report=True)
    assert model[0].activation is None and model[3].activation == "relu"
    assert any("hooks" in why for _, why in report.not_fused)
    model(torch.randn(2, 20))
    assert len(seen) == 1  # the hook came along with the swapped layer


def test_include_and_exclude():
    model, report = chainrule.convert(mlp("relu"), exclude="5", return_report=True)
    assert type(model[5]) is nn.Linear and ("5", "excluded") in report.left
    model = chainrule.convert(mlp("relu"), include=["0", "3"], exclude=lambda n, m: n == "3")
    assert [type(model[i]) for i in (0, 3, 5)] == [chainrule.nn.Linear, nn.Linear, nn.Linear]
    with pytest.raises(TypeError, match="chainrule.convert: include"):
        chainrule.convert(mlp("relu"), include=[3])
    with pytest.raises(TypeError, match="chainrule.convert: module must be a torch.nn.Module"):
        chainrule.convert("model")


def test_report_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="chainrule.convert"):
        chainrule.convert(mlp("silu"))
    assert "3 Linear layer(s) swapped, 2 activation(s) fused" in caplog.text


# ---- the converted model in torch's machinery ---------------------------------------------------

def test_dropout_keeps_the_order_of_random_numbers():
    original = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 16),
                             nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 4))
    model = chainrule.convert(copy.deepcopy(original))
    assert model[3].activation == "gelu"
    x = torch.randn(6, 8)
    torch.manual_seed(5)
    expected = original(x)
    torch.manual_seed(5)
    actual = model(x)
    assert relative_error(actual, expected) <= 1e-6


def test_to_deepcopy_and_pickle():
    original = GatedMLP()
    model = chainrule.convert(copy.deepcopy(original))
    x = torch.randn(4, 16, dtype=torch.float64)
    expected = original.to(torch.float64)(x)
    model.to(torch.float64)
    assert model.gate.weight.dtype == torch.float64
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.gate.activation == "silu"
        torch.testing.assert_close(clone(x), expected)


def test_torch_compile():
    torch._dynamo.reset()
    original = GatedMLP()
    model = chainrule.convert(copy.deepcopy(original))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), original(x), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    original(x).sum().backward()
    torch.testing.assert_close(model.gate.weight.grad, original.gate.weight.grad,
                               rtol=1e-5, atol=1e-6)


def test_autocast():
    original = mlp("gelu")
    model = chainrule.convert(copy.deepcopy(original))
    x = torch.randn(8, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = original(x), model(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---- transformers models ------------------------------------------------------------------------

def small_bert():
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config), config.vocab_size


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config), config.vocab_size


def small_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config), config.vocab_size


def loss_of(model, ids, labels):
    if labels.dim() == 1:  # sequence classification
        return model(input_ids=ids, labels=labels).loss
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("build, layers, expected_fused", [
    (small_bert, 2, {"gelu"}),
    (small_llama, 2, {"silu"}),
])
def test_transformers_model(build, layers, expected_fused):
    torch.manual_seed(0)
    original, vocab = build()
    model = copy.deepcopy(original)
    keys = list(model.state_dict())
    model, report = chainrule.convert(model, return_report=True)

    linears = [n for n, m in original.named_modules() if type(m) is nn.Linear]
    assert sorted(report.swapped) == sorted(linears)
    assert all(isinstance(model.get_submodule(n), chainrule.nn.Linear) for n in linears)
    assert list(model.state_dict()) == keys
    assert {a for _, a, _ in report.fused} == expected_fused
    per_layer = {name.split(".layers.")[-1].split(".layer.")[-1].split(".")[0]
                 for name, _, _ in report.fused}
    assert len(report.fused) >= layers and len(per_layer) == layers, report.fused
    assert report.left == []
    summary = report.summary()
    assert f"{len(linears)} Linear layer(s) swapped" in summary and "fused:" in summary
    assert "0 module(s) left" in summary

    ids = torch.randint(0, vocab, (2, 12))
    labels = torch.randint(0, 3, (2,)) if "Bert" in type(original).__name__ else ids
    original.eval(), model.eval()
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, original(input_ids=ids).logits) <= 1e-6

    # Five training steps from the same seed (dropout included): the same losses.
    original.train(), model.train()
    torch_opt = torch.optim.AdamW(original.parameters(), lr=1e-3)
    ours_opt = chainrule.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        losses = []
        for m, opt in ((original, torch_opt), (model, ours_opt)):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            loss = loss_of(m, ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), (step, losses)


@pytest.mark.parametrize("key, expected", [
    ("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
    ("silu", "silu"), ("relu", "relu"), ("gelu_fast", None),
])
def test_transformers_activation_modules(key, expected):
    """The MLP of GPT-2-style models written with nn.Linear (c_fc -> ACT2FN[...] -> c_proj), traced:
    transformers' activation modules fuse as what they compute; one chainrule lacks (FastGELU's
    polynomial) is left in place, the Linear plainly swapped."""
    from transformers.activations import ACT2FN

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.act, self.c_proj = nn.Linear(8, 32), ACT2FN[key], nn.Linear(32, 8)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    original = MLP()
    model, report = chainrule.convert(copy.deepcopy(original), return_report=True)
    assert report.swapped == ["c_fc", "c_proj"] and report.traced == ["<root>"]
    if expected is None:
        assert report.fused == [] and not isinstance(model.act, nn.Identity)
    else:
        assert report.fused == [("c_fc", expected, "act")] and isinstance(model.act, nn.Identity)
    check_same_function(original, model, 5, 8)


def test_gpt2_conv1d_is_reported_as_left():
    torch.manual_seed(0)
    original, vocab = small_gpt2()
    model, report = chainrule.convert(copy.deepcopy(original), return_report=True)
    left = dict(report.left)
    conv1d = [n for n, m in original.named_modules() if type(m).__name__ == "Conv1D"]
    assert conv1d and all("Conv1D" in left[n] and "(in, out)" in left[n] for n in conv1d)
    assert report.swapped == ["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is kept
    ids = torch.randint(0, vocab, (2, 10))
    original.eval(), model.eval()
    with torch.no_grad():
        assert relative_error(model(input_ids=ids).logits, original(input_ids=ids).logits) <= 1e-6
