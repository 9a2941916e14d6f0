// cp.async (zero-fill, commit/wait groups, poison until landed), alignment checks, atomics under
// contention from many blocks on both workers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "cuda/port.cuh"

namespace emu = chainrule::emu;
namespace port = chainrule::port;

namespace {

// Thread t copies Bytes bytes of source[t*Bytes...] into shared memory with src_bytes = t % (Bytes+1).
template <int Bytes>
__global__ void cp_async_zero_fill(const unsigned char* source, unsigned char* out) {
  __shared__ __align__(16) unsigned char smem[32 * 16];
  const int t = static_cast<int>(threadIdx.x);
  port::cp_async<Bytes>(smem + t * Bytes, source + t * Bytes, t % (Bytes + 1));
  port::cp_async_commit();
  port::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < Bytes; ++i) out[t * Bytes + i] = smem[t * Bytes + i];
}

// Three groups of one 16-byte copy each; snapshots after wait<2>, wait<1>, wait<0>.
__global__ void cp_async_groups(const float* source, float* snapshots) {
  __shared__ __align__(16) float smem[3][4];
  for (int g = 0; g < 3; ++g) {
    port::cp_async<16>(smem[g], source + 4 * g);
    port::cp_async_commit();
  }
  port::cp_async<16>(smem[2], source + 12);  // issued after the last commit: in no group yet
  port::cp_async_wait<2>();
  std::memcpy(snapshots + 0, smem, sizeof smem);
  port::cp_async_wait<1>();
  std::memcpy(snapshots + 12, smem, sizeof smem);
  port::cp_async_wait<0>();
  std::memcpy(snapshots + 24, smem, sizeof smem);
  port::cp_async_commit();
  port::cp_async_wait<0>();
  std::memcpy(snapshots + 36, smem, sizeof smem);
}

__global__ void misaligned_cp_async(const float* source, int offset) {
  __shared__ __align__(16) float smem[8];
  port::cp_async<16>(smem + offset, source);
}
__global__ void misaligned_cp_async_source(const float* source) {
  __shared__ __align__(16) float smem[8];
  port::cp_async<8>(smem, source + 1);
}
__global__ void misaligned_ldmatrix(int offset_elements) {
  __shared__ __align__(16) uint16_t smem[8 * 8 * 2];
  uint32_t r[1];
  port::ldmatrix_x1(r, smem + (threadIdx.x % 8) * 8 + offset_elements);
}
__global__ void misaligned_vector(const float* data, float* out) {
  const float4 v = port::load_vector(reinterpret_cast<const float4*>(data + 2));
  out[0] = v.x;
}

__global__ void atomics_contention(int* int_sum, unsigned long long* wide_sum, float* float_sum, int* max_value,
                                   unsigned* unsigned_max, int* lock, int* protected_count) {
  const int id = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(int_sum, id % 7);
  atomicAdd(wide_sum, 1ull << 33);
  atomicAdd(float_sum, 1.0f);  // exact up to 2^24
  atomicMax(max_value, (id * 7919) % 100003);
  atomicMax(unsigned_max, static_cast<unsigned>(id));
  // a CAS spin lock across blocks: only one thread per block tries, so no intra-block deadlock
  if (threadIdx.x == 0) {
    while (atomicCAS(lock, 0, 1) != 0) {
    }
    *protected_count += 1;
    __threadfence();
    atomicExch(lock, 0);
  }
}

}  // namespace

template <int Bytes>
static void check_zero_fill() {
  std::vector<unsigned char> source(32 * Bytes), out(32 * Bytes, 0x55);
  for (size_t i = 0; i < source.size(); ++i) source[i] = static_cast<unsigned char>(i + 1);
  emu::launch("cp_async_zero_fill", cp_async_zero_fill<Bytes>, dim3(1), dim3(32), 0, source.data(), out.data());
  for (int t = 0; t < 32; ++t) {
    const int src_bytes = t % (Bytes + 1);
    for (int i = 0; i < Bytes; ++i) CHECK_EQ(static_cast<int>(out[t * Bytes + i]), i < src_bytes ? static_cast<int>(source[t * Bytes + i]) : 0);
  }
}

