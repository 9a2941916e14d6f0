// Portability macros shared by the CPU kernels, the CUDA kernels and the CUDA emulator.
//
// Everything in csrc/include/chainrule/ is compiled three ways: by the host C++ compiler for the
// CPU kernels, by nvcc for the GPU, and by the host compiler again for the emulated CUDA kernels.
// Math that must give the same bits on every backend uses explicit fma() calls and is compiled
// with -ffp-contract=off on the host (nvcc contracts a*b+c into an FMA on its own otherwise).
#pragma once

#if defined(__CUDACC__)
#define CHAINRULE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CHAINRULE_HOST_DEVICE inline __attribute__((always_inline))
#endif
