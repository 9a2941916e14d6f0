// Acceptance 2: bugs put in on purpose must be caught.
//   - a tiled GEMM without its trailing __syncthreads gives a wrong answer in some schedule order;
//   - cp.async.wait_group one too shallow reads poison;
//   - a barrier inside if (threadIdx.x < 64) is a deadlock error, not a hang;
//   - a half warp calling a full-mask shuffle is a mask error;
// plus the other divergence errors: barriers at different lines, lanes at different collectives.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/port.cuh"

namespace emu = chainrule::emu;
namespace port = chainrule::port;

namespace {

const emu::Schedule kOrders[] = {emu::Schedule::forward, emu::Schedule::reverse, emu::Schedule::random};

struct ScheduleGuard {  // restore the default order whatever a test does
  ~ScheduleGuard() { emu::set_schedule(emu::Schedule::forward, 0); }
};

// The reference tiled GEMM (csrc/cuda/kernels/reference_gemm.cuh) with the barrier after the
// compute step removed when Bug is true: a fast thread then overwrites the tiles that slower
// threads of its block are still reading.
template <bool Bug>
__global__ void gemm_maybe_missing_sync(const float* a, const float* b, float* c, int n) {
  __shared__ float a_tile[32][33];
  __shared__ float b_tile[32][33];
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  const int row0 = static_cast<int>(blockIdx.y) * 32, col0 = static_cast<int>(blockIdx.x) * 32;
  float acc[8] = {};
  for (int k0 = 0; k0 < n; k0 += 32) {
    for (int i = 0; i < 8; ++i) {
      const int r = ty * 8 + i;
      a_tile[r][tx] = a[(row0 + r) * n + k0 + tx];
      b_tile[r][tx] = b[(k0 + r) * n + col0 + tx];
    }
    __syncthreads();
    for (int kk = 0; kk < 32; ++kk)
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(a_tile[ty * 8 + i][kk], b_tile[kk][tx], acc[i]);
    if constexpr (!Bug) __syncthreads();
  }
  for (int i = 0; i < 8; ++i) c[(row0 + ty * 8 + i) * n + col0 + tx] = acc[i];
}

template <bool Bug>
double gemm_max_error(emu::Schedule order) {
  const int n = 64;
  std::vector<float> a(n * n), b(n * n), c(n * n);
  for (int i = 0; i < n * n; ++i) {
    a[i] = static_cast<float>((i * 37) % 11) - 5.0f;
    b[i] = static_cast<float>((i * 53) % 13) - 6.0f;
  }
  emu::set_schedule(order, 2024);
  emu::launch("gemm_maybe_missing_sync", gemm_maybe_missing_sync<Bug>, dim3(2, 2), dim3(128), 0, a.data(), b.data(),
              c.data(), n);
  double worst = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double expected = 0;
      for (int l = 0; l < n; ++l) expected += static_cast<double>(a[i * n + l]) * b[l * n + j];
      worst = std::max(worst, std::fabs(c[i * n + j] - expected));
    }
  return worst;
}

// A two-stage cp.async pipeline: stage s is loaded as group s; before reading stage 0 the kernel
// must wait until at most one group (stage 1) is in flight: wait_group<1>. Depth 2 is one too shallow.
template <int WaitDepth>
__global__ void pipeline(const float* source, float* out) {
  __shared__ __align__(16) float stage[2][128];
  const int t = static_cast<int>(threadIdx.x);
  for (int s = 0; s < 2; ++s) {
    port::cp_async<16>(&stage[s][4 * t], source + s * 128 + 4 * t);
    port::cp_async_commit();
  }
  port::cp_async_wait<WaitDepth>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = stage[0][(4 * t + 4 * i + 5) % 128];  // read others' copies too
  __syncthreads();  // nobody lands the rest of its copies before everybody has read
  port::cp_async_wait<0>();
}

__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
    out[threadIdx.x] = 1;
  }
}

__global__ void barrier_in_branch_then_barrier(int* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1;
  __syncthreads();  // threads 64.. reach this one while 0..63 wait at the first: divergent barriers
}

__global__ void half_warp_full_mask_shuffle(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_sync(0xffffffffu, v, 0);
  out[threadIdx.x] = v;
}

__global__ void half_warp_full_mask_then_barrier(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void mask_without_own_lane(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0);  // lanes 16..31 are not in their own mask
}

__global__ void different_collectives(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2 == 0) v = __shfl_down_sync(0xffffffffu, v, 1);
  else v = static_cast<int>(__ballot_sync(0xffffffffu, v > 3));
  out[threadIdx.x] = v;
}

