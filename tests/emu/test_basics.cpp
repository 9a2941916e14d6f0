// Launch geometry, built-in variables, shared memory, block barriers, launch errors, schedules.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "cuda/port.cuh"

namespace emu = chainrule::emu;

namespace {

struct Geometry {
  unsigned thread[3], block[3], block_dim[3], grid_dim[3];
};

__global__ void record_geometry(Geometry* out) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  __syncthreads();  // threadIdx must survive a switch
  Geometry& g = out[block * threads + thread];
  g = Geometry{{threadIdx.x, threadIdx.y, threadIdx.z}, {blockIdx.x, blockIdx.y, blockIdx.z},
               {blockDim.x, blockDim.y, blockDim.z}, {gridDim.x, gridDim.y, gridDim.z}};
}

__global__ void reverse_in_block(const int* in, int* out) {
  __shared__ int tile[256];
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  tile[threadIdx.x] = in[i];
  __syncthreads();
  out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void read_dynamic_smem(unsigned char* out, int bytes, uintptr_t* address) {
  unsigned char* smem = chainrule::port::dynamic_shared<unsigned char>();
  if (threadIdx.x == 0 && blockIdx.x == 0) *address = reinterpret_cast<uintptr_t>(smem);
  // every block must see poison, whatever the previous block on this worker wrote
  for (int i = static_cast<int>(threadIdx.x); i < bytes; i += static_cast<int>(blockDim.x))
    out[blockIdx.x * static_cast<unsigned>(bytes) + static_cast<unsigned>(i)] = smem[i];
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < bytes; i += static_cast<int>(blockDim.x)) smem[i] = 7;
}

__global__ void barrier_reductions(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  out[0 * 128 + t] = __syncthreads_count(t % 3 == 0);
  out[1 * 128 + t] = __syncthreads_and(t < 1000);
  out[2 * 128 + t] = __syncthreads_and(t != 77);
  out[3 * 128 + t] = __syncthreads_or(t == 77);
  out[4 * 128 + t] = __syncthreads_or(0);
}

__global__ void throw_in_thread(int which) {
  if (static_cast<int>(threadIdx.x) == which) throw std::runtime_error("kernel-side failure");
  __syncthreads();
}

struct Big {
  float values[512];
};
__global__ void takes_params(Big big, float* out) { out[threadIdx.x] = big.values[threadIdx.x]; }

__global__ void ticket_order(int* counter, int* ticket) {
  __syncthreads();
  ticket[threadIdx.x] = atomicAdd(counter, 1);
}

}  // namespace

TEST(basics_geometry_3d) {
  const dim3 grid(3, 2, 2), block(4, 3, 5);
  const unsigned threads = 4 * 3 * 5, blocks = 3 * 2 * 2;
  std::vector<Geometry> out(threads * blocks);
  emu::launch("record_geometry", record_geometry, grid, block, 0, out.data());
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 2; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned tz = 0; tz < 5; ++tz)
          for (unsigned ty = 0; ty < 3; ++ty)
            for (unsigned tx = 0; tx < 4; ++tx) {
              const Geometry& g = out[(bx + 3 * (by + 2 * bz)) * threads + tx + 4 * (ty + 3 * tz)];
              CHECK(g.thread[0] == tx && g.thread[1] == ty && g.thread[2] == tz);
              CHECK(g.block[0] == bx && g.block[1] == by && g.block[2] == bz);
              CHECK(g.block_dim[0] == 4 && g.block_dim[1] == 3 && g.block_dim[2] == 5);
              CHECK(g.grid_dim[0] == 3 && g.grid_dim[1] == 2 && g.grid_dim[2] == 2);
            }
}

TEST(basics_static_shared_and_syncthreads) {
  const int blocks = 37, threads = 256;
  std::vector<int> in(blocks * threads), out(in.size(), -1);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 + 1);
  for (auto order : {emu::Schedule::forward, emu::Schedule::reverse, emu::Schedule::random}) {
    emu::set_schedule(order, 11);
    emu::launch("reverse_in_block", reverse_in_block, dim3(blocks), dim3(threads), 0, in.data(), out.data());
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t) CHECK_EQ(out[b * threads + t], in[b * threads + threads - 1 - t]);
  }
  emu::set_schedule(emu::Schedule::forward, 0);
}

