// Warp collectives against the CUDA/PTX semantics, lane by lane: shuffles in every mode at widths
// 1..32 with per-lane arguments, partial masks, votes, __syncwarp, 64-bit and 16-bit payloads.
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "cuda/port.cuh"

namespace emu = chainrule::emu;

namespace {

enum Mode { kIdx, kUp, kDown, kXor };

struct ShuffleArgs {
  int mode;
  int width;
  unsigned mask;
  int arg_base;  // lane L passes (arg_base + 5 * L) % arg_mod as its srcLane / delta / laneMask
  int arg_mod;
};

inline int lane_arg(const ShuffleArgs& a, int lane) { return (a.arg_base + 5 * lane) % a.arg_mod; }

__global__ void shuffle_kernel(ShuffleArgs a, int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (!(a.mask >> lane & 1u)) return;
  const int value = 1000 * static_cast<int>(threadIdx.x / 32) + lane;
  const int arg = lane_arg(a, lane);
  int result = -1;
  switch (a.mode) {
    case kIdx: result = __shfl_sync(a.mask, value, arg, a.width); break;
    case kUp: result = __shfl_up_sync(a.mask, value, static_cast<unsigned>(arg), a.width); break;
    case kDown: result = __shfl_down_sync(a.mask, value, static_cast<unsigned>(arg), a.width); break;
    case kXor: result = __shfl_xor_sync(a.mask, value, arg, a.width); break;
  }
  out[threadIdx.x] = result;
}

// The source lane as the CUDA Programming Guide words it ("Warp Shuffle Functions"), written
// independently of the PTX formula the emulator uses.
int expected_source(int mode, int lane, int arg, int width) {
  const int segment = lane / width * width;
  switch (mode) {
    case kIdx: return segment + ((arg % width) + width) % width;
    case kUp: return lane % width >= arg ? lane - arg : lane;
    case kDown: return lane % width + arg < width ? lane + arg : lane;
    default: {  // later groups are out of reach, earlier ones are not
      const int source = lane ^ arg;
      return source < segment + width ? source : lane;
    }
  }
}

__global__ void vote_kernel(unsigned mask, unsigned* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (!(mask >> lane & 1u)) return;
  const int predicate = (lane * 7) % 5 == 1;
  out[threadIdx.x * 4 + 0] = __ballot_sync(mask, predicate);
  out[threadIdx.x * 4 + 1] = static_cast<unsigned>(__any_sync(mask, predicate));
  out[threadIdx.x * 4 + 2] = static_cast<unsigned>(__all_sync(mask, predicate || lane % 2 == 0));
  out[threadIdx.x * 4 + 3] = static_cast<unsigned>(__all_sync(mask, 1)) + 2u * static_cast<unsigned>(__any_sync(mask, 0));
}

__global__ void syncwarp_exchange(int* buffer, int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  __shared__ int slot[32];
  slot[lane] = lane * lane;
  __syncwarp();
  out[lane] = slot[31 - lane];
  __syncwarp(0x0000ffffu >> 0 << (lane < 16 ? 0 : 16));
  (void)buffer;
}

__global__ void wide_payloads(double* doubles, __half* halves, __nv_bfloat16* bfloats) {
  const int lane = static_cast<int>(threadIdx.x);
  doubles[lane] = __shfl_down_sync(0xffffffffu, 1.0e300 + lane, 1);
  halves[lane] = __shfl_xor_sync(0xffffffffu, __float2half(static_cast<float>(lane)), 3);
  bfloats[lane] = __shfl_sync(0xffffffffu, __float2bfloat16(static_cast<float>(lane)), 5, 8);
}

__global__ void reduce_partial_warp(int* out) {  // 48 threads: warp 1 has 16 real lanes
  int v = static_cast<int>(threadIdx.x) + 1;
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset, 16);
  out[threadIdx.x] = v;
  out[48 + threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 16);
}

}  // namespace

