#!/usr/bin/env python3
"""Fused linear layer: chainrule.nn.Linear(activation=...) against PyTorch, forward, backward and
forward+backward, per activation and dtype, over a shape sweep.

Shapes are M x K x N: input (M, K), weight (N, K), output (M, N). The sweep holds the GPT-2-small
MLP (768 -> 3072 -> 768 at 512 tokens) and the CPU targets of the project (M, K, N = 4096, 1024,
4096 / 512, 768, 3072 / 64, 1024, 1024).

Baselines: "eager" = torch.nn.Linear followed by the activation (F.relu, F.gelu, F.silu); "compile"
= the same function under torch.compile (its first call compiles, untimed); on CUDA,
"addmm_act" = torch._addmm_activation (cuBLASLt epilogue; forward only, relu and tanh-GELU only).
Work counted: forward 2MNK flops, backward 4MNK (grad_input and grad_weight), both 6MNK.
Peak memory (bytes allocated through torch's allocator above the start, the profiler's count on
the CPU): forward+backward of one layer per activation against torch.nn.Linear + the activation
(the "peak memory" table; parameters start without .grad), and a backward into an existing .grad
(the second micro-batch of gradient accumulation), chainrule with and without
accumulate_grad=True, and eager torch.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOPS_PER_MNK = {"fwd": 2, "bwd": 4, "fwd+bwd": 6, "infer": 2}
TARGETS = ((4096, 1024, 4096), (512, 768, 3072), (64, 1024, 1024))
GPT2_MLP = ((512, 768, 3072), (512, 3072, 768))
# The peak-memory table's layer, per mode: (shape, dtypes).
MEMORY_SHAPES = {"smoke": ((8, 16, 24), ("float32",)),
                 "quick": ((512, 768, 3072), ("float32",)),
                 "full": ((512, 768, 3072), ("float32", "bfloat16"))}


def torch_activation(name: str) -> Callable:
    return {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}[name]


@dataclass
class Config:
    m: int
    k: int
    n: int
    dtype: torch.dtype
    activation: str
    passes: tuple[str, ...]
    baselines: tuple[str, ...] = ("eager",)
    memory: bool = False
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.k}x{self.n}"


def configs(s: harness.Settings, shapes: Optional[list], activations: list[str],
            compile_all: bool) -> list[Config]:
    cuda = s.device.type == "cuda"
    extra = ("addmm_act",) if cuda else ()
    out: list[Config] = []

    def add(shape, dtype, act, passes, baselines=("eager",), memory=False, note=""):
        if dtype not in s.dtypes:
            return
        if act not in activations:
            return
        bl = tuple(baselines) + tuple(b for b in extra if act in ("relu", "gelu_tanh"))
        out.append(Config(*shape, dtype, act, tuple(passes), bl, memory, note))

    f32, bf16 = torch.float32, torch.bfloat16
    if shapes is not None:  # --shapes: every pass, every activation asked, every dtype asked
        for shape in shapes:
            for dtype in s.dtypes:
                for act in activations:
                    add(shape, dtype, act, PASSES, ("eager", "compile") if compile_all else ("eager",),
                        memory=s.mode == "smoke")
        return out
    if s.mode == "smoke":
        for dtype in s.dtypes:
            add((8, 16, 24), dtype, "gelu", PASSES, ("eager", "compile") if compile_all else ("eager",),
                memory=True)
        return out
    if s.mode == "quick":
        # The CPU targets first (issue 6), then the GPT-2-small MLP and activation coverage.
        add(TARGETS[0], f32, "gelu", ("fwd+bwd",), ("eager", "compile"), note="target")
        add(TARGETS[1], f32, "gelu", PASSES, ("eager", "compile") if compile_all else ("eager",),
            memory=True, note="target")
        add(TARGETS[2], f32, "gelu", ("fwd+bwd",),
            ("eager", "compile") if compile_all else ("eager",), note="target")
        add(TARGETS[0], bf16, "gelu", ("fwd+bwd",), note="target")
        add(GPT2_MLP[1], f32, "none", ("fwd+bwd",), note="GPT-2 MLP out")
        for act in ("relu", "gelu_tanh", "silu"):
            add(TARGETS[1], f32, act, ("fwd+bwd",))
        add(TARGETS[1], bf16, "gelu", ("fwd+bwd",))
        if cuda:
            for act in ("gelu_tanh", "relu"):
                add(TARGETS[0], bf16, act, PASSES)
        return out
    # full: every target with both baselines, then a sweep of M over the GPT-2 MLP and square shapes
    for shape in TARGETS:
        for dtype in (f32, bf16):
            add(shape, dtype, "gelu", PASSES, ("eager", "compile"), memory=shape == TARGETS[1],
                note="target")
    for m in (64, 256, 1024, 2048):
        for shape in ((m, 768, 3072), (m, 3072, 768)):
            for dtype in (f32, bf16):
                for act in ACTIVATIONS:
                    add(shape, dtype, act, PASSES)
    for size in (256, 512, 1024, 2048):
        for dtype in (f32, bf16):
            add((size, size, size), dtype, "gelu", PASSES)
    return out


# ---- one configuration --------------------------------------------------------------------------

class Side:
    """One contender's layer, input and output gradient, sharing the same initial values."""

    def __init__(self, forward: Callable, params: list[torch.Tensor], x: torch.Tensor,
                 dy: torch.Tensor):
        self.forward, self.params, self.x, self.dy = forward, params, x, dy

    def reset_grads(self) -> None:
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def contender(self, name: str, pass_name: str) -> harness.Contender:
        if pass_name == "fwd":
            return harness.Contender(name, lambda _: self.forward(self.x))
        if pass_name == "infer":  # the forward of inference or decoding: no graph, no gradient
            def infer(_):
                with torch.no_grad():
                    return self.forward(self.x)
            return harness.Contender(name, infer)
        if pass_name == "bwd":
            def prepare():
                self.reset_grads()
                return self.forward(self.x)
            return harness.Contender(name, lambda y: y.backward(self.dy), prepare)

        def run(_):
            self.forward(self.x).backward(self.dy)
        return harness.Contender(name, run, self.reset_grads)


