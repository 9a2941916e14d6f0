// The CUDA language as the host compiler sees it under the emulator: the declaration specifiers,
// barriers, warp collectives (PTX shfl.sync / vote.sync / bar.warp.sync semantics), atomics and
// the handful of device intrinsics our kernels use.
//
// Every barrier and collective takes a defaulted std::source_location, so an error names the line
// of the kernel that made the call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "emu/runtime.h"

// ---------------------------------------------------------------------------------------------
// Declaration specifiers. CUDA's host_defines.h maps them to GNU attributes that g++ ignores;
// we make them plain C++. __shared__ becomes static thread_local: all fibers of a block run on one
// OS thread, and a worker runs one block at a time, so "one copy per block" is "one per thread".
// constinit, because CUDA allows no dynamic initialisation of shared memory either, and because
// without it g++ guards arrays of __half / __nv_bfloat16 with a per-thread "initialised" flag.
// (Write `__shared__ __align__(16) T x[..]` or `alignas(16) __shared__ T x[..]`; g++ rejects alignas
// after `static thread_local`.)

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local constinit
#define __constant__
#define __managed__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace chainrule::emu::detail {

inline Fiber& current_thread(const char* what) {
  if (t_fiber == nullptr)
    throw Error(std::string("chainrule::emu: ") + what + " called outside a kernel launched by chainrule::emu::launch");
  return *t_fiber;
}

inline void check_aligned(const void* address, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
    char text[160];
    std::snprintf(text, sizeof text, "misaligned address %p for %s (needs %zu-byte alignment)", address, what, alignment);
    if (t_fiber == nullptr) throw Error(std::string("chainrule::emu: ") + text);
    fail(text);
  }
}

template <typename T>
uint64_t to_bits(const T& value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));
  return value;
}

// PTX ISA, shfl.sync: c = ((32 - width) << 8) | clamp, with clamp 0 for .up and 31 otherwise.
// A lane that reads a lane outside the mask gets poison (all bits set): undefined on the GPU.
inline void complete_shuffle(Fiber* const* lanes, uint32_t participants) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(participants >> lane & 1u)) continue;
    WarpOp& op = lanes[lane]->op;
    const int segmask = (32 - op.width) & 31;
    const int clamp = op.kind == WarpKind::shfl_up ? 0 : 31;
    const int bval = op.arg & 31;
    const int max_lane = (lane & segmask) | (clamp & ~segmask);
    const int min_lane = lane & segmask;
    int source = lane;
    bool in_range = false;
    switch (op.kind) {
      case WarpKind::shfl_up: source = lane - bval; in_range = source >= max_lane; break;
      case WarpKind::shfl_down: source = lane + bval; in_range = source <= max_lane; break;
      case WarpKind::shfl_xor: source = lane ^ bval; in_range = source <= max_lane; break;
      default: source = min_lane | (bval & ~segmask & 31); in_range = source <= max_lane; break;
    }
    if (!in_range) source = lane;
    op.result = (participants >> source & 1u) ? lanes[source]->op.value : ~uint64_t{0};
  }
}

inline void complete_vote(Fiber* const* lanes, uint32_t participants) {
  uint32_t ballot = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if ((participants >> lane & 1u) && lanes[lane]->op.value != 0) ballot |= 1u << lane;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (!(participants >> lane & 1u)) continue;
    WarpOp& op = lanes[lane]->op;
    switch (op.kind) {
      case WarpKind::ballot: op.result = ballot; break;
      case WarpKind::any: op.result = ballot != 0; break;
      case WarpKind::all: op.result = ballot == participants; break;
      default: op.result = 0; break;
    }
  }
}

// __syncwarp: every participant learns which token each other participant released.
inline void complete_syncwarp(Fiber* const* lanes, uint32_t participants) {
  uint64_t parities = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((participants >> lane & 1u) && (lanes[lane]->syncwarps & 1u)) parities |= uint64_t{1} << lane;
  for (int lane = 0; lane < 32; ++lane)
    if (participants >> lane & 1u) lanes[lane]->op.result = parities;
}

inline WarpOp& begin_warp_op(WarpKind kind, uint32_t mask, WarpComplete complete, const std::source_location& site) {
  WarpOp& op = current_thread(warp_kind_name(kind)).op;
  op.kind = kind;
  op.variant = 0;
  op.mask = mask;
  op.complete = complete;
  op.site = site;
  return op;
}

template <typename T>
T shuffle(WarpKind kind, unsigned mask, const T& value, int arg, int width, const std::source_location& site) {
  InternalAccess internal;
  WarpOp& op = begin_warp_op(kind, mask, &complete_shuffle, site);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(warp_kind_name(kind)) + " (" + format_site(site) + "): width " + std::to_string(width) +
         " is not a power of two in [1, 32]");
  op.arg = arg;
  op.width = width;
  op.value = to_bits(value);
  warp_collective(false);
  return from_bits<T>(t_fiber->op.result);
}

inline uint64_t vote(WarpKind kind, unsigned mask, int predicate, const std::source_location& site) {
  InternalAccess internal;
  WarpOp& op = begin_warp_op(kind, mask, &complete_vote, site);
  op.value = predicate != 0;
  warp_collective(false);
  return t_fiber->op.result;
}

