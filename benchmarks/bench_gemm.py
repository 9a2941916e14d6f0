#!/usr/bin/env python3
"""GEMM alone: chainrule's GEMM against torch's (MKL/oneDNN on CPU, cuBLAS on CUDA), and on CUDA
the fused linear forward and forward+backward against F.linear (cuBLAS) and
torch._addmm_activation (cuBLASLt epilogue).

The chainrule side is the raw CPU GEMM chainrule._C._cpu_gemm(X, B) when the extension exposes
it (fp32/bf16 with the active ISA), else the linear forward op with no bias and no activation
(Y = X @ W^T, the forward layout; always so on CUDA). Which one ran is in each row's config. Baselines:
"mm" = torch.mm(X, W.t()) (the same layout), "matmul" = X @ B with B (K, N) row-major (the plain
product). The cache is flushed before every timed call. Shapes are M x K x N; 2 M N K flops per
call; "% of peak" is against the FMA peak (CPU) or the bf16/fp32 cuBLAS GEMM (CUDA) measured by
bench_machine.py.

On a machine without a GPU, --device cuda prints why nothing ran and exits 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_linear  # noqa: E402
import harness  # noqa: E402

RAW_GEMM = "_cpu_gemm"  # chainrule._C._cpu_gemm(A, B) = A @ B, row-major, on the CPU GEMM


def chainrule_gemm(chainrule, device, dtype):
    """(function of (X (M, K), W (N, K), B = W^T as (K, N) row-major) computing X W^T, description):
    the raw CPU GEMM when _C exposes it for this dtype, else the linear forward op."""
    raw = getattr(chainrule._C, RAW_GEMM, None)
    if raw is not None and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        try:
            raw(torch.ones(2, 3, dtype=dtype), torch.ones(3, 2, dtype=dtype))
            return (lambda x, w, b: raw(x, b)), f"chainrule._C.{RAW_GEMM} (X @ B)"
        except RuntimeError:
            pass  # no kernel for this dtype with the active ISA

    def forward(x, w, b):
        return chainrule.ops.linear_forward(x, w, None, "none", False)[0]
    return forward, "chainrule linear_forward (X @ W^T, no bias, no activation)"


def shapes_for(s: harness.Settings) -> list[tuple[int, int, int]]:
    if s.args.shapes:
        return harness.parse_shapes(s.args.shapes, 3)
    if s.mode == "smoke":
        return [(32, 48, 40)]
    if s.device.type == "cuda":
        return [(4096, 4096, 4096), (8192, 8192, 8192)] if s.mode == "quick" else \
            [(n, n, n) for n in (1024, 2048, 4096, 8192)] + [(8192, 768, 3072), (8192, 3072, 768)]
    if s.mode == "quick":
        return [(2048, 2048, 2048), (1024, 1024, 1024)]
    return [(n, n, n) for n in (256, 512, 1024, 2048, 3072, 4096)] + \
        [(4096, 1024, 4096), (512, 768, 3072), (512, 3072, 768)]


def gemm_rows(s: harness.Settings, peaks: dict, chainrule) -> list[dict]:
    flush = harness.CacheFlusher(s.device) if s.mode != "smoke" else None
    rows = []
    configs = [(shape, dtype) for dtype in s.dtypes for shape in shapes_for(s)]
    for (m, k, n), dtype in harness.progress(configs, s, "gemm"):
        torch.manual_seed(m + k + n)
        x = torch.randn(m, k, device=s.device, dtype=dtype)
        w = torch.randn(n, k, device=s.device, dtype=dtype)
        b = w.t().contiguous()  # (K, N) row-major for the plain product
        ours, how = chainrule_gemm(chainrule, s.device, dtype)
        with torch.no_grad():
            check = harness.guarded(lambda: harness.check_close(
                [ours(x, w, b)], [torch.mm(x, w.t())], dtype, names=("Y",)))
        contenders = [harness.Contender("mm", lambda _: torch.mm(x, w.t())),
                      harness.Contender("matmul", lambda _: x @ b)]
        if check.ok:
            contenders.insert(0, harness.Contender("chainrule", lambda _: ours(x, w, b)))
        with torch.no_grad():
            cpu_times: dict = {}
            times = harness.measure(contenders, repeats=s.repeats, warmup=s.warmup,
                                    device=s.device, flush=flush, cpu_times=cpu_times)
        peak, peak_name = harness.peak_for(peaks, s.device, dtype, "flops")
        rows.append(harness.make_row(
            subject="gemm", label=f"{m}x{k}x{n} {harness.dtype_name(dtype)} gemm",
            size=float(m * n * k), times=times, check=check, work=2.0 * m * n * k,
            unit=harness.flops_unit(s.device), peak=peak, peak_name=peak_name,
            cpu_times=cpu_times, threads=s.threads,
            config={"m": m, "k": k, "n": n, "dtype": harness.dtype_name(dtype),
                    "device": str(s.device), "chainrule_gemm": how},
            extra={"series": f"{harness.dtype_name(dtype)} gemm",
                   "note": "target" if (m, k, n) == (2048, 2048, 2048) and dtype == torch.float32
                   and s.device.type == "cpu" else ""}))
        del x, w, b
    return rows


def cuda_linear_rows(s: harness.Settings, peaks: dict, chainrule) -> list[dict]:
    """The fused linear layer on CUDA against F.linear + activation and torch._addmm_activation."""
    if s.device.type != "cuda" or s.mode == "smoke":
        return []
    shapes = [(4096, 4096, 4096)] if s.mode == "quick" else \
        [(4096, 4096, 4096), (8192, 768, 3072), (8192, 3072, 768), (512, 768, 3072)]
    configs = [bench_linear.Config(*shape, dtype, act, bench_linear.PASSES, ("eager", "addmm_act"))
               for shape in shapes for dtype in s.dtypes if dtype != torch.float32
               for act in ("gelu_tanh", "relu")]
    flush = harness.CacheFlusher(s.device)
    rows = []
    for cfg in harness.progress(configs, s, "linear (cuda)"):
        new_rows, _ = bench_linear.run_config(cfg, s, peaks, chainrule, flush)
        for row in new_rows:
            row["subject"] = "gemm"
            row["label"] = "linear " + row["label"]
        rows.extend(new_rows)
    return rows


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="comma-separated MxKxN, e.g. 2048x2048x2048",
                       default_dtypes="float32,bfloat16")
    args = p.parse_args(argv)
    s = harness.settings("gemm", args)
    rows, peaks = [], None
    if s.available:
        chainrule = harness.import_chainrule()
        peaks = harness.load_peaks(s)
        if s.device.type == "cpu" and not args.dtype and s.mode != "full":
            s.dtypes = [torch.float32, torch.bfloat16] if s.mode == "quick" else [torch.float32]
        rows = gemm_rows(s, peaks, chainrule) + cuda_linear_rows(s, peaks, chainrule)
    harness.write_results(s, rows, peaks=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