def build_sides(cfg: Config, device: torch.device, chainrule, accumulate_grad: bool = False):
    """chainrule's side and a torch nn.Linear over the very same weight, bias, input and
    grad_output tensors (chainrule's module holds the reference's Parameter objects, as
    chainrule.convert does). With copies of their own, where each copy lands in memory moved
    identical ops by a few per cent, the same way run after run (benchmarks/README.md, Method,
    "Same tensors").
    Each timed call starts from .grad = None (Side.reset_grads), so sharing changes no result."""
    torch.manual_seed(cfg.m * 7 + cfg.k * 3 + cfg.n)
    reference = torch.nn.Linear(cfg.k, cfg.n, device=device, dtype=cfg.dtype)
    x = torch.randn(cfg.m, cfg.k, device=device, dtype=cfg.dtype).requires_grad_()
    dy = torch.randn(cfg.m, cfg.n, device=device, dtype=cfg.dtype)
    ours = chainrule.nn.Linear(cfg.k, cfg.n, activation=None if cfg.activation == "none"
                               else cfg.activation, accumulate_grad=accumulate_grad,
                               device=device, dtype=cfg.dtype)
    ours.weight, ours.bias = reference.weight, reference.bias
    params = [reference.weight, reference.bias]
    act = torch_activation(cfg.activation)
    ours_side = Side(ours, params, x, dy)
    torch_side = Side(lambda inp: act(reference(inp)), params, x, dy)
    return ours_side, torch_side, reference


def check_config(ours: Side, theirs: Side, dtype: torch.dtype) -> harness.Check:
    """Forward output and every gradient of chainrule against eager torch, once."""
    results = []
    for side in (ours, theirs):
        side.reset_grads()
        y = side.forward(side.x)
        y.backward(side.dy)
        results.append([y.detach(), side.x.grad, side.params[0].grad, side.params[1].grad])
        side.reset_grads()
    return harness.check_close(results[0], results[1], dtype,
                               names=("output", "grad_input", "grad_weight", "grad_bias"))


def backward_memory(cfg: Config, device: torch.device, chainrule) -> dict:
    """Peak bytes allocated during a backward whose parameters already hold a .grad."""
    out = {}
    for name, accumulate in (("chainrule", False), ("chainrule accumulate_grad", True),
                             ("torch eager", None)):
        ours, theirs, _ = build_sides(cfg, device, chainrule, accumulate_grad=bool(accumulate))
        side = theirs if accumulate is None else ours
        side.forward(side.x).backward(side.dy)  # .grad now exists, as after a first micro-batch
        y = side.forward(side.x)
        out[name] = harness.peak_memory_bytes(lambda: y.backward(side.dy), device)
        del ours, theirs, side, y
    return out


def forward_backward_memory(s: harness.Settings, chainrule) -> list[dict]:
    """Peak bytes of one forward+backward (parameters without .grad) per activation, chainrule
    against torch.nn.Linear + the activation; each result is checked against torch once first."""
    shape, dtypes = MEMORY_SHAPES[s.mode]
    rows = []
    for dtype_text in dtypes:
        dtype = harness.parse_dtype(dtype_text)
        for act in ACTIVATIONS:
            cfg = Config(*shape, dtype, act, ("fwd+bwd",))
            ours, theirs, _ = build_sides(cfg, s.device, chainrule)
            check = harness.guarded(lambda: check_config(ours, theirs, dtype))
            peaks = {}
            for name, side in (("chainrule", ours), ("torch eager", theirs)):
                side.reset_grads()
                peaks[name] = harness.peak_memory_bytes(
                    lambda side=side: side.forward(side.x).backward(side.dy), s.device)
            rows.append({"label": f"{cfg.shape} {harness.dtype_name(dtype)} {act} fwd+bwd",
                         "config": {"m": cfg.m, "k": cfg.k, "n": cfg.n,
                                    "dtype": harness.dtype_name(dtype), "activation": act,
                                    "device": str(s.device)},
                         "chainrule_bytes": peaks["chainrule"] if check.ok else None,
                         "baselines": {"torch eager": peaks["torch eager"]},
                         "note": "" if check.ok else "WRONG result: no figure reported"})
            del ours, theirs
    return rows


