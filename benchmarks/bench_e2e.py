#!/usr/bin/env python3
"""End to end: one training step (zero_grad, forward, loss, backward, optimizer step) of a small
MLP and of a small GPT-style transformer block, built from chainrule.nn.Linear (activation fused)
and trained with chainrule.optim.AdamW, against the same model in plain PyTorch (nn.Linear +
F.gelu, torch.optim.AdamW as constructed by default, and with fused=True).

Models (both sides start from the same weights and see the same batch):
  mlp:  512 -> 2048 (gelu) -> 2048 (gelu) -> 512, MSE loss;            throughput in samples/s
  gpt:  x + attn(ln(x)), x + mlp(ln(x)); d_model 384, 6 heads, causal
        F.scaled_dot_product_attention, MLP 4x with GELU, MSE loss;    throughput in tokens/s
  bert: transformers' BertForSequenceClassification, 4 layers, hidden 256, 4 heads, FFN 1024,
        vocabulary 2048, built from a config (no download);                throughput in tokens/s
  llama: transformers' LlamaForCausalLM, 4 layers, hidden 256, 4 heads (2 KV), FFN 688,
        vocabulary 2048, built from a config;                              throughput in tokens/s
        For bert and llama, chainrule's side is the same model after chainrule.convert (every
        nn.Linear swapped, GELU / SiLU fused), trained with chainrule.optim.AdamW; dropout runs
        from the same seed on both sides.
--shapes takes batch sizes: mlp:B, gpt:BxT, bert:BxT, llama:BxT, e.g. mlp:256,gpt:8x128.
The check compares the loss and every parameter after two steps with the baseline's.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402


class MLP(nn.Module):
    def __init__(self, linear, widths=(512, 2048, 2048, 512), fused: bool = False):
        super().__init__()
        self.fused = fused
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            kwargs = {"activation": None if last else "gelu"} if fused else {}
            layers.append(linear(a, b, **kwargs))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if not self.fused and i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


class Block(nn.Module):
    """A pre-norm GPT-2 block."""

    def __init__(self, linear, d_model=384, heads=6, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = linear(d_model, 3 * d_model)
        self.proj = linear(d_model, d_model)
        self.fc = linear(d_model, 4 * d_model, **({"activation": "gelu"} if fused else {}))
        self.fc_out = linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        h = self.fc(self.ln2(x))
        if not self.fused:
            h = F.gelu(h)
        return x + self.fc_out(h)


def models_for(s: harness.Settings) -> list[tuple[str, tuple[int, ...]]]:
    if s.args.shapes:
        out = []
        for item in s.args.shapes.split(","):
            name, _, dims = item.partition(":")
            if name not in ("mlp", "gpt", "bert", "llama"):
                raise SystemExit(f"--shapes: unknown model {name!r} (mlp:B, gpt:BxT, bert:BxT "
                                 f"or llama:BxT)")
            out.append((name, harness.parse_shapes(dims, 1 if name == "mlp" else 2)[0]))
        return out
    if s.mode == "smoke":
        return [("mlp", (4,)), ("gpt", (1, 8)), ("bert", (1, 8)), ("llama", (1, 8))]
    if s.mode == "quick":
        return [("mlp", (256,)), ("gpt", (8, 128)), ("bert", (8, 128)), ("llama", (8, 128))]
    return [("mlp", (64,)), ("mlp", (256,)), ("mlp", (1024,)), ("gpt", (4, 128)),
            ("gpt", (8, 128)), ("gpt", (8, 512)), ("bert", (8, 128)), ("bert", (16, 256)),
            ("llama", (8, 128)), ("llama", (16, 256))]


TRANSFORMERS_MODELS = ("bert", "llama")
VOCABULARY = 2048


def build_transformers(name: str, chainrule, device, dtype, smoke: bool):
    """(converted, original): a transformers model from a small config, and a copy of it after
    chainrule.convert."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    layers, hidden, heads = (1, 32, 2) if smoke else (4, 256, 4)
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCABULARY, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512,
            num_labels=2)
        baseline = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCABULARY, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2,
            intermediate_size=int(8 * hidden / 3) // 8 * 8, max_position_embeddings=512)
        baseline = transformers.LlamaForCausalLM(config)
    baseline.to(device=device, dtype=dtype).train()
    ours, report = chainrule.convert(copy.deepcopy(baseline), return_report=True)
    if not report.fused:
        raise SystemExit(f"bench_e2e: chainrule.convert fused no activation in {name}:\n{report}")
    return ours, baseline


def transformers_batch(name: str, dims, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, VOCABULARY, dims, generator=g).to(device)
    labels = torch.randint(0, 2, (dims[0],), generator=g).to(device) if name == "bert" else ids
    return ids, labels