TEST(memory_cp_async_zero_fill_4) { check_zero_fill<4>(); }
TEST(memory_cp_async_zero_fill_8) { check_zero_fill<8>(); }
TEST(memory_cp_async_zero_fill_16) { check_zero_fill<16>(); }

TEST(memory_cp_async_group_waits) {
  std::vector<float> source(16), snapshots(48);
  for (int i = 0; i < 16; ++i) source[i] = static_cast<float>(i + 1);
  emu::launch("cp_async_groups", cp_async_groups, dim3(1), dim3(1), 0, source.data(), snapshots.data());
  auto landed = [&](int snapshot, int group) {
    for (int i = 0; i < 4; ++i)
      if (snapshots[snapshot * 12 + group * 4 + i] != source[group * 4 + i]) return false;
    return true;
  };
  auto poisoned = [&](int snapshot, int group) {
    for (int i = 0; i < 4; ++i)
      if (!std::isnan(snapshots[snapshot * 12 + group * 4 + i])) return false;
    return true;
  };
  CHECK(landed(0, 0) && poisoned(0, 1) && poisoned(0, 2));   // wait_group 2
  CHECK(landed(1, 0) && landed(1, 1) && poisoned(1, 2));     // wait_group 1
  CHECK(landed(2, 0) && landed(2, 1) && landed(2, 2));       // wait_group 0: the committed ones
  // the uncommitted copy into smem[2] lands only after its own commit + wait
  for (int i = 0; i < 4; ++i) CHECK_EQ(snapshots[36 + 8 + i], source[12 + i]);
}

TEST(memory_misaligned_addresses_are_errors) {
  std::vector<float> data(64);
  CHECK_THROWS(emu::launch("misaligned_cp_async", misaligned_cp_async, dim3(1), dim3(1), 0, data.data(), 1),
               "misaligned", "cp.async destination", "misaligned_cp_async", "block (0,0,0)", "thread (0,0,0)");
  CHECK_THROWS(emu::launch("misaligned_cp_async_source", misaligned_cp_async_source, dim3(1), dim3(1), 0, data.data()),
               "misaligned", "cp.async source");
  CHECK_THROWS(emu::launch("misaligned_ldmatrix", misaligned_ldmatrix, dim3(1), dim3(32), 0, 4), "misaligned",
               "ldmatrix");
  CHECK_THROWS(emu::launch("misaligned_vector", misaligned_vector, dim3(1), dim3(1), 0, data.data(), data.data()),
               "misaligned", "vector load");
  emu::launch("misaligned_ldmatrix", misaligned_ldmatrix, dim3(1), dim3(32), 0, 8);  // 16-byte aligned: fine
}

TEST(memory_atomics_under_contention) {
  const int blocks = 64, threads = 256;
  int int_sum = 0, max_value = -1, lock = 0, protected_count = 0;
  unsigned long long wide_sum = 0;
  float float_sum = 0;
  unsigned unsigned_max = 0;
  emu::launch("atomics_contention", atomics_contention, dim3(blocks), dim3(threads), 0, &int_sum, &wide_sum,
              &float_sum, &max_value, &unsigned_max, &lock, &protected_count);
  int expected_sum = 0, expected_max = -1;
  for (int id = 0; id < blocks * threads; ++id) {
    expected_sum += id % 7;
    expected_max = std::max(expected_max, (id * 7919) % 100003);
  }
  CHECK_EQ(int_sum, expected_sum);
  CHECK_EQ(wide_sum, static_cast<unsigned long long>(blocks * threads) << 33);
  CHECK_EQ(float_sum, static_cast<float>(blocks * threads));
  CHECK_EQ(max_value, expected_max);
  CHECK_EQ(unsigned_max, static_cast<unsigned>(blocks * threads - 1));
  CHECK_EQ(protected_count, blocks);
  CHECK_EQ(lock, 0);
}
