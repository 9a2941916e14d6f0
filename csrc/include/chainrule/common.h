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

#include <cmath>

namespace chainrule {
namespace math {
// Overloads that pick the float function for float arguments on every compiler. An unqualified
// fma(float, float, float) can resolve to the C library's double fma on the host, which rounds
// differently from the device's fmaf; these never do.
CHAINRULE_HOST_DEVICE float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
CHAINRULE_HOST_DEVICE double fma(double a, double b, double c) { return ::fma(a, b, c); }
CHAINRULE_HOST_DEVICE float sqrt(float x) { return ::sqrtf(x); }
CHAINRULE_HOST_DEVICE double sqrt(double x) { return ::sqrt(x); }
CHAINRULE_HOST_DEVICE float erf(float x) { return ::erff(x); }
CHAINRULE_HOST_DEVICE double erf(double x) { return ::erf(x); }
CHAINRULE_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
CHAINRULE_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
CHAINRULE_HOST_DEVICE float exp(float x) { return ::expf(x); }
CHAINRULE_HOST_DEVICE double exp(double x) { return ::exp(x); }
}  // namespace math
}  // namespace chainrule