def transformers_trainer(model, optimizer, ids, labels):
    def step(_=None):
        torch.manual_seed(0)  # the same dropout masks on both sides
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def build(name: str, chainrule, device, dtype, smoke: bool):
    torch.manual_seed(0)
    if name == "mlp":
        widths = (16, 32, 32, 16) if smoke else (512, 2048, 2048, 512)
        baseline = MLP(nn.Linear, widths)
        ours = MLP(chainrule.nn.Linear, widths, fused=True)
    else:
        d, heads = (32, 2) if smoke else (384, 6)
        baseline = Block(nn.Linear, d, heads)
        ours = Block(chainrule.nn.Linear, d, heads, fused=True)
    baseline.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    ours.load_state_dict(baseline.state_dict())  # chainrule.nn.Linear keeps nn.Linear's keys
    return ours, baseline


def batch(name: str, dims, model_width: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (dims[0], model_width) if name == "mlp" else (*dims, model_width)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    target = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, target


def trainer(model, optimizer, x, target):
    def step(_=None):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="mlp:B, gpt:BxT, bert:BxT, llama:BxT, e.g. mlp:256,gpt:8x128")
    args = p.parse_args(argv)
    s = harness.settings("e2e", args, repeats=(1, 3, 9), warmup=(0, 1, 2))
    rows, peaks = [], None
    if s.available:
        chainrule = harness.import_chainrule()
        peaks = harness.load_peaks(s)
        for name, dims in harness.progress(models_for(s), s, "e2e"):
            for dtype in s.dtypes:
                if name in TRANSFORMERS_MODELS:
                    ours, baseline = build_transformers(name, chainrule, s.device, dtype,
                                                        s.mode == "smoke")
                    x, target = transformers_batch(name, dims, s.device)
                    make_trainer = transformers_trainer
                else:
                    ours, baseline = build(name, chainrule, s.device, dtype, s.mode == "smoke")
                    width = ours.layers[0].in_features if name == "mlp" else ours.qkv.in_features
                    x, target = batch(name, dims, width, s.device, dtype)
                    make_trainer = trainer
                eager_default = baseline
                eager_fused = copy.deepcopy(baseline)
                ours_opt = chainrule.optim.AdamW(ours.parameters(), lr=1e-3)
                default_opt = torch.optim.AdamW(eager_default.parameters(), lr=1e-3)
                fused_opt = torch.optim.AdamW(eager_fused.parameters(), lr=1e-3, fused=True)
                steps = {"chainrule": make_trainer(ours, ours_opt, x, target),
                         "torch": make_trainer(eager_default, default_opt, x, target),
                         "torch fused AdamW": make_trainer(eager_fused, fused_opt, x, target)}
                def two_steps_compared():
                    """Two steps from the same start; the losses and the second step's gradients
                    (taken after one optimizer update) compared. Not the parameters themselves:
                    Adam's first steps move every element by about lr whatever the gradient's
                    size, so an element whose gradient is at rounding level may move either way
                    in two correct implementations."""
                    losses = {k: [fn(), fn()] for k, fn in steps.items()}
                    # Attention's key bias has a gradient of exactly zero in exact arithmetic
                    # (softmax ignores a constant per query): both sides hold rounding noise.
                    compared = [i for i, (n, _) in enumerate(ours.named_parameters())
                                if not n.endswith("attention.self.key.bias")]
                    names = [n for n, _ in ours.named_parameters()]
                    ours_grads = [p.grad for p in ours.parameters()]
                    torch_grads = [p.grad for p in eager_default.parameters()]
                    return harness.check_close(
                        losses["chainrule"] + [ours_grads[i] for i in compared],
                        losses["torch"] + [torch_grads[i] for i in compared], dtype,
                        names=["loss 1", "loss 2"] + [f"{names[i]}.grad" for i in compared],
                        tolerance=1e-3 if dtype == torch.float32 else None)

                check = harness.guarded(two_steps_compared)
                contenders = [harness.Contender(k, fn) for k, fn in steps.items()
                              if check.ok or k != "chainrule"]
                times = harness.measure(contenders, repeats=s.repeats, warmup=s.warmup,
                                        device=s.device)
                items = dims[0] if name == "mlp" else dims[0] * dims[1]
                unit = "samples/s" if name == "mlp" else "tokens/s"
                row = harness.make_row(
                    subject="e2e", label=f"{name} {'x'.join(map(str, dims))} "
                                         f"{harness.dtype_name(dtype)} train step",
                    size=float(items), times=times, check=check, work=None, unit=unit,
                    peak=None, config={"model": name, "dims": list(dims),
                                       "dtype": harness.dtype_name(dtype), "device": str(s.device),
                                       "parameters": sum(p.numel() for p in ours.parameters())},
                    extra={"series": f"{name} {harness.dtype_name(dtype)}"})
                # throughput in samples or tokens per second instead of flops
                row["throughput"] = {k: items / v["median_s"] for k, v in
                                     [("chainrule", row["chainrule"])] + list(row["baselines"].items())
                                     if v}
                rows.append(row)
    harness.write_results(s, rows, peaks=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
