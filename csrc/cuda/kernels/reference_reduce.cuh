// Reference block reduction: out[block] = sum of the block's grid-stride slice of in[0 .. n).
// Warp shuffles reduce each warp, shared memory collects the warp sums, the first warp reduces
// those. Run with one block on the partial sums for a total. Kept as the emulator's yardstick for
// warp collectives plus barriers (tests/emu/test_reference.cpp); not used by the ops.
#pragma once

#include "cuda/port.cuh"

namespace chainrule::cuda::reference {

struct ReduceParams {
  const float* in;
  float* out;
  int n;
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) block_sum(ReduceParams p) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = kThreads / 32;
  __shared__ float warp_sums[kWarps];
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  float sum = 0.0f;
  for (int i = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x); i < p.n;
       i += static_cast<int>(gridDim.x) * kThreads) {
    sum += p.in[i];
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kWarps ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) p.out[blockIdx.x] = sum;
  }
}

}  // namespace chainrule::cuda::reference