__global__ void ldmatrix_in_half_warp(int* out) {
  __shared__ __align__(16) uint16_t smem[64];
  uint32_t r[1] = {0};
  if (threadIdx.x < 16) port::ldmatrix_x1(r, smem + (threadIdx.x % 8) * 8);
  out[threadIdx.x] = static_cast<int>(r[0]);
}

}  // namespace

TEST(bugs_missing_syncthreads_changes_the_answer) {
  ScheduleGuard guard;
  for (auto order : kOrders) CHECK_EQ(gemm_max_error<false>(order), 0.0);  // integers: exact
  int wrong_orders = 0;
  for (auto order : kOrders) wrong_orders += gemm_max_error<true>(order) > 0.5;
  std::printf("  missing __syncthreads: wrong in %d of 3 schedule orders\n", wrong_orders);
  CHECK(wrong_orders >= 1);
}

TEST(bugs_shallow_wait_group_reads_poison) {
  ScheduleGuard guard;
  std::vector<float> source(256), out(128);
  for (int i = 0; i < 256; ++i) source[i] = static_cast<float>(i);
  for (auto order : kOrders) {
    emu::set_schedule(order, 5);
    emu::launch("pipeline<1>", pipeline<1>, dim3(1), dim3(32), 0, source.data(), out.data());
    for (int t = 0; t < 32; ++t)
      for (int i = 0; i < 4; ++i) CHECK_EQ(out[4 * t + i], source[(4 * t + 4 * i + 5) % 128]);
    emu::launch("pipeline<2>", pipeline<2>, dim3(1), dim3(32), 0, source.data(), out.data());
    int poisoned = 0;
    for (float x : out) poisoned += std::isnan(x);
    CHECK_EQ(poisoned, 128);
  }
}

TEST(bugs_barrier_in_divergent_branch_is_a_deadlock_error) {
  ScheduleGuard guard;
  std::vector<int> out(128);
  for (auto order : kOrders) {
    emu::set_schedule(order, 9);
    CHECK_THROWS(emu::launch("barrier_in_branch", barrier_in_branch, dim3(3), dim3(128), 0, out.data()),
                 "deadlock", "barrier_in_branch", "block (0,0,0)", "thread (", "__syncthreads", "test_injected_bugs.cpp:");
    CHECK_THROWS(emu::launch("barrier_in_branch_then_barrier", barrier_in_branch_then_barrier, dim3(1), dim3(128), 0,
                             out.data()),
                 "barrier", "barrier_in_branch_then_barrier", "block (0,0,0)", "thread (");
  }
}

TEST(bugs_half_warp_full_mask_shuffle_is_a_mask_error) {
  ScheduleGuard guard;
  std::vector<int> out(64);
  for (auto order : kOrders) {
    emu::set_schedule(order, 3);
    CHECK_THROWS(emu::launch("half_warp_full_mask_shuffle", half_warp_full_mask_shuffle, dim3(2), dim3(64), 0,
                             out.data()),
                 "mask", "__shfl_sync", "half_warp_full_mask_shuffle", "block (0,0,0)", "thread (", "lane");
    CHECK_THROWS(emu::launch("half_warp_full_mask_then_barrier", half_warp_full_mask_then_barrier, dim3(1), dim3(64),
                             0, out.data()),
                 "mask", "half_warp_full_mask_then_barrier", "block (0,0,0)", "thread (");
  }
  CHECK_THROWS(emu::launch("mask_without_own_lane", mask_without_own_lane, dim3(1), dim3(32), 0, out.data()),
               "mask", "does not include the calling lane");
  CHECK_THROWS(emu::launch("different_collectives", different_collectives, dim3(1), dim3(32), 0, out.data()),
               "mask mismatch", "__shfl_down_sync", "__ballot_sync");
  CHECK_THROWS(emu::launch("ldmatrix_in_half_warp", ldmatrix_in_half_warp, dim3(1), dim3(32), 0, out.data()),
               "ldmatrix", "ldmatrix_in_half_warp");
}

TEST(bugs_errors_name_the_failing_block) {
  ScheduleGuard guard;
  std::vector<int> out(64 * 40);
  // every block fails; the error reported is the lowest block's, whichever worker finds it first
  CHECK_THROWS(emu::launch("half_warp_full_mask_shuffle", half_warp_full_mask_shuffle, dim3(40), dim3(64), 0,
                           out.data()),
               "block (0,0,0)");
}
