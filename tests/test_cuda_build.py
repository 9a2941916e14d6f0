"""The CUDA linear kernels as the GPU will run them: resource usage and instructions.

A small translation unit instantiates every kernel of the linear layer through the same launch
planning the extension uses (csrc/cuda/linear_plan.h: announce_every_kernel) and is compiled by
nvcc for sm_80 and sm_90 with `-Xptxas -v`. From ptxas' report and the host side's record of each
kernel's block size and dynamic shared memory, the tests check that no kernel spills registers and
that every kernel fits at least one block per SM on sm_90 (64K registers, 228 KB shared memory);
they print the occupancy of each. The sm_90 SASS (cuobjdump, from the PyPI package
nvidia-cuda-cuobjdump or the toolkit) must show tensor-core MMAs (HMMA) fed by ldmatrix (LDSM) in
the bfloat16/float16 GEMMs, and asynchronous global->shared copies (LDGSTS) in every GEMM pipeline.

Nothing runs on a GPU: the host program that reports the launch configurations only records them.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")

# Per-SM limits: registers, shared memory (per SM, max per block), threads, blocks; and the shared
# memory the runtime reserves per block (CUDA C++ Programming Guide, "Compute Capabilities").
SM_LIMITS = {
    "sm_80": dict(registers=65536, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
                  threads=2048, blocks=32, reserved_smem=1024),
    "sm_90": dict(registers=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
                  threads=2048, blocks=32, reserved_smem=1024),
}

INSTANTIATION_SOURCE = r"""
// Every kernel of the linear layer, instantiated through the extension's own launch planning.
#include <cstdio>
#include "cuda/linear_plan.h"

struct Record {
  template <typename Params>
  void operator()(const char* name, void (*)(Params), dim3, dim3 block, size_t smem,
                  const Params&) const {
    std::printf("KERNEL %s %u %zu\n", name, block.x * block.y * block.z, smem);
  }
};

int main() {
  Record record;
  chainrule::linear_plan::announce_every_kernel(record);
  return 0;
}
"""


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc"] + sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"),
                                                        reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _find_cuobjdump(nvcc: str | None) -> str | None:
    try:  # the PyPI wheel nvidia-cuda-cuobjdump installs into the `nvidia` namespace package
        import nvidia  # noqa: PLC0415
        for root in nvidia.__path__:
            found = sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump")))
            if found:
                return found[0]
    except ImportError:
        pass
    if nvcc and os.access(os.path.join(os.path.dirname(nvcc), "cuobjdump"), os.X_OK):
        return os.path.join(os.path.dirname(nvcc), "cuobjdump")
    return shutil.which("cuobjdump")


def _find_nvdisasm(nvcc: str | None, cuobjdump: str) -> str | None:
    """cuobjdump -sass runs nvdisasm, which the cuobjdump wheel does not ship; the toolkit, the
    nvidia-cuda-nvdisasm wheel or triton's bundled copy (a dependency of CUDA torch) serve."""
    places = [os.path.dirname(cuobjdump)]
    if nvcc:
        places.append(os.path.dirname(nvcc))
    try:
        import nvidia  # noqa: PLC0415
        places += [os.path.join(root, "*", "bin") for root in nvidia.__path__]
    except ImportError:
        pass
    try:
        import triton  # noqa: PLC0415
        places.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    for place in places:
        for found in sorted(glob.glob(os.path.join(place, "nvdisasm"))):
            if os.access(found, os.X_OK):
                return found
    return shutil.which("nvdisasm")


@dataclasses.dataclass
class Kernel:
    mangled: str
    arch: str
    family: str       # linear_gemm_tensor_core_kernel, ...
    dtype: str        # float64 | float32 | bfloat16 | float16
    registers: int = 0
    static_smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


_DTYPE_CODES = {"13__nv_bfloat16": "bfloat16", "6__half": "float16", "f": "float32", "d": "float64"}
_KERNEL_RE = re.compile(r"\d+(linear_\w+?_kernel)I(13__nv_bfloat16|6__half|f|d)")


def _parse_ptxas(report: str) -> list[Kernel]:
    kernels: dict[tuple[str, str], Kernel] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            name, arch = m.groups()
            k = _KERNEL_RE.search(name)
            assert k, f"unexpected kernel {name}"
            current = kernels.setdefault((name, arch), Kernel(name, arch, k.group(1),
                                                              _DTYPE_CODES[k.group(2)]))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.static_smem = int(s.group(1)) if s else 0
    return list(kernels.values())


_ROLES = {(0, 0): "forward", (0, 1): "grad_input", (1, 1): "grad_weight"}
_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
_STORES = ("store", "accumulate", "split-K slice")


def _label(kernels: list[Kernel]) -> dict[str, str]:
    """A readable name per kernel: family<dtype> and, for GEMMs, role / activation / store."""
    demangled = {}
    cxxfilt = shutil.which("c++filt")
    names = sorted({k.mangled for k in kernels})
    if cxxfilt:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        demangled = dict(zip(names, out.stdout.splitlines()))
    labels = {}
    for k in kernels:
        label = f"{k.family}<{k.dtype}>"
        d = demangled.get(k.mangled, "")
        g = re.search(r"Major\)(\d), \(chainrule::kernels::Major\)(\d), \(chainrule::Activation\)(\d),"
                      r" \(chainrule::kernels::Store\)(\d)", d)
        if g:
            a, b, act, store = map(int, g.groups())
            label += f" {_ROLES[(a, b)]} {_ACTIVATIONS[act]} {_STORES[store]}"
        g = re.search(r"linear_bias_grad_kernel<[^,]+, \(chainrule::Activation\)(\d)>", d)
        if g:
            label += f" {_ACTIVATIONS[int(g.group(1))]}"
        labels[k.mangled] = label
    return labels


