// The reference kernels as nvcc sees them: tests/test_emulator.py compiles this file for sm_80 and
// sm_90 (-cubin), so the source that runs under the emulator is proven to be real CUDA. The
// launchers below are the GPU way of running them (<<<>>>); the emulator's way is
// chainrule::emu::launch with the same grid, block and Params (tests/emu/test_reference.cpp).
#include "cuda/kernels/reference_gemm.cuh"
#include "cuda/kernels/reference_reduce.cuh"

namespace ref = chainrule::cuda::reference;

void launch_reference_gemm(const ref::GemmParams& p, cudaStream_t stream) {
  ref::tiled_gemm<<<ref::gemm_grid(p.m, p.n), ref::kGemmThreads, 0, stream>>>(p);
}

void launch_reference_reduce(const ref::ReduceParams& p, int blocks, cudaStream_t stream) {
  ref::block_sum<256><<<blocks, 256, 0, stream>>>(p);
  ref::block_sum<128><<<1, 128, 0, stream>>>(p);
}