inline int block_barrier(BarrierKind kind, int predicate, const std::source_location& site) {
  current_thread(barrier_name(kind));
  return barrier(kind, predicate, site);
}

template <typename T, typename Update>
T atomic_update(T* address, Update update) {
  check_aligned(address, sizeof(T), "atomic");
  // acq_rel: free on x86, and it lets ThreadSanitizer see a lock built from atomicCAS/atomicExch
  // (the GPU needs __threadfence for that, which TSan cannot model).
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, update(old), std::memory_order_acq_rel, std::memory_order_relaxed)) {
  }
  return old;
}

}  // namespace chainrule::emu::detail

// ---------------------------------------------------------------------------------------------
// Barriers and warp collectives

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  block_barrier(BarrierKind::sync, 0, site);
}
inline int __syncthreads_count(int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return block_barrier(BarrierKind::count, predicate, site);
}
inline int __syncthreads_and(int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return block_barrier(BarrierKind::and_, predicate, site);
}
inline int __syncthreads_or(int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return block_barrier(BarrierKind::or_, predicate, site);
}

// __syncwarp orders memory among its lanes (shuffles and votes do not, in the CUDA memory model).
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  InternalAccess internal;
  WarpOp& op = begin_warp_op(WarpKind::syncwarp, mask, &complete_syncwarp, site);
  Fiber& self = *t_fiber;
  char* tokens = t_block->lane_tokens;
  sync_release(&tokens[2 * self.linear + (self.syncwarps & 1u)]);
  warp_collective(false);
  const int warp_base = self.linear & ~31;
  const uint32_t participants = op.mask & existing_lanes(*t_block, warp_base);
  for (int lane = 0; lane < 32; ++lane)
    if (participants >> lane & 1u) sync_acquire(&tokens[2 * (warp_base + lane) + (op.result >> lane & 1u)]);
  ++self.syncwarps;
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return shuffle(WarpKind::shfl_idx, mask, var, src_lane, width, site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return shuffle(WarpKind::shfl_up, mask, var, static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return shuffle(WarpKind::shfl_down, mask, var, static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return shuffle(WarpKind::shfl_xor, mask, var, lane_mask, width, site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return static_cast<unsigned>(vote(WarpKind::ballot, mask, predicate, site));
}
inline int __any_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return static_cast<int>(vote(WarpKind::any, mask, predicate, site));
}
inline int __all_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using namespace chainrule::emu::detail;
  return static_cast<int>(vote(WarpKind::all, mask, predicate, site));
}

// The lanes of the caller's warp that have not exited.
inline unsigned __activemask() {
  using namespace chainrule::emu::detail;
  InternalAccess internal;
  const Fiber& self = current_thread("__activemask");
  const int warp_base = self.linear & ~31;
  const uint32_t lanes = existing_lanes(*t_block, warp_base);
  unsigned active = 0;
  for (int j = 0; j < 32; ++j) {
    if ((lanes >> j & 1u) && t_block->fibers[warp_base + j].state != FiberState::exited) active |= 1u << j;
  }
  return active;
}

// Fibers of one block share an OS thread; blocks on different workers need real fences.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// Atomics (std::atomic_ref on the same memory, so they are atomic across worker threads too)

inline int atomicAdd(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(value)); });
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old + value; });
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned long long old) { return old + value; });
}
inline float atomicAdd(float* address, float value) {
  return chainrule::emu::detail::atomic_update(address, [=](float old) { return old + value; });
}
inline double atomicAdd(double* address, double value) {
  return chainrule::emu::detail::atomic_update(address, [=](double old) { return old + value; });
}
inline int atomicSub(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return static_cast<int>(static_cast<unsigned>(old) - static_cast<unsigned>(value)); });
}
inline unsigned atomicSub(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old - value; });
}
inline int atomicMax(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return old > value ? old : value; });
}
inline unsigned atomicMax(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old > value ? old : value; });
}
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned long long old) { return old > value ? old : value; });
}
inline int atomicMin(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return old < value ? old : value; });
}
inline unsigned atomicMin(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old < value ? old : value; });
}
inline int atomicExch(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int) { return value; });
}
inline unsigned atomicExch(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned) { return value; });
}
inline float atomicExch(float* address, float value) {
  return chainrule::emu::detail::atomic_update(address, [=](float) { return value; });
}
inline int atomicOr(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return old | value; });
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old | value; });
}
inline int atomicAnd(int* address, int value) {
  return chainrule::emu::detail::atomic_update(address, [=](int old) { return old & value; });
}
inline unsigned atomicAnd(unsigned* address, unsigned value) {
  return chainrule::emu::detail::atomic_update(address, [=](unsigned old) { return old & value; });
}

template <typename T>
T atomic_cas(T* address, T compare, T value) {
  chainrule::emu::detail::check_aligned(address, sizeof(T), "atomicCAS");
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_acq_rel);
  return compare;  // the old value either way
}
inline int atomicCAS(int* address, int compare, int value) { return atomic_cas(address, compare, value); }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) { return atomic_cas(address, compare, value); }
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long value) {
  return atomic_cas(address, compare, value);
}

// ---------------------------------------------------------------------------------------------
// Device intrinsics and math overloads the CUDA headers provide only to device code

template <typename T>
inline T __ldg(const T* address) {
  return *address;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
