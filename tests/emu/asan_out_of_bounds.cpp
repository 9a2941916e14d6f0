// AddressSanitizer mode (built by tests/test_emulator.py with -fsanitize=address): an emulated kernel
// that reads past the end of a buffer, or past its dynamic shared memory, is reported at the kernel's
// line; correct kernels, including ones that throw, report nothing.
// Usage: asan_out_of_bounds correct|global|dynamic
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/kernels/reference_gemm.cuh"
#include "cuda/kernels/reference_reduce.cuh"

namespace emu = chainrule::emu;
namespace ref = chainrule::cuda::reference;

namespace {

__global__ void copy_with_tail_bug(const float* in, float* out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i <= n) out[i % n] = in[i];  // GLOBAL_OVERFLOW: i == n reads one past the end
}

__global__ void dynamic_smem_overflow(float* out, int floats) {
  float* smem = chainrule::port::dynamic_shared<float>();
  smem[threadIdx.x] = 1.0f;  // DYNAMIC_OVERFLOW: blockDim.x > floats
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x % floats];
}

__global__ void barrier_in_branch() {
  if (threadIdx.x < 16) __syncthreads();
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "correct";
  std::vector<float> in(100, 1.0f), out(128, 0.0f);
  if (std::strcmp(mode, "global") == 0) {
    emu::launch("copy_with_tail_bug", copy_with_tail_bug, dim3(4), dim3(32), 0, in.data(), out.data(), 100);
  } else if (std::strcmp(mode, "dynamic") == 0) {
    emu::launch("dynamic_smem_overflow", dynamic_smem_overflow, dim3(1), dim3(64), 32 * sizeof(float), out.data(), 32);
  } else {
    const int n = 48;
    std::vector<float> a(n * n, 1.0f), b(n * n, 2.0f), c(n * n);
    emu::launch("tiled_gemm", ref::tiled_gemm, ref::gemm_grid(n, n), dim3(ref::kGemmThreads), 0,
                ref::GemmParams{a.data(), b.data(), c.data(), n, n, n});
    std::vector<float> partial(4), total(1);
    emu::launch("block_sum", ref::block_sum<256>, dim3(4), dim3(256), 0, ref::ReduceParams{a.data(), partial.data(), n * n});
    emu::launch("block_sum", ref::block_sum<128>, dim3(1), dim3(128), 0, ref::ReduceParams{partial.data(), total.data(), 4});
    emu::launch("dynamic_smem_overflow", dynamic_smem_overflow, dim3(1), dim3(32), 32 * sizeof(float), out.data(), 32);
    bool caught = false;
    try {
      emu::launch("barrier_in_branch", barrier_in_branch, dim3(2), dim3(32), 0);
    } catch (const emu::Error&) {
      caught = true;
    }
    if (c[0] != 2.0f * n || total[0] != n * n || !caught) return 2;
  }
  std::printf("done\n");
  return 0;
}
