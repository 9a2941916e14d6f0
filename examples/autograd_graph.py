#!/usr/bin/env python3
"""What autograd builds for one linear layer with a GELU, in PyTorch and in chainrule.

For y = gelu(x @ W.T + b) this prints, side by side:
  1. the backward graph, walked from the loss's grad_fn (AddmmBackward0, TBackward0,
     GeluBackward0, AccumulateGrad in PyTorch; one LinearFunctionBackward in chainrule);
  2. the tensors each keeps for backward, measured with torch.autograd.graph.saved_tensors_hooks
     (what is new memory, and what is only a reference to x, W or b);
  3. every operation that runs in forward and in two backward passes that accumulate into .grad
     (as gradient accumulation over two micro-batches does), recorded with a TorchDispatchMode,
     with the bytes it reads and writes: each is one pass over memory.
Three variants: torch (nn.Linear + nn.GELU), chainrule (chainrule.nn.Linear(activation="gelu")),
chainrule with accumulate_grad=True (dW and db added into .grad inside backward).

    python examples/autograd_graph.py                 # batch 256, 1024 -> 4096, float32
    python examples/autograd_graph.py --smoke         # small sizes
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import chainrule

MB = 2 ** 20


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
    """Records every aten / chainrule op with the bytes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        name = str(func.overloadpacket).replace("aten.", "aten::").replace("chainrule.",
                                                                             "chainrule::")
        if name not in ("aten::t", "aten::view", "aten::detach", "aten::alias", "aten::_to_copy")\
                or any(t.nbytes for t in flat_out if t.untyped_storage().data_ptr() not in
                       {a.untyped_storage().data_ptr() for a in flat_in}):
            moved_in = sum(t.nbytes for t in flat_in)
            aliases = {a.untyped_storage().data_ptr() for a in flat_in}
            moved_out = sum(t.nbytes for t in flat_out
                            if t.untyped_storage().data_ptr() not in aliases or
                            func._schema.is_mutable)
            is_view = name in ("aten::t", "aten::view", "aten::detach", "aten::alias")
            self.rows.append((name, 0 if is_view else moved_in, 0 if is_view else moved_out))
        return out


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
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), forward:
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
          f"(x: {x.nbytes / MB:.2f} MiB, W: {weight.nbytes / MB:.2f} MiB, "
          f"y: {b * n * 4 / MB:.2f} MiB)")
    for v in variants:
        print(f"\n=== {v['name']}")
        print("backward graph (from loss.grad_fn):")
        for line in v["graph"]:
            print("    " + line)
        new = sum(nbytes for _, nbytes, owner in v["saved"] if owner is None)
        print("saved for backward (saved_tensors_hooks):")
        for shape, nbytes, owner in v["saved"]:
            what = f"a reference to {owner}" if owner else "new memory"
            print(f"    {str(list(shape)):<14} {nbytes / MB:8.2f} MiB  {what}")
        print(f"    new memory kept for backward: {new / MB:.2f} MiB")
        for title, rows in [("forward", v["forward"]), ("backward, 1st micro-batch",
                                                        v["backward"][0]),
                            ("backward, 2nd micro-batch (.grad already there)",
                             v["backward"][1])]:
            moved = sum(r + w for _, r, w in rows)
            print(f"{title}: {len([1 for _, r, w in rows if r or w])} passes over memory, "
                  f"{moved / MB:.1f} MiB read+written")
            for op, read, written in rows:
                if read or written:
                    print(f"    {op:<38} reads {read / MB:7.2f} MiB  writes {written / MB:7.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
