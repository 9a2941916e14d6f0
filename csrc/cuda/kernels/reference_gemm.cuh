// Reference fp32 tiled GEMM, C (m x n) = A (m x k) · B (k x n), all row-major: the textbook
// shared-memory kernel, kept as the emulator's yardstick (correctness against fp64 and the cost of
// one emulated GEMM; see tests/emu/test_reference.cpp). Not used by the ops.
//
// A block computes a 32x32 tile of C with 128 threads: thread (tx = t % 32, ty = t / 32) owns
// column tx and rows 8*ty .. 8*ty+7. Each step stages a 32x32 tile of A and of B in shared memory
// (rows padded to 33 floats against bank conflicts), zero-filled past the matrix edges.
// fmaf() makes the result bit-identical on the GPU and under the emulator (nvcc would contract
// a*b+c on its own; the host build uses -ffp-contract=off).
#pragma once

#include <cmath>

#include "cuda/port.cuh"

namespace chainrule::cuda::reference {

struct GemmParams {
  const float* a;
  const float* b;
  float* c;
  int m, n, k;
};

inline constexpr int kGemmTile = 32;
inline constexpr int kGemmThreads = 128;
inline constexpr int kGemmRowsPerThread = kGemmTile * kGemmTile / kGemmThreads;

__global__ void __launch_bounds__(kGemmThreads) tiled_gemm(GemmParams p) {
  __shared__ float a_tile[kGemmTile][kGemmTile + 1];
  __shared__ float b_tile[kGemmTile][kGemmTile + 1];
  const int tx = static_cast<int>(threadIdx.x) % kGemmTile;
  const int ty = static_cast<int>(threadIdx.x) / kGemmTile;
  const int row0 = static_cast<int>(blockIdx.y) * kGemmTile;
  const int col0 = static_cast<int>(blockIdx.x) * kGemmTile;
  float acc[kGemmRowsPerThread] = {};
  for (int k0 = 0; k0 < p.k; k0 += kGemmTile) {
    for (int i = 0; i < kGemmRowsPerThread; ++i) {
      const int r = ty * kGemmRowsPerThread + i;
      a_tile[r][tx] = (row0 + r < p.m && k0 + tx < p.k) ? p.a[(row0 + r) * p.k + k0 + tx] : 0.0f;
      b_tile[r][tx] = (k0 + r < p.k && col0 + tx < p.n) ? p.b[(k0 + r) * p.n + col0 + tx] : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kGemmTile; ++kk) {
      const float b = b_tile[kk][tx];
      for (int i = 0; i < kGemmRowsPerThread; ++i) acc[i] = fmaf(a_tile[ty * kGemmRowsPerThread + i][kk], b, acc[i]);
    }
    __syncthreads();  // the next step overwrites the tiles
  }
  for (int i = 0; i < kGemmRowsPerThread; ++i) {
    const int row = row0 + ty * kGemmRowsPerThread + i, col = col0 + tx;
    if (row < p.m && col < p.n) p.c[row * p.n + col] = acc[i];
  }
}

inline dim3 gemm_grid(int m, int n) {
  return dim3(static_cast<unsigned>((n + kGemmTile - 1) / kGemmTile), static_cast<unsigned>((m + kGemmTile - 1) / kGemmTile));
}

}  // namespace chainrule::cuda::reference
