#!/usr/bin/env python3
"""What autograd builds for one linear layer with a GELU, in PyTorch and in chainrule.

For y = gelu(x @ W.T + b) this prints, side by side:
  1. the backward graph, walked from the loss's grad_fn (AddmmBackward0, TBackward0,
     GeluBackward0, AccumulateGrad in PyTorch; one LinearFunctionBackward in chainrule);
  2. the tensors each keeps for backward, measured with torch.autograd.graph.saved_tensors_hooks
     (what is new memory, and what is only a reference to x, W or b);
  3. every operation that runs in the layer's forward and in two backward passes that accumulate
     into .grad (as gradient accumulation over two micro-batches does), recorded with a
     TorchDispatchMode, with the bytes it reads (its tensor arguments) and writes (the results it
     allocates and the arguments it mutates): each is one pass over memory; views move nothing;
  4. the three side by side, and what accumulate_grad changes in the second backward.
Three variants: torch (nn.Linear + nn.GELU), chainrule (chainrule.nn.Linear(activation="gelu")),
chainrule with accumulate_grad=True (dW and db added into .grad inside backward).
docs/autograd_graph.md shows and explains the output.

    python examples/autograd_graph.py                 # batch 256, 1024 -> 4096, float32
    python examples/autograd_graph.py --smoke         # small sizes
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import chainrule

MB = 2 ** 20


def size(nbytes: float) -> str:
    """MiB, or KiB below one MiB (the sizes of --smoke)."""
    return f"{nbytes / MB:.2f} MiB" if nbytes >= MB or nbytes == 0 else f"{nbytes / 1024:.2f} KiB"


def walk(fn, names, depth=0, seen=None, lines=None):
    """The backward graph below `fn`, one node per line, indented by depth."""
    seen = set() if seen is None else seen
    lines = [] if lines is None else lines
    label = type(fn).__name__
    if hasattr(fn, "variable"):
        label += f" -> {names.get(id(fn.variable), 'leaf')}.grad"
    lines.append("  " * depth + label + (" (seen above)" if fn in seen else ""))
    if fn not in seen:
        seen.add(fn)
        for child, _ in fn.next_functions:
            if child is not None:
                walk(child, names, depth + 1, seen, lines)
    return lines


class Saved:
    """Records each tensor autograd saves for backward during forward."""

    def __init__(self, known):
        self.known, self.rows = known, []  # known: data_ptr -> name of x, W, b

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        owner = self.known.get(ptr)
        self.rows.append((tuple(t.shape), t.nbytes, owner))
        return t

    @staticmethod
    def unpack(t):
        return t


class Passes(TorchDispatchMode):
    """Records every aten / chainrule op that runs, with the bytes it reads (its tensor arguments)
    and writes (the results it allocates and the arguments it mutates, such as .grad += dW). A view
    (t, expand, detach) moves nothing and is not recorded; an op whose tensors are all scalars (the
    loss's gradient of ones) is recorded but is not a pass over memory."""

    def __init__(self):
        super().__init__()
        self.rows = []  # (op name, bytes read, bytes written, bytes newly allocated, on scalars)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        fresh = [o for o in outputs if o.untyped_storage().data_ptr() not in storages]
        mutated = []
        for position, argument in enumerate(func._schema.arguments):
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and \
                    isinstance(value, torch.Tensor):
                mutated.append(value)
        name = f"{func.namespace}::{func._schema.name.split('::')[-1]}"
        allocated = sum(t.nbytes for t in fresh)
        self.rows.append((name, sum(t.nbytes for t in inputs),
                          allocated + sum(t.nbytes for t in mutated), allocated,
                          all(t.dim() == 0 for t in inputs + outputs)))
        return out


def memory_passes(rows):
    """The rows that are passes over memory (not ops on scalars)."""
    return [row for row in rows if not row[4]]


def variant(name, make_layer, x, weight, bias):
    layer = make_layer()
    with torch.no_grad():
        layer[0].weight.copy_(weight)
        layer[0].bias.copy_(bias)
    params = {id(layer[0].weight): "weight", id(layer[0].bias): "bias"}
    inp = x.clone().requires_grad_(True)
    params[id(inp)] = "input"
    known = {inp.untyped_storage().data_ptr(): "input", layer[0].weight.untyped_storage().data_ptr():
             "weight", layer[0].bias.untyped_storage().data_ptr(): "bias"}

    saved = Saved(known)
    forward = Passes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        with forward:  # the layer's forward only; the loss below is the same for all
            y = layer(inp)
        loss = y.sum()
    graph = walk(loss.grad_fn, params)
    backward_passes = []
    for micro_batch in range(2):
        if micro_batch:  # a second micro-batch: a fresh graph, gradients accumulate in .grad
            y = layer(inp)
            loss = y.sum()
        passes = Passes()
        with passes:
            loss.backward()
        backward_passes.append(passes.rows)
    return {"name": name, "graph": graph, "saved": saved.rows, "forward": forward.rows,
            "backward": backward_passes, "output": y.detach(),
            "grad": layer[0].weight.grad.clone()}


def phases(v):
    return [("forward (the layer)", v["forward"]), ("backward, 1st micro-batch", v["backward"][0]),
            ("backward, 2nd micro-batch (.grad already there)", v["backward"][1])]


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "es" if word.endswith("s") else "s")


