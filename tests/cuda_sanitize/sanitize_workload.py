"""What `make gpu-check` runs under compute-sanitizer (memcheck, then racecheck): the CUDA linear
kernels on small shapes (tails of every tile, unaligned rows, split-K, every dtype, with and
without bias and activation, a backward accumulating into .grad) and Adam/AdamW steps (fp32,
amsgrad, bf16 with fp32 master weights, sizes around the vector and chunk boundaries).

Each result is checked loosely against PyTorch so that a wrong kernel also shows; the sanitizer
reports memory errors and shared-memory hazards. tools/gpu_check.py sets
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every tensor is its own allocation and an access past its end
is an error memcheck sees. Prints "sanitize workload: ok" at the end.

    python tests/cuda_sanitize/sanitize_workload.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

import chainrule

# (M, K, N): one element; primes (tails everywhere, rows not 16-byte aligned in 16-bit dtypes);
# a tile and a half; a small-output, long-K shape that takes split-K for dW.
SHAPES = [(1, 1, 1), (7, 13, 5), (33, 24, 40), (130, 72, 136), (8, 1024, 8)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def check(name, got, want, dtype):
    error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    if not error <= TOLERANCE[dtype] * scale * 8:
        raise SystemExit(f"sanitize workload: {name} differs from torch by {error:.3g}")


def linear_cases(shapes):
    for m, k, n in shapes:
        for dtype in DTYPES:
            for bias, activation in ((True, "gelu"), (False, None)):
                label = f"linear {m}x{k}x{n} {dtype} bias={bias} activation={activation}"
                torch.manual_seed(m * 31 + n)
                layer = chainrule.nn.Linear(k, n, bias=bias, activation=activation,
                                            accumulate_grad=True, device="cuda", dtype=dtype)
                x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
                y = layer(x)
                reference = torch.nn.functional.linear(x.detach().double(), layer.weight.detach().double(),
                                                       None if layer.bias is None else layer.bias.detach().double())
                if activation == "gelu":
                    reference = torch.nn.functional.gelu(reference)
                check(label + " forward", y, reference, dtype)
                grad_y = torch.randn_like(y)
                y.backward(grad_y)
                first = layer.weight.grad.clone()
                layer(x).backward(grad_y)  # accumulates into the existing .grad in the kernel
                check(label + " accumulated grad_weight", layer.weight.grad, 2 * first.double(), dtype)


def adam_cases():
    sizes = [1, 3, 4097, 16_384 + 5, 70_000]
    for name, dtype, kwargs in (("adamw fp32", torch.float32, {}),
                                ("adam fp32 amsgrad", torch.float32, {"amsgrad": True}),
                                ("adamw bf16 master weights", torch.bfloat16, {"master_weights": True})):
        torch.manual_seed(len(name))
        params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype)) for n in sizes]
        reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        kind = chainrule.optim.AdamW if name.startswith("adamw") else chainrule.optim.Adam
        torch_kind = torch.optim.AdamW if name.startswith("adamw") else torch.optim.Adam
        ours = kind(params, lr=1e-2, **kwargs)
        theirs = torch_kind(reference, lr=1e-2, amsgrad=kwargs.get("amsgrad", False))
        for _ in range(2):
            for p, r in zip(params, reference):
                g = torch.randn(p.shape, device="cuda")
                p.grad = g.to(dtype)
                r.grad = g.to(dtype).float()
            ours.step()
            theirs.step()
        for i, (p, r) in enumerate(zip(params, reference)):
            check(f"{name} param {i}", p.float(), r, dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the first three shapes only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize workload: no CUDA device", file=sys.stderr)
        return 2
    linear_cases(SHAPES[:3] if args.quick else SHAPES)
    adam_cases()
    torch.cuda.synchronize()
    print("sanitize workload: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