static void run_shuffles(unsigned mask) {
  for (int mode : {kIdx, kUp, kDown, kXor}) {
    for (int width : {1, 2, 4, 8, 16, 32}) {
      for (int arg_mod : {1, 3, 8, 17, 33}) {
        ShuffleArgs a{mode, width, mask, 2, arg_mod};
        std::vector<int> out(64, -1);
        emu::launch("shuffle_kernel", shuffle_kernel, dim3(1), dim3(64), 0, a, out.data());
        for (int t = 0; t < 64; ++t) {
          const int lane = t % 32, warp = t / 32;
          if (!(mask >> lane & 1u)) continue;
          const int source = expected_source(mode, lane, lane_arg(a, lane) % 32, width);
          const int expected = (mask >> source & 1u) ? 1000 * warp + source : -1;  // -1: poison
          if (out[t] != expected) {
            CHECK_EQ(out[t], expected);
            std::printf("  mode %d width %d lane %d arg %d mask %08x\n", mode, width, lane, lane_arg(a, lane), mask);
          }
        }
      }
    }
  }
}

TEST(warp_shuffle_all_modes_and_widths) { run_shuffles(0xffffffffu); }

TEST(warp_shuffle_partial_mask_reads_poison_outside) { run_shuffles(0x00ffff0fu); }

TEST(warp_votes) {
  for (unsigned mask : {0xffffffffu, 0x0000ffffu, 0xf0f0f0f0u, 0x00000001u}) {
    std::vector<unsigned> out(64 * 4, 12345);
    emu::launch("vote_kernel", vote_kernel, dim3(1), dim3(64), 0, mask, out.data());
    unsigned ballot = 0;
    bool all_even_or = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      const bool predicate = (lane * 7) % 5 == 1;
      if (predicate) ballot |= 1u << lane;
      all_even_or = all_even_or && (predicate || lane % 2 == 0);
    }
    for (int t = 0; t < 64; ++t) {
      if (!(mask >> (t % 32) & 1u)) {
        CHECK_EQ(out[t * 4], 12345u);
        continue;
      }
      CHECK_EQ(out[t * 4 + 0], ballot);
      CHECK_EQ(out[t * 4 + 1], ballot != 0 ? 1u : 0u);
      CHECK_EQ(out[t * 4 + 2], all_even_or ? 1u : 0u);
      CHECK_EQ(out[t * 4 + 3], 1u);
    }
  }
}

TEST(warp_syncwarp) {
  std::vector<int> out(32);
  emu::launch("syncwarp_exchange", syncwarp_exchange, dim3(1), dim3(32), 0, nullptr, out.data());
  for (int lane = 0; lane < 32; ++lane) CHECK_EQ(out[lane], (31 - lane) * (31 - lane));
}

TEST(warp_shuffle_payload_types) {
  std::vector<double> doubles(32);
  std::vector<__half> halves(32);
  std::vector<__nv_bfloat16> bfloats(32);
  emu::launch("wide_payloads", wide_payloads, dim3(1), dim3(32), 0, doubles.data(), halves.data(), bfloats.data());
  for (int lane = 0; lane < 32; ++lane) {
    CHECK_EQ(doubles[lane], 1.0e300 + (lane < 31 ? lane + 1 : lane));
    CHECK_EQ(__half2float(halves[lane]), static_cast<float>(lane ^ 3));
    CHECK_EQ(__bfloat162float(bfloats[lane]), static_cast<float>(lane / 8 * 8 + 5));
  }
}

TEST(warp_partial_last_warp) {
  std::vector<int> out(96);
  emu::launch("reduce_partial_warp", reduce_partial_warp, dim3(1), dim3(48), 0, out.data());
  for (int t = 0; t < 48; ++t) {
    if (t % 16 == 0) {
      int sum = 0;
      for (int j = t; j < t + 16; ++j) sum += j + 1;
      CHECK_EQ(out[t], sum);
    }
    // lanes 16..31 of warp 1 do not exist: reading them gives poison, like a lane outside the mask
    const int lane = t % 32;
    const int expected = lane < 16 ? (t < 32 ? t + 16 : -1) : t;
    CHECK_EQ(out[48 + t], expected);
  }
}