TEST(basics_dynamic_shared_poisoned_and_aligned) {
  const int bytes = 1000, blocks = 8;
  std::vector<unsigned char> out(static_cast<size_t>(bytes) * blocks, 0);
  uintptr_t address = 1;
  emu::launch("read_dynamic_smem", read_dynamic_smem, dim3(blocks), dim3(64), bytes, out.data(), bytes, &address);
  for (unsigned char byte : out) CHECK_EQ(static_cast<int>(byte), 0xff);
  CHECK_EQ(address % 16, 0u);
  float as_float;
  std::memcpy(&as_float, out.data(), 4);
  CHECK(as_float != as_float);  // the poison reads as NaN
}

TEST(basics_syncthreads_count_and_or) {
  std::vector<int> out(5 * 128);
  emu::launch("barrier_reductions", barrier_reductions, dim3(1), dim3(128), 0, out.data());
  for (int t = 0; t < 128; ++t) {
    CHECK_EQ(out[0 * 128 + t], 43);  // multiples of 3 in [0, 128)
    CHECK_EQ(out[1 * 128 + t], 1);
    CHECK_EQ(out[2 * 128 + t], 0);
    CHECK_EQ(out[3 * 128 + t], 1);
    CHECK_EQ(out[4 * 128 + t], 0);
  }
}

TEST(basics_launch_count) {
  const uint64_t before = emu::launch_count();
  std::vector<int> in(64), out(64);
  emu::launch("reverse_in_block", reverse_in_block, dim3(1), dim3(64), 0, in.data(), out.data());
  emu::launch("reverse_in_block", reverse_in_block, dim3(1), dim3(64), 0, in.data(), out.data());
  CHECK_EQ(emu::launch_count(), before + 2);
}

TEST(basics_kernel_exception_rethrown_on_caller) {
  CHECK_THROWS(emu::launch("throw_in_thread", throw_in_thread, dim3(4), dim3(64), 0, 13), "kernel-side failure");
  // the emulator recovers: the next launch works
  std::vector<int> in(64, 5), out(64);
  emu::launch("reverse_in_block", reverse_in_block, dim3(1), dim3(64), 0, in.data(), out.data());
  CHECK_EQ(out[0], 5);
}

TEST(basics_launch_limits) {
  std::vector<float> out(1024);
  Big big{};
  CHECK_THROWS(emu::launch("takes_params", takes_params, dim3(1), dim3(1025), 0, big, out.data()), "takes_params",
               "invalid block");
  CHECK_THROWS(emu::launch("takes_params", takes_params, dim3(1), dim3(8, 8, 65), 0, big, out.data()),
               "invalid block");
  CHECK_THROWS(emu::launch("takes_params", takes_params, dim3(0), dim3(32), 0, big, out.data()), "invalid grid");
  CHECK_THROWS(emu::launch("takes_params", takes_params, dim3(1), dim3(32), 300 * 1024, big, out.data()),
               "dynamic shared memory");
  for (int i = 0; i < 512; ++i) big.values[i] = static_cast<float>(i);
  emu::launch("takes_params", takes_params, dim3(1), dim3(512), 0, big, out.data());
  CHECK_EQ(out[511], 511.0f);
}

// A GPU launches a kernel with more than 48 KiB of dynamic shared memory only after
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); so must the
// emulator, or a kernel that forgets the opt-in passes here and fails on the device.
__global__ void fills_dynamic_shared(int bytes, int* out) {
  unsigned char* smem = chainrule::port::dynamic_shared<unsigned char>();
  for (int i = static_cast<int>(threadIdx.x); i < bytes; i += static_cast<int>(blockDim.x)) smem[i] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i < bytes; ++i) sum += smem[i];
    *out = sum;
  }
}

