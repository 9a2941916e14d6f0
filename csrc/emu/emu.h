// chainrule's CUDA emulator: CUDA kernel source, compiled by the host compiler, run on the CPU.
//
// Kernel files include "cuda/port.cuh", which includes this header when the compiler is not nvcc.
// Host code launches a kernel with
//     chainrule::emu::launch("name", kernel, grid, block, dynamic_smem_bytes, args...);
// which runs the grid's blocks on worker threads and each block's threads as fibers, and throws
// chainrule::emu::Error for the bugs it detects (see ARCHITECTURE.md, "CUDA emulator").
//
//   emu/fiber.h          user-space context switch (x86-64 assembly, ucontext elsewhere)
//   emu/runtime.h        blocks, fibers, barriers, warp collectives, schedule orders, launch()
//   emu/builtins.h       __global__ & co., __syncthreads, shuffles, votes, atomics, intrinsics
//   emu/port_emulated.h  chainrule::port: cp.async, ldmatrix, mma.sync, dynamic_shared()
#pragma once

#if defined(__CUDACC__)
#error "emu/emu.h is the host-compiler side of cuda/port.cuh; nvcc uses the real PTX"
#endif

#include "emu/port_emulated.h"