def run_config(cfg: Config, s: harness.Settings, peaks: dict, chainrule, flush) -> tuple[list, Optional[dict]]:
    ours, eager, reference = build_sides(cfg, s.device, chainrule)
    check = harness.guarded(lambda: check_config(ours, eager, cfg.dtype))
    sides = {"eager": eager}
    if "compile" in cfg.baselines:
        act = torch_activation(cfg.activation)
        compiled = torch.compile(lambda inp: act(reference(inp)), dynamic=False)
        sides["compile"] = Side(compiled, eager.params, eager.x, eager.dy)
    if "addmm_act" in cfg.baselines:
        use_gelu = cfg.activation == "gelu_tanh"
        w, b = reference.weight, reference.bias
        sides["addmm_act"] = Side(
            lambda inp: torch._addmm_activation(b, inp, w.t(), use_gelu=use_gelu), eager.params,
            eager.x, eager.dy)
    rows = []
    peak, peak_name = harness.peak_for(peaks, s.device, cfg.dtype, "flops")
    for pass_name in cfg.passes:
        contenders = [] if not check.ok else [ours.contender("chainrule", pass_name)]
        for name, side in sides.items():
            if name == "addmm_act" and pass_name != "fwd":
                continue  # torch._addmm_activation has no derivative
            contenders.append(side.contender(name, pass_name))
        cpu_times: dict = {}
        times = harness.measure(contenders, repeats=s.repeats, warmup=max(s.warmup, 1 if "compile" in sides else 0),
                                device=s.device, flush=flush, cpu_times=cpu_times)
        flops = FLOPS_PER_MNK[pass_name] * cfg.m * cfg.n * cfg.k
        rows.append(harness.make_row(
            subject="linear", label=f"{cfg.shape} {harness.dtype_name(cfg.dtype)} {cfg.activation} {pass_name}",
            size=float(cfg.m * cfg.n * cfg.k), times=times, check=check, work=flops,
            unit=harness.flops_unit(s.device), peak=peak, peak_name=peak_name,
            cpu_times=cpu_times, threads=s.threads,
            config={"m": cfg.m, "k": cfg.k, "n": cfg.n, "dtype": harness.dtype_name(cfg.dtype),
                    "activation": cfg.activation, "pass": pass_name, "device": str(s.device)},
            extra={"note": cfg.note,
                   "series": f"{harness.dtype_name(cfg.dtype)} {cfg.activation} {pass_name}"}))
    memory = None
    if cfg.memory and check.ok:
        memory = {"shape": cfg.shape, "dtype": harness.dtype_name(cfg.dtype),
                  "activation": cfg.activation, "peak_bytes": backward_memory(cfg, s.device, chainrule)}
    return rows, memory


def memory_lines(memory_rows: list[dict]) -> list[str]:
    if not memory_rows:
        return []
    lines = ["", "peak memory of a backward into existing .grad (MiB above the start):"]
    for m in memory_rows:
        cells = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in m["peak_bytes"].items())
        lines.append(f"  {m['shape']} {m['dtype']} {m['activation']}: {cells}")
    return lines


def main(argv=None) -> int:
    p = harness.parser(__doc__, shapes_help="comma-separated MxKxN, e.g. 4096x1024x4096,64x1024x1024",
                       default_dtypes="float32,bfloat16")
    p.add_argument("--activations", default=None,
                   help="comma-separated activations for --shapes (none, relu, gelu, gelu_tanh, "
                        "silu); default gelu")
    p.add_argument("--compile", action="store_true",
                   help="add the torch.compile baseline to every configuration (slow: it compiles)")
    args = p.parse_args(argv)
    s = harness.settings("linear", args)
    rows, memory_rows, peak_memory_rows = [], [], []
    if s.available:
        chainrule = harness.import_chainrule()
        peaks = harness.load_peaks(s)
        activations = (args.activations or "gelu").split(",") if args.shapes or args.activations \
            else list(ACTIVATIONS)
        for act in activations:
            if act not in ACTIVATIONS:
                raise SystemExit(f"--activations: unknown activation {act!r}")
        shapes = harness.parse_shapes(args.shapes, 3) if args.shapes else None
        flush = harness.CacheFlusher(s.device) if s.mode != "smoke" else None
        for cfg in harness.progress(configs(s, shapes, activations, args.compile), s, "linear"):
            new_rows, memory = run_config(cfg, s, peaks, chainrule, flush)
            rows.extend(new_rows)
            if memory:
                memory_rows.append(memory)
        if not args.shapes:
            peak_memory_rows = forward_backward_memory(s, chainrule)
    else:
        peaks = None
    harness.write_results(s, rows, peaks=peaks,
                          extra={"memory": memory_rows, "peak_memory": peak_memory_rows})
    if peak_memory_rows:
        print("\npeak memory of forward+backward, MiB allocated above the start "
              "(ratio = baseline / chainrule):")
        print("\n".join(harness.memory_table_lines(peak_memory_rows)))
    print("\n".join(memory_lines(memory_rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