def _blocks_per_sm(arch: str, registers: int, threads: int, smem: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them."""
    lim = SM_LIMITS[arch]
    warps = (threads + 31) // 32
    # Registers are allocated per warp in units of 256.
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = (lim["registers"] // regs_per_warp) // warps
    by_smem = lim["smem_per_sm"] // (smem + lim["reserved_smem"]) if smem else lim["blocks"]
    if smem > lim["smem_per_block"]:
        by_smem = 0
    by_threads = lim["threads"] // threads
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads,
              "blocks": lim["blocks"]}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled here")
    out = tmp_path_factory.mktemp("cuda_build")
    source = out / "linear_kernels.cu"
    source.write_text(INSTANTIATION_SOURCE)
    exe = out / "linear_kernels"
    cmd = [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
           "-I", str(REPO / "csrc"), "-I", str(REPO / "csrc" / "include"), str(source), "-o", str(exe)]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-6000:]}"
    kernels = _parse_ptxas(proc.stderr)
    # The host half records each kernel's block size and dynamic shared memory; it never touches a
    # GPU, so it runs anywhere.
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    launch = {}
    for line in run.stdout.splitlines():
        _, name, threads, smem = line.split()
        launch[name] = (int(threads), int(smem))
    return dict(nvcc=nvcc, exe=exe, kernels=kernels, launch=launch)


def test_every_kernel_compiles_for_every_arch(build):
    families = {(k.family, k.dtype, k.arch) for k in build["kernels"]}
    for arch in ARCHS:
        for dtype in ("bfloat16", "float16"):
            assert ("linear_gemm_tensor_core_kernel", dtype, arch) in families
        for dtype in ("float32", "float64"):
            assert ("linear_gemm_simt_kernel", dtype, arch) in families
    # Instantiations stay in check: 9 GEMMs per dtype (5 forward activations, grad_input,
    # grad_weight store / accumulate / split-K slice), the split-K reduction, 5 + 1 bias-gradient
    # kernels.
    per_arch = [k for k in build["kernels"] if k.arch == "sm_90"]
    assert len(per_arch) == 4 * (9 + 1 + 6), len(per_arch)


def test_no_spills_and_at_least_one_block_per_sm(build):
    rows = []
    failures = []
    labels = _label(build["kernels"])
    for k in sorted(build["kernels"], key=lambda k: (k.arch, labels[k.mangled])):
        threads, dynamic_smem = build["launch"][f"{k.family}<{k.dtype}>"]
        smem = k.static_smem + dynamic_smem
        blocks, limiter = _blocks_per_sm(k.arch, k.registers, threads, smem)
        occupancy = blocks * threads / SM_LIMITS[k.arch]["threads"]
        rows.append(f"{k.arch} {labels[k.mangled]:72s} regs {k.registers:3d} "
                    f"threads {threads} smem {smem:6d} B  spills {k.spill_stores}/{k.spill_loads}"
                    f"  blocks/SM {blocks} ({limiter})  occupancy {occupancy:.0%}")
        if k.spill_stores or k.spill_loads or k.stack:
            failures.append(f"{k.mangled} on {k.arch}: stack {k.stack}, spills "
                            f"{k.spill_stores}/{k.spill_loads} bytes")
        if k.arch == "sm_90":
            if k.registers * threads > SM_LIMITS["sm_90"]["registers"]:
                failures.append(f"{k.mangled}: {k.registers} registers x {threads} threads")
            if smem > 228 * 1024 or blocks < 1:
                failures.append(f"{k.mangled}: {smem} bytes of shared memory, {blocks} blocks/SM")
    print("\n" + "\n".join(rows))
    assert not failures, "\n".join(failures)


def test_sass_uses_tensor_cores_ldmatrix_and_cp_async(build):
    cuobjdump = _find_cuobjdump(build["nvcc"])
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    nvdisasm = _find_nvdisasm(build["nvcc"], cuobjdump)
    if nvdisasm is None:
        pytest.skip("nvdisasm not found (cuobjdump -sass needs it: pip install nvidia-cuda-nvdisasm)")
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(nvdisasm),
               PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", str(build["exe"])],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    functions: dict[str, str] = {}
    name = None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            name = m.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    gemms = {n: body for n, body in functions.items() if "linear_gemm" in n}
    assert len(gemms) == 4 * 9, sorted(functions)
    for n, body in gemms.items():
        family = _KERNEL_RE.search(n)
        if family.group(1) == "linear_gemm_tensor_core_kernel":
            assert "HMMA" in body, f"{n}: no HMMA (tensor-core MMA) in its SASS"
            assert "LDSM" in body, f"{n}: no LDSM (ldmatrix) in its SASS"
        assert "LDGSTS" in body, f"{n}: no LDGSTS (cp.async) in its SASS"