TEST(basics_dynamic_shared_memory_opt_in) {
  int out = 0;
  emu::launch("fills_dynamic_shared", fills_dynamic_shared, dim3(1), dim3(64), 48 * 1024, 48 * 1024, &out);
  CHECK_EQ(out, 48 * 1024);
  CHECK_THROWS(emu::launch("fills_dynamic_shared", fills_dynamic_shared, dim3(1), dim3(64), 48 * 1024 + 16,
                           48 * 1024 + 16, &out),
               "fills_dynamic_shared", "did not opt in");
  CHECK_THROWS(emu::set_max_dynamic_shared_memory(fills_dynamic_shared, 228 * 1024), "maximum of sm_90");
  emu::set_max_dynamic_shared_memory(fills_dynamic_shared, 100 * 1024);
  emu::launch("fills_dynamic_shared", fills_dynamic_shared, dim3(1), dim3(64), 100 * 1024, 100 * 1024, &out);
  CHECK_EQ(out, 100 * 1024);
  CHECK_THROWS(emu::launch("fills_dynamic_shared", fills_dynamic_shared, dim3(1), dim3(64), 100 * 1024 + 16,
                           100 * 1024 + 16, &out),
               "opted in to");
}

TEST(basics_schedule_orders) {
  std::vector<int> ticket(128);
  int counter = 0;
  emu::set_schedule(emu::Schedule::forward, 0);
  emu::launch("ticket_order", ticket_order, dim3(1), dim3(128), 0, &counter, ticket.data());
  for (int t = 0; t < 128; ++t) CHECK_EQ(ticket[t], t);
  counter = 0;
  emu::set_schedule(emu::Schedule::reverse, 0);
  emu::launch("ticket_order", ticket_order, dim3(1), dim3(128), 0, &counter, ticket.data());
  for (int t = 0; t < 128; ++t) CHECK_EQ(ticket[t], 127 - t);
  std::vector<int> first(128), second(128), other(128);
  for (auto* result : {&first, &second}) {
    counter = 0;
    emu::set_schedule(emu::Schedule::random, 1234);
    emu::launch("ticket_order", ticket_order, dim3(1), dim3(128), 0, &counter, result->data());
  }
  counter = 0;
  emu::set_schedule(emu::Schedule::random, 99);
  emu::launch("ticket_order", ticket_order, dim3(1), dim3(128), 0, &counter, other.data());
  CHECK(first == second);  // a seed names one order
  CHECK(first != other);
  std::vector<int> sorted = first;
  std::sort(sorted.begin(), sorted.end());
  for (int t = 0; t < 128; ++t) CHECK_EQ(sorted[t], t);  // a permutation
  bool monotone = true;
  for (int t = 1; t < 128; ++t) monotone = monotone && first[t] > first[t - 1];
  CHECK(!monotone);
  emu::set_schedule(emu::Schedule::forward, 0);
}

TEST(basics_schedule_parsing) {
  emu::Schedule order;
  uint64_t seed;
  emu::detail::parse_schedule("reverse", order, seed);
  CHECK(order == emu::Schedule::reverse && seed == 0);
  emu::detail::parse_schedule("random:42", order, seed);
  CHECK(order == emu::Schedule::random && seed == 42);
  emu::detail::parse_schedule("forward", order, seed);
  CHECK(order == emu::Schedule::forward);
  CHECK_THROWS(emu::detail::parse_schedule("sideways", order, seed), "CHAINRULE_EMU_SCHEDULE");
  CHECK_THROWS(emu::detail::parse_schedule("random:x", order, seed), "seed");
}

TEST(basics_builtins_outside_kernel) {
  CHECK_THROWS(__syncthreads(), "outside a kernel");
}

namespace {
__global__ void nested_launch(int* out) {
  emu::launch("reverse_in_block", reverse_in_block, dim3(1), dim3(1), 0, out, out);
}
}  // namespace

TEST(basics_launch_inside_kernel_is_an_error) {
  int value = 0;
  CHECK_THROWS(emu::launch("nested_launch", nested_launch, dim3(1), dim3(1), 0, &value), "dynamic parallelism");
}
