// ThreadSanitizer mode (built by tests/test_emulator.py with -fsanitize=thread, not part of the
// main test binary): the tiled GEMM without its trailing __syncthreads is reported as a data race
// on the shared tiles, at the lines that write and read them; the correct GEMM, the reduction and
// a cp.async pipeline are not reported. Usage: tsan_missing_sync correct|buggy
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/kernels/reference_gemm.cuh"
#include "cuda/kernels/reference_reduce.cuh"

namespace emu = chainrule::emu;
namespace ref = chainrule::cuda::reference;
namespace port = chainrule::port;

namespace {

template <bool Bug>
__global__ void gemm(const float* a, const float* b, float* c, int n) {
  __shared__ float a_tile[32][33];
  __shared__ float b_tile[32][33];
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  const int row0 = static_cast<int>(blockIdx.y) * 32, col0 = static_cast<int>(blockIdx.x) * 32;
  float acc[8] = {};
  for (int k0 = 0; k0 < n; k0 += 32) {
    for (int i = 0; i < 8; ++i) {
      a_tile[ty * 8 + i][tx] = a[(row0 + ty * 8 + i) * n + k0 + tx];  // TILE_WRITE
      b_tile[ty * 8 + i][tx] = b[(k0 + ty * 8 + i) * n + col0 + tx];
    }
    __syncthreads();
    for (int kk = 0; kk < 32; ++kk)
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(a_tile[ty * 8 + i][kk], b_tile[kk][tx], acc[i]);  // TILE_READ
    if constexpr (!Bug) __syncthreads();
  }
  for (int i = 0; i < 8; ++i) c[(row0 + ty * 8 + i) * n + col0 + tx] = acc[i];
}

__global__ void pipeline(const float* source, float* out) {
  __shared__ __align__(16) float stage[2][128];
  const int t = static_cast<int>(threadIdx.x);
  for (int round = 0; round < 3; ++round) {
    port::cp_async<16>(&stage[round % 2][4 * t], source + 4 * t);
    port::cp_async_commit();
    port::cp_async_wait<0>();
    __syncthreads();
    out[t] += stage[round % 2][(4 * t + 9) % 128];
    __syncthreads();
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool buggy = argc > 1 && std::strcmp(argv[1], "buggy") == 0;
  const int n = 64;
  std::vector<float> a(n * n, 1.0f), b(n * n, 2.0f), c(n * n);
  if (buggy) {
    emu::launch("gemm<missing sync>", gemm<true>, dim3(2, 2), dim3(128), 0, a.data(), b.data(), c.data(), n);
  } else {
    emu::launch("gemm", gemm<false>, dim3(2, 2), dim3(128), 0, a.data(), b.data(), c.data(), n);
    emu::launch("tiled_gemm", ref::tiled_gemm, ref::gemm_grid(n, n), dim3(ref::kGemmThreads), 0,
                ref::GemmParams{a.data(), b.data(), c.data(), n, n, n});
    std::vector<float> partial(4), total(1);
    emu::launch("block_sum", ref::block_sum<256>, dim3(4), dim3(256), 0, ref::ReduceParams{a.data(), partial.data(), n * n});
    emu::launch("block_sum", ref::block_sum<128>, dim3(1), dim3(128), 0, ref::ReduceParams{partial.data(), total.data(), 4});
    std::vector<float> out(32, 0.0f);
    emu::launch("pipeline", pipeline, dim3(1), dim3(32), 0, a.data(), out.data());
    if (total[0] != n * n || out[0] != 3.0f) return 2;
  }
  std::printf("c[0] = %g (expected %g)\n", c[0], 2.0 * n);
  return 0;
}
