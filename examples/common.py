"""What the examples share: training two copies of a model side by side (torch's and the one
chainrule.convert made), timing each step, and the plot of both loss curves and step times."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


class StepTimer:
    """Wall time of each call, in ms (the first few are warm-up and left out of the median)."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.ms, self.losses = warmup, [], []

    def run(self, step, *args):
        start = time.perf_counter()
        loss = step(*args)
        self.ms.append((time.perf_counter() - start) * 1e3)
        self.losses.append(float(loss))
        return loss

    def median_ms(self) -> float:
        timed = self.ms[self.warmup:] or self.ms
        return statistics.median(timed)


def plot(path: Path, title: str, timers: dict[str, StepTimer], loss_label: str = "loss") -> Path:
    """Loss per step (left) and time per step (right), one line per contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=80)
    for name, timer in timers.items():
        left.plot(timer.losses, label=name, linewidth=1)
        right.plot(timer.ms, label=f"{name} (median {timer.median_ms():.2f} ms)", linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel(loss_label)
    left.set_title(f"{title}: training loss", fontsize=10)
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("ms per training step")
    right.set_yscale("log")
    right.set_title(f"{title}: time per step", fontsize=10)
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_summary(title: str, rows: dict[str, dict], timers: dict[str, StepTimer]) -> None:
    """One line per contender: its figures and the median time per step; then the speed-up."""
    print(f"\n{title}")
    names = list(timers)
    for name in names:
        figures = ", ".join(f"{k} {v}" for k, v in rows[name].items())
        print(f"  {name:<10} {figures}, {timers[name].median_ms():8.2f} ms/step (median)")
    if len(names) == 2:
        ratio = timers[names[1]].median_ms() / timers[names[0]].median_ms()
        print(f"  {names[0]} is {ratio:.2f}x {names[1]}'s speed per training step "
              f"({torch.get_num_threads()} threads)")