def moved(rows) -> int:
    return sum(read + written for _, read, written, _, _ in rows)


def fresh_bytes(rows) -> int:
    return sum(allocated for _, _, _, allocated, _ in rows)


def kept_for_backward(v) -> int:
    return sum(nbytes for _, nbytes, owner in v["saved"] if owner is None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--in-features", type=int, default=1024)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.in_features, args.out_features = 8, 16, 32

    torch.manual_seed(0)
    b, k, n = args.batch, args.in_features, args.out_features
    x, weight, bias = torch.randn(b, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
    variants = [
        variant("torch: nn.Linear + nn.GELU", lambda: nn.Sequential(nn.Linear(k, n), nn.GELU()),
                x, weight, bias),
        variant("chainrule: chainrule.nn.Linear(activation='gelu')",
                lambda: nn.Sequential(chainrule.nn.Linear(k, n, activation="gelu")), x, weight,
                bias),
        variant("chainrule: ... accumulate_grad=True",
                lambda: nn.Sequential(chainrule.nn.Linear(k, n, activation="gelu",
                                                          accumulate_grad=True)),
                x, weight, bias),
    ]
    reference = variants[0]
    for v in variants[1:]:  # the same function and gradients, or the comparison means nothing
        torch.testing.assert_close(v["output"], reference["output"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v["grad"], reference["grad"], rtol=1e-4, atol=1e-3)

    print(f"y = gelu(x @ W.T + b), x {b}x{k}, W {n}x{k}, float32; loss = y.sum()\n"
          f"(x: {size(x.nbytes)}, W: {size(weight.nbytes)}, "
          f"y: {size(b * n * 4)})")
    for v in variants:
        print(f"\n=== {v['name']}")
        print("backward graph (from loss.grad_fn):")
        for line in v["graph"]:
            print("    " + line)
        print("saved for backward (saved_tensors_hooks):")
        for shape, nbytes, owner in v["saved"]:
            what = f"a reference to {owner}" if owner else "new memory"
            print(f"    {str(list(shape)):<14} {size(nbytes):>10}  {what}")
        print(f"    new memory kept for backward: {size(kept_for_backward(v))}")
        for title, rows in phases(v):
            passes = memory_passes(rows)
            print(f"{title}: {plural(len(passes), 'pass')} over memory, "
                  f"{size(moved(passes))} read+written")
            for op, read, written, allocated, on_scalars in rows:
                if on_scalars:
                    print(f"    {op:<38} (on the scalar loss: not a pass over memory)")
                else:
                    print(f"    {op:<38} reads {size(read):>10}  writes {size(written):>10}"
                          + (f"  (new: {size(allocated)})" if allocated else ""))

    print("\n=== side by side")
    columns = ["torch", "chainrule", "chainrule accumulate_grad"]
    print(f"{'':<44}" + "".join(f"{c:>27}" for c in columns))
    print(f"{'autograd nodes below the loss':<44}" +
          "".join(f"{len(v['graph']) - 1:>27}" for v in variants))
    print(f"{'new memory kept for backward':<44}" +
          "".join(f"{size(kept_for_backward(v)):>27}" for v in variants))
    for i, (title, _) in enumerate(phases(variants[0])):
        cells = []
        for v in variants:
            passes = memory_passes(phases(v)[i][1])
            cells.append(f"{plural(len(passes), 'pass')}, {size(moved(passes))}")
        print(f"{title.split(' (')[0]:<44}" + "".join(f"{c:>27}" for c in cells))

    plain, accumulating = variants[1]["backward"][1], variants[2]["backward"][1]
    removed, added = list(plain), []
    for row in accumulating:
        same = [r for r in removed if r[:3] == row[:3]]  # the same op on the same tensors
        if same:
            removed.remove(same[0])
        else:
            added.append(row)
    print("\nwhat accumulate_grad changes in the 2nd micro-batch's backward (.grad exists):")
    for sign, rows in (("-", removed), ("+", added)):
        for op, read, written, allocated, _ in rows:
            print(f"  {sign} {op:<38} reads {size(read):>10}  writes {size(written):>10}"
                  + (f"  (new: {size(allocated)})" if allocated else ""))
    print(f"  new memory allocated in that backward: {size(fresh_bytes(plain))} without, "
          f"{size(fresh_bytes(accumulating))} with accumulate_grad; memory traffic "
          f"{size(moved(memory_passes(plain)))} -> {size(moved(memory_passes(accumulating)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
