#!/usr/bin/env python3
"""A character-level GPT (in the manner of nanoGPT's shakespeare_char) trained on the text of
Python's own documentation topics (the `pydoc_data.topics` module that ships with Python), twice
from the same initial weights and batches: as written in PyTorch (nn.Linear + nn.GELU,
torch.optim.AdamW(fused=True)), and after `chainrule.convert`, which swaps every nn.Linear for a
chainrule.nn.Linear and fuses each MLP's GELU into its first layer (chainrule.optim.AdamW).
Prints both validation losses and times per step, samples text from chainrule's model at the end.

    python examples/tiny_gpt.py            # ~2 minutes on a 2-core CPU; validation loss < 1.8
    python examples/tiny_gpt.py --smoke    # seconds: checks that it runs

The defaults (3 layers, d_model 96, 64 characters of context, 500 steps of 32 sequences) are sized
for about two minutes on a quiet 2-core CPU, both models included. Predicting each character from
its frequency alone scores 3.24 nats per character on the validation text, and from the character
before it 2.32 (both printed); the model reaches 1.654 (chainrule and torch alike), so it has
learnt more than pairs of letters. That run took 84 s of CPU time on one thread of a 2-core Intel
Xeon (5 min 49 s of wall time: the machine was shared with other work).

Dropout is off by default: 500 steps see the training text about 2.4 times, too few to overfit,
and on CPU scaled_dot_product_attention with dropout leaves its fused kernel for a much slower one.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import chainrule
from common import StepTimer, plot, print_summary

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, d_model: int, layers: int, heads: int,
                 dropout: float = 0.1):
        super().__init__()
        self.block_size = block_size
        self.tokens, self.positions = nn.Embedding(vocab, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads, dropout) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(self.ln(self.blocks(x)))

    @torch.no_grad()
    def sample(self, ids, length: int, temperature: float = 0.8):
        for _ in range(length):
            logits = self(ids[:, -self.block_size:])[:, -1] / temperature
            ids = torch.cat([ids, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
        return ids


def frequency_baselines(train, val, vocab: int) -> tuple[float, float]:
    """Cross-entropy on `val` of the character frequencies and of the pair frequencies counted on
    `train` (add-one smoothing): what a model that learnt nothing more would score."""
    single = torch.bincount(train, minlength=vocab).double() + 1
    unigram = -(single / single.sum()).log()[val].mean()
    pairs = torch.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).double()
    pairs = pairs.view(vocab, vocab) + 1
    bigram = -(pairs / pairs.sum(1, keepdim=True)).log()[val[:-1], val[1:]].mean()
    return float(unigram), float(bigram)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--target-loss", type=float, default=1.8,
                   help="the validation loss (nats per character) the defaults reach")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.d_model, args.heads, args.layers, args.block_size = 8, 32, 1, 1, 16

    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    print(f"data: pydoc_data.topics, {len(text)} characters, {len(chars)} distinct; "
          f"{len(train)} to train, {len(val)} to validate")
    unigram, bigram = frequency_baselines(train, val, len(chars))
    print(f"on the validation text, predicting a character from its frequency scores "
          f"{unigram:.2f} nats per character, from the character before it {bigram:.2f}")

    generator = torch.Generator().manual_seed(0)

    def batch(source, generator=generator):
        start = torch.randint(len(source) - args.block_size - 1, (args.batch_size,),
                              generator=generator)
        offsets = torch.arange(args.block_size)
        return source[start[:, None] + offsets], source[start[:, None] + offsets + 1]

    torch.manual_seed(0)
    reference = GPT(len(chars), args.block_size, args.d_model, args.layers, args.heads,
                    args.dropout)
    ours, report = chainrule.convert(copy.deepcopy(reference), return_report=True)
    print(report.summary().splitlines()[0] + "; " + report.summary().splitlines()[1].strip())
    models = {"chainrule": ours, "torch": reference}
    optimizers = {"chainrule": chainrule.optim.AdamW(ours.parameters(), lr=args.lr,
                                                     weight_decay=0.1),
                  "torch": torch.optim.AdamW(reference.parameters(), lr=args.lr,
                                             weight_decay=0.1, fused=True)}
    schedulers = {name: torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, args.steps,
                                                            pct_start=0.1)
                  for name, opt in optimizers.items()}
    timers = {name: StepTimer() for name in models}

    def step(name, x, y):
        optimizers[name].zero_grad(set_to_none=True)
        loss = F.cross_entropy(models[name](x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizers[name].step()
        schedulers[name].step()
        return loss.detach()

    for i in tqdm(range(args.steps), desc="tiny gpt", unit="step"):
        x, y = batch(train)
        for name in (models if i % 2 == 0 else list(reversed(models))):
            torch.manual_seed(i)  # the same dropout masks on both sides
            timers[name].run(step, name, x, y)

    @torch.no_grad()
    def validation_loss(model) -> float:
        model.eval()
        g = torch.Generator().manual_seed(1)
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                  for x, y in (batch(val, g) for _ in range(20))]
        model.train()
        return sum(losses) / len(losses)

    results = {name: {"validation loss": f"{validation_loss(m):.3f}"} for name, m in models.items()}
    print_summary(f"char-level GPT ({args.layers} layers, d_model {args.d_model}), {args.steps} "
                  f"steps of {args.batch_size}x{args.block_size} characters", results, timers)
    reached = float(results["chainrule"]["validation loss"]) < args.target_loss
    print(f"  chainrule's validation loss {'is below' if reached else 'did NOT reach'} "
          f"{args.target_loss} nats per character"
          + (" (a --smoke run is too short to)" if args.smoke and not reached else ""))
    path = plot(args.out / "tiny_gpt.png", "char-level GPT", timers, "cross-entropy (nats/char)")
    print(f"  plot: {path}")

    ours.eval()
    torch.manual_seed(0)
    prompt = torch.tensor([[index[c] for c in "The "]])
    sample = "".join(chars[i] for i in ours.sample(prompt, 200 if not args.smoke else 20)[0])
    print("\nsample from chainrule's model:\n" + sample)
    return 0 if reached or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
