// The emulator's execution model: a grid of blocks, each block a set of fibers on one OS worker
// thread, with barriers and warp collectives as the only points where a fiber waits.
//
// A launch hands blocks to worker threads (the caller plus CHAINRULE_EMU_WORKERS - 1 helpers, by
// default one per core), one block per worker at a time. A block runs in passes: each pass resumes,
// in the schedule's order, every fiber that can run, and each fiber runs until it reaches a sync
// point or exits. A sync point completes when its last participant arrives; a pass in which no
// fiber can run while some are still waiting is a deadlock and becomes an Error that names the
// kernel, the block and the threads involved. Errors (also exceptions thrown by kernel code) are
// rethrown from launch() on the caller's thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <vector_types.h>

#include "emu/fiber.h"

// The CUDA built-in variables. The scheduler sets threadIdx before it resumes a fiber, and the
// others once per block; all fibers of a block share their worker's OS thread.
inline constinit thread_local uint3 threadIdx{};
inline constinit thread_local uint3 blockIdx{};
inline constinit thread_local dim3 blockDim{};
inline constinit thread_local dim3 gridDim{};
inline constexpr int warpSize = 32;

// ThreadSanitizer mode (build with -fsanitize=thread): every CUDA thread is a TSan fiber, fibers
// switch without implying any ordering, and only barriers (__syncthreads*, __syncwarp) and the
// start and end of a block order one thread's memory accesses before another's. A missing
// __syncthreads is then reported as a data race at the two lines involved, in every schedule.
// The emulator's own bookkeeping runs with TSan's access checks turned off.
#if defined(__SANITIZE_THREAD__)
#define CHAINRULE_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* address);
void __tsan_release(void* address);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
void __tsan_read_range(void* address, unsigned long size);
void __tsan_set_fiber_name(void* fiber, const char* name);
}
#else
#define CHAINRULE_EMU_TSAN 0
#endif

// AddressSanitizer (-fsanitize=address): fiber switches are announced, so ASan knows which stack is
// live (exceptions thrown in a kernel, stack reports), and the unused part of the dynamic shared
// memory buffer is poisoned, so a kernel that reads or writes past its dynamic_smem_bytes, or out
// of bounds of a tensor, is reported at the kernel's line.
#if defined(__SANITIZE_ADDRESS__)
#define CHAINRULE_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define CHAINRULE_EMU_ASAN 0
#endif

namespace chainrule::emu {

// Everything the emulator detects (deadlock, mask mismatch, misalignment, bad launch) is an Error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { forward, reverse, random };

// Limits of the targets (sm_80 / sm_90), checked at launch.
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
// Dynamic shared memory: 48 KiB unless the kernel opted in, as on a GPU, with
// set_max_dynamic_shared_memory (cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)); at most 227 KiB (sm_90) after opting in.
inline constexpr size_t kDefaultMaxDynamicSharedBytes = 48 * 1024;
inline constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;
// Kernel parameters: CUDA >= 12.1 on Volta+ accepts 32764 bytes, older drivers and toolkits 4096.
// Our kernels take one small Params struct, so we hold them to the portable 4 KiB.
inline constexpr size_t kMaxKernelParamBytes = 4096;

namespace detail {

// ---------------------------------------------------------------------------------------------
// Schedule setting (process-wide) and launch counter

struct ScheduleSetting {
  std::atomic<int> order{static_cast<int>(Schedule::forward)};
  std::atomic<uint64_t> seed{0};
};

inline void parse_schedule(const char* text, Schedule& order, uint64_t& seed) {
  std::string s(text);
  std::string name = s.substr(0, s.find(':'));
  seed = 0;
  if (name == "forward") {
    order = Schedule::forward;
  } else if (name == "reverse") {
    order = Schedule::reverse;
  } else if (name == "random") {
    order = Schedule::random;
  } else {
    throw Error("chainrule::emu: CHAINRULE_EMU_SCHEDULE must be forward, reverse or random[:seed], got '" + s + "'");
  }
  if (auto colon = s.find(':'); colon != std::string::npos) {
    char* end = nullptr;
    seed = std::strtoull(s.c_str() + colon + 1, &end, 10);
    if (end == s.c_str() + colon + 1 || *end != '\0')
      throw Error("chainrule::emu: bad seed in CHAINRULE_EMU_SCHEDULE='" + s + "'");
  }
}

inline ScheduleSetting& schedule_setting() {
  static ScheduleSetting* setting = [] {
    auto* s = new ScheduleSetting();
    if (const char* env = std::getenv("CHAINRULE_EMU_SCHEDULE"); env != nullptr && *env != '\0') {
      Schedule order;
      uint64_t seed;
      parse_schedule(env, order, seed);
      s->order = static_cast<int>(order);
      s->seed = seed;
    }
    return s;
  }();
  return *setting;
}

inline std::atomic<uint64_t> g_launch_count{0};

// The emulator's own state is touched by every fiber of a block and by its scheduler; under TSan
// those accesses are not the kernel's and are not checked.
struct InternalAccess {
#if CHAINRULE_EMU_TSAN
  InternalAccess() { __tsan_ignore_thread_begin(); }
  ~InternalAccess() { __tsan_ignore_thread_end(); }
#else
  InternalAccess() {}
#endif
  InternalAccess(const InternalAccess&) = delete;
  InternalAccess& operator=(const InternalAccess&) = delete;
};

inline void sync_release([[maybe_unused]] const void* token) {
#if CHAINRULE_EMU_TSAN
  __tsan_release(const_cast<void*>(token));
#endif
}
inline void sync_acquire([[maybe_unused]] const void* token) {
#if CHAINRULE_EMU_TSAN
  __tsan_acquire(const_cast<void*>(token));
#endif
}

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ---------------------------------------------------------------------------------------------
// Threads, warps and blocks

enum class FiberState : uint8_t { runnable, at_barrier, at_warp_op, exited };

// Warp collectives. Lanes meet only at the same kind with the same mask; .aligned ones (ldmatrix,
// mma) also at the same call site.
enum class WarpKind : uint8_t {
  syncwarp, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, any, all,
  ldmatrix, mma,
};

inline const char* warp_kind_name(WarpKind kind) {
  switch (kind) {
    case WarpKind::syncwarp: return "__syncwarp";
    case WarpKind::shfl_idx: return "__shfl_sync";
    case WarpKind::shfl_up: return "__shfl_up_sync";
    case WarpKind::shfl_down: return "__shfl_down_sync";
    case WarpKind::shfl_xor: return "__shfl_xor_sync";
    case WarpKind::ballot: return "__ballot_sync";
    case WarpKind::any: return "__any_sync";
    case WarpKind::all: return "__all_sync";
    case WarpKind::ldmatrix: return "ldmatrix";
    case WarpKind::mma: return "mma.sync";
  }
  return "?";
}

struct Fiber;
using WarpComplete = void (*)(Fiber* const* lanes, uint32_t participants);

// One lane's half of a warp collective: what it brings, and where its result lands.
struct WarpOp {
  WarpKind kind = WarpKind::syncwarp;
  uint8_t variant = 0;   // ldmatrix: count | trans << 3; mma: shape and type
  uint32_t mask = 0;
  int arg = 0;           // source lane, delta or lane mask
  int width = 32;
  uint64_t value = 0;    // the lane's operand bits (shuffle value, vote predicate)
  const void* address = nullptr;
  uint32_t in[10] = {};  // mma: a[4] b[2] c[4]
  uint32_t out[4] = {};
  uint64_t result = 0;
  WarpComplete complete = nullptr;
  std::source_location site;
};

struct PendingCopy {
  void* dst;
  int bytes;
  uint64_t group;
  unsigned char data[16];
};

struct BlockRun;

struct Fiber {
  Context context;
  FiberStack stack;
  FiberState state = FiberState::exited;
  uint3 index{};
  int linear = 0;
  BlockRun* block = nullptr;
  std::source_location site;  // where it waits at a barrier
  WarpOp op;
  std::vector<PendingCopy> copies;  // cp.async issued and not yet landed
  uint64_t committed_groups = 0;
  void* tsan_fiber = nullptr;
  uint32_t syncwarps = 0;  // __syncwarp calls so far (TSan: which of the lane's two tokens to use)
  bool started = false;
  void* asan_fake_stack = nullptr;
};

enum class BarrierKind : uint8_t { sync, count, and_, or_ };

inline const char* barrier_name(BarrierKind kind) {
  switch (kind) {
    case BarrierKind::sync: return "__syncthreads";
    case BarrierKind::count: return "__syncthreads_count";
    case BarrierKind::and_: return "__syncthreads_and";
    case BarrierKind::or_: return "__syncthreads_or";
  }
  return "?";
}

struct LaunchShared;

struct BlockRun {
  const LaunchShared* launch = nullptr;
  uint3 index{};
  int nthreads = 0;
  Fiber* fibers = nullptr;
  int exited = 0;
  // the barrier now filling
  int barrier_arrived = 0;
  int barrier_predicates = 0;
  int barrier_result = 0;
  BarrierKind barrier_kind = BarrierKind::sync;
  std::source_location barrier_site;
  int barrier_first = -1;
  unsigned char* dynamic_smem = nullptr;
  std::exception_ptr error;
  // TSan synchronisation objects (only their addresses matter). A thread acquires a barrier's token
  // when it resumes, possibly after faster threads already arrived at the next barrier: alternating
  // two tokens keeps their releases out of its acquire.
  uint64_t barrier_generation = 0;
  char barrier_tokens[2] = {};
  char start_token = 0;
  char exit_token = 0;
  char* lane_tokens = nullptr;  // two per thread, for __syncwarp
  uint32_t* warp_waiting = nullptr;  // per warp: lanes waiting at a warp operation
  uint32_t* warp_exited = nullptr;   // per warp: lanes that have exited
};

struct LaunchShared {
  const char* kernel_name;
  const void* kernel_address;  // the kernel function, the key of its shared-memory opt-in
  dim3 grid;
  dim3 block;
  size_t dynamic_smem_bytes;
  Schedule order;
  uint64_t seed;
  void (*invoke)(const void* context);
  const void* invoke_context;
};

// Per OS worker: its fibers (stacks kept between launches), the scheduler's own context and the
// block's dynamic shared memory.
struct Worker {
  std::vector<Fiber> fibers;
  Context scheduler;
  void* tsan_scheduler = nullptr;
  std::vector<unsigned char> smem_storage;
  std::vector<int> order;
  std::vector<char> lane_tokens;
  std::vector<uint32_t> warp_masks;
  // ASan: the scheduler's (OS thread's) stack, learnt when a fiber first starts
  const void* asan_scheduler_bottom = nullptr;
  size_t asan_scheduler_size = 0;
  void* asan_scheduler_fake_stack = nullptr;
};

inline thread_local Worker* t_worker = nullptr;
inline thread_local BlockRun* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

inline size_t fiber_stack_bytes() {
  static const size_t bytes = [] {
    size_t kib = 256;
    if (const char* env = std::getenv("CHAINRULE_EMU_STACK_KB"); env != nullptr && *env != '\0')
      kib = std::max<size_t>(16, std::strtoull(env, nullptr, 10));
    return kib * 1024;
  }();
  return bytes;
}

inline unsigned worker_count() {
  static const unsigned n = [] {
    unsigned workers = std::max(1u, std::thread::hardware_concurrency());
    if (const char* env = std::getenv("CHAINRULE_EMU_WORKERS"); env != nullptr && *env != '\0')
      workers = std::max(1u, static_cast<unsigned>(std::strtoul(env, nullptr, 10)));
    return workers;
  }();
  return n;
}

// Workers are pooled so fiber stacks survive from one launch to the next.
struct WorkerPool {
  std::mutex mutex;
  std::vector<std::unique_ptr<Worker>> idle;
};

inline WorkerPool& worker_pool() {
  static WorkerPool* pool = new WorkerPool();  // never destroyed: workers may outlive static teardown
  return *pool;
}

inline std::unique_ptr<Worker> acquire_worker() {
  auto& pool = worker_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  if (pool.idle.empty()) return std::make_unique<Worker>();
  auto worker = std::move(pool.idle.back());
  pool.idle.pop_back();
  return worker;
}

inline void release_worker(std::unique_ptr<Worker> worker) {
  auto& pool = worker_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  pool.idle.push_back(std::move(worker));
}

// ---------------------------------------------------------------------------------------------
// Messages

inline std::string format_dim(uint3 v) {
  // snprintf rather than string concatenation, which trips g++ 12's -Wrestrict false positive.
  char text[40];
  std::snprintf(text, sizeof(text), "(%u,%u,%u)", v.x, v.y, v.z);
  return text;
}

inline std::string format_site(const std::source_location& site) {
  std::string file = site.file_name();
  if (auto slash = file.find_last_of('/'); slash != std::string::npos) {
    // keep the path from csrc/ or tests/ on, which is what a reader can open
    for (const char* root : {"csrc/", "tests/"}) {
      if (auto at = file.rfind(root); at != std::string::npos) {
        file = file.substr(at);
        break;
      }
    }
  }
  return file + ":" + std::to_string(site.line());
}

inline std::string where(const BlockRun& block) {
  return "kernel '" + std::string(block.launch->kernel_name) + "', block " + format_dim(block.index);
}

inline std::string thread_name(const Fiber& fiber) { return "thread " + format_dim(fiber.index); }

[[noreturn]] inline void fail(const std::string& what) {
  const BlockRun& block = *t_block;
  throw Error("chainrule::emu: " + what + " (in " + where(block) + ", " + thread_name(*t_fiber) + ")");
}

inline std::string describe_wait(const Fiber& fiber) {
  switch (fiber.state) {
    case FiberState::exited: return "has exited";
    case FiberState::runnable: return "is still running";
    case FiberState::at_barrier:
      return "waits at " + std::string(barrier_name(fiber.block->barrier_kind)) + " (" + format_site(fiber.site) + ")";
    case FiberState::at_warp_op: {
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", fiber.op.mask);
      return "waits at " + std::string(warp_kind_name(fiber.op.kind)) + " with mask " + mask + " (" +
             format_site(fiber.op.site) + ")";
    }
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Switching

// The running fiber gives the OS thread back to its block's scheduler.
inline void switch_to_scheduler(Fiber& self, Worker& worker) {
#if CHAINRULE_EMU_TSAN
  __tsan_switch_to_fiber(worker.tsan_scheduler, 1 /* no synchronisation */);
#endif
#if CHAINRULE_EMU_ASAN
  __sanitizer_start_switch_fiber(self.state == FiberState::exited ? nullptr : &self.asan_fake_stack,
                                 worker.asan_scheduler_bottom, worker.asan_scheduler_size);
#endif
  context_switch(self.context, worker.scheduler);
#if CHAINRULE_EMU_ASAN
  __sanitizer_finish_switch_fiber(self.asan_fake_stack, nullptr, nullptr);
#endif
}

inline void yield_to_scheduler() { switch_to_scheduler(*t_fiber, *t_worker); }

inline void land_copies(Fiber& fiber, uint64_t groups_below) {
  auto& copies = fiber.copies;
  size_t kept = 0;
  for (size_t i = 0; i < copies.size(); ++i) {
    if (copies[i].group < groups_below) {
      std::memcpy(copies[i].dst, copies[i].data, static_cast<size_t>(copies[i].bytes));
    } else {
      copies[kept++] = copies[i];
    }
  }
  copies.resize(kept);
}

inline uint32_t existing_lanes(const BlockRun& block, int warp_base) {
  const int n = block.nthreads - warp_base;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// A thread that exits must not leave others waiting for it.
inline void check_exit(Fiber& fiber) {
  BlockRun& block = *fiber.block;
  if (block.barrier_arrived > 0) {
    const Fiber& waiting = block.fibers[block.barrier_first];
    fail("barrier deadlock: " + thread_name(fiber) + " exited without reaching " +
         barrier_name(block.barrier_kind) + " (" + format_site(block.barrier_site) + ") where " +
         thread_name(waiting) + " waits; every thread of a block must reach each barrier");
  }
  const int lane = fiber.linear & 31;
  const int warp_base = fiber.linear - lane;
  const uint32_t lanes = existing_lanes(block, warp_base);
  for (int j = 0; j < 32; ++j) {
    if (!(lanes >> j & 1u)) continue;
    const Fiber& other = block.fibers[warp_base + j];
    if (other.state == FiberState::at_warp_op && (other.op.mask >> lane & 1u)) {
      fail("warp mask mismatch: " + thread_name(fiber) + " (lane " + std::to_string(lane) +
           ") exited, but " + thread_name(other) + " " + describe_wait(other) +
           ", whose mask names this lane; every lane in the mask must make the same call");
    }
  }
}

inline void fiber_main(void* arg) {
  auto* fiber = static_cast<Fiber*>(arg);
#if CHAINRULE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &t_worker->asan_scheduler_bottom, &t_worker->asan_scheduler_size);
#endif
  BlockRun& block = *fiber->block;
  sync_acquire(&block.start_token);  // the block starts after the launch
  fiber->started = true;
  try {
    block.launch->invoke(block.launch->invoke_context);
    land_copies(*fiber, ~uint64_t{0});  // the hardware finishes copies a thread left in flight
    InternalAccess internal;
    check_exit(*fiber);
  } catch (...) {
    InternalAccess internal;
    if (!block.error) block.error = std::current_exception();
  }
  Worker* worker;
  {
    InternalAccess internal;
    sync_release(&block.exit_token);  // and ends before the launch returns
    fiber->state = FiberState::exited;
    block.warp_exited[fiber->linear >> 5] |= 1u << (fiber->linear & 31);
    ++block.exited;
    worker = t_worker;
  }
  switch_to_scheduler(*fiber, *worker);
  std::abort();  // an exited fiber is never resumed
}

// ---------------------------------------------------------------------------------------------
// Barriers

inline int barrier(BarrierKind kind, int predicate, const std::source_location& site) {
  InternalAccess internal;
  BlockRun& block = *t_block;
  Fiber& self = *t_fiber;
  if (block.exited > 0) {
    for (int i = 0; i < block.nthreads; ++i) {
      if (block.fibers[i].state == FiberState::exited) {
        fail("barrier deadlock: " + std::string(barrier_name(kind)) + " (" + format_site(site) + ") is reached, but " +
             thread_name(block.fibers[i]) + " has already exited; every thread of a block must reach each barrier");
      }
    }
  }
  if (block.barrier_arrived == 0) {
    block.barrier_kind = kind;
    block.barrier_site = site;
    block.barrier_first = self.linear;
    block.barrier_predicates = 0;
  } else if (block.barrier_kind != kind || block.barrier_site.line() != site.line() ||
             block.barrier_site.column() != site.column() ||
             std::strcmp(block.barrier_site.file_name(), site.file_name()) != 0) {
    fail("divergent barriers: this thread reaches " + std::string(barrier_name(kind)) + " (" + format_site(site) +
         ") while " + thread_name(block.fibers[block.barrier_first]) + " waits at " +
         barrier_name(block.barrier_kind) + " (" + format_site(block.barrier_site) +
         "); a barrier in conditional code needs a condition that is uniform across the block");
  }
  block.barrier_predicates += predicate != 0;
  self.state = FiberState::at_barrier;
  self.site = site;
  char* token = &block.barrier_tokens[block.barrier_generation & 1];
  if (++block.barrier_arrived == block.nthreads) {
    ++block.barrier_generation;
    switch (kind) {
      case BarrierKind::sync: block.barrier_result = 0; break;
      case BarrierKind::count: block.barrier_result = block.barrier_predicates; break;
      case BarrierKind::and_: block.barrier_result = block.barrier_predicates == block.nthreads; break;
      case BarrierKind::or_: block.barrier_result = block.barrier_predicates != 0; break;
    }
    block.barrier_arrived = 0;
    block.barrier_first = -1;
    for (int i = 0; i < block.nthreads; ++i) block.fibers[i].state = FiberState::runnable;
  }
  sync_release(token);
  yield_to_scheduler();
  sync_acquire(token);
  return block.barrier_result;
}

// ---------------------------------------------------------------------------------------------
// Warp collectives

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// The calling lane has filled self.op; wait until every lane of the mask has made the same call,
// then the last one computes everybody's result.
inline void warp_collective(bool aligned) {
  BlockRun& block = *t_block;
  Fiber& self = *t_fiber;
  WarpOp& op = self.op;
  const int lane = self.linear & 31;
  const int warp_base = self.linear - lane;
  const uint32_t lanes = existing_lanes(block, warp_base);
  auto mask_text = [&] {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", op.mask);
    return std::string(text);
  };
  if (!(op.mask >> lane & 1u)) {
    fail("warp mask mismatch: " + std::string(warp_kind_name(op.kind)) + " (" + format_site(op.site) + ") with mask " +
         mask_text() + " does not include the calling lane " + std::to_string(lane));
  }
  if (aligned && lanes != 0xffffffffu) {
    fail(std::string(warp_kind_name(op.kind)) + " (" + format_site(op.site) +
         ") needs a full warp of 32 threads; this warp has " + std::to_string(__builtin_popcount(lanes)));
  }
  const uint32_t participants = op.mask & lanes;
  const int warp = self.linear >> 5;
  if (const uint32_t gone = block.warp_exited[warp] & participants; gone != 0) {
    const int j = __builtin_ctz(gone);
    fail("warp mask mismatch: " + std::string(warp_kind_name(op.kind)) + " (" + format_site(op.site) + ") with mask " +
         mask_text() + " names lane " + std::to_string(j) + ", but " + thread_name(block.fibers[warp_base + j]) +
         " has exited; every lane in the mask must make the same call");
  }
  self.state = FiberState::at_warp_op;
  uint32_t& waiting = block.warp_waiting[warp];
  waiting |= 1u << lane;
  // Only when every lane of the mask waits at some warp operation can this one complete; then check
  // that it is this one. (A lane at another operation whose mask leaves us out may finish that
  // first; a lane at one that needs us never will.)
  bool complete = (waiting & participants) == participants;
  for (int j = 0; complete && j < 32; ++j) {
    if (j == lane || !(participants >> j & 1u)) continue;
    const Fiber& other = block.fibers[warp_base + j];
    const bool same = other.op.kind == op.kind && other.op.mask == op.mask && other.op.variant == op.variant &&
                      (!aligned || same_site(other.op.site, op.site));
    if (!same) {
      if (other.op.mask >> lane & 1u) {
        fail("warp mask mismatch: this lane calls " + std::string(warp_kind_name(op.kind)) + " with mask " + mask_text() +
             " (" + format_site(op.site) + ") while lane " + std::to_string(j) + " (" + thread_name(other) + ") " +
             describe_wait(other) + "; the lanes of a mask must make the same call with the same mask");
      }
      complete = false;
    }
  }
  if (complete) {
    Fiber* lanes_of_warp[32];
    for (int j = 0; j < 32; ++j) lanes_of_warp[j] = (lanes >> j & 1u) ? &block.fibers[warp_base + j] : nullptr;
    op.complete(lanes_of_warp, participants);
    for (int j = 0; j < 32; ++j) {
      if (participants >> j & 1u) lanes_of_warp[j]->state = FiberState::runnable;
    }
    waiting &= ~participants;
  }
  yield_to_scheduler();
}

// ---------------------------------------------------------------------------------------------
// Running a block

inline std::string describe_deadlock(const BlockRun& block) {
  for (int i = 0; i < block.nthreads; ++i) {
    const Fiber& waiting = block.fibers[i];
    if (waiting.state == FiberState::at_barrier) {
      for (int j = 0; j < block.nthreads; ++j) {
        const Fiber& other = block.fibers[j];
        if (other.state != FiberState::at_barrier) {
          return "barrier deadlock: " + thread_name(waiting) + " " + describe_wait(waiting) + " but " +
                 thread_name(other) + " " + describe_wait(other);
        }
      }
    }
    if (waiting.state == FiberState::at_warp_op) {
      const int lane = waiting.linear & 31;
      const int warp_base = waiting.linear - lane;
      const uint32_t participants = waiting.op.mask & existing_lanes(block, warp_base);
      for (int j = 0; j < 32; ++j) {
        if (!(participants >> j & 1u)) continue;
        const Fiber& other = block.fibers[warp_base + j];
        if (other.state != FiberState::at_warp_op || other.op.kind != waiting.op.kind ||
            other.op.mask != waiting.op.mask) {
          return "warp mask mismatch (deadlock): " + thread_name(waiting) + " " + describe_wait(waiting) +
                 " but lane " + std::to_string(j) + " (" + thread_name(other) + ") " + describe_wait(other);
        }
      }
    }
  }
  return "deadlock: no thread can run";
}

// A block abandoned by an error leaves fibers suspended mid-kernel. Under TSan each of them is
// inside exactly one InternalAccess scope (every wait is in barrier() or one warp operation, each
// of which holds one, and an exception unwinds them), so end that scope on its behalf, and let it
// "exit" so that the next block on this worker is ordered after everything it did.
inline void settle_abandoned_fibers([[maybe_unused]] Worker& worker, [[maybe_unused]] BlockRun& block) {
#if CHAINRULE_EMU_TSAN
  for (int i = 0; i < block.nthreads; ++i) {
    Fiber& fiber = worker.fibers[static_cast<size_t>(i)];
    if (!fiber.started || fiber.state == FiberState::exited) continue;
    __tsan_switch_to_fiber(fiber.tsan_fiber, 1);
    __tsan_ignore_thread_end();
    __tsan_release(&block.exit_token);
    __tsan_switch_to_fiber(worker.tsan_scheduler, 1);
  }
  __tsan_acquire(&block.exit_token);
#endif
}

inline void run_block(Worker& worker, const LaunchShared& launch, uint64_t block_linear) {
  InternalAccess internal;
  const dim3 bd = launch.block;
  const int nthreads = static_cast<int>(bd.x * bd.y * bd.z);
  if (worker.fibers.size() < static_cast<size_t>(nthreads)) {
    const size_t old = worker.fibers.size();
    worker.fibers.resize(static_cast<size_t>(nthreads));
    for (size_t i = old; i < worker.fibers.size(); ++i) {
      worker.fibers[i].stack.allocate(fiber_stack_bytes());
#if CHAINRULE_EMU_TSAN
      worker.fibers[i].tsan_fiber = __tsan_create_fiber(0);
#endif
    }
  }
#if CHAINRULE_EMU_TSAN
  worker.tsan_scheduler = __tsan_get_current_fiber();
#endif

  BlockRun block;
  block.launch = &launch;
  block.index = uint3{static_cast<unsigned>(block_linear % launch.grid.x),
                      static_cast<unsigned>(block_linear / launch.grid.x % launch.grid.y),
                      static_cast<unsigned>(block_linear / (uint64_t{launch.grid.x} * launch.grid.y))};
  block.nthreads = nthreads;
  block.fibers = worker.fibers.data();

  // Dynamic shared memory, poisoned with 0xff bytes (NaN in fp32, fp16 and bf16) at block start.
  const size_t smem_bytes = std::max<size_t>(launch.dynamic_smem_bytes, 128);
#if CHAINRULE_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(worker.smem_storage.data(), worker.smem_storage.size());
#endif
  if (worker.smem_storage.size() < smem_bytes + 128) worker.smem_storage.resize(smem_bytes + 128);
  auto smem_address = reinterpret_cast<uintptr_t>(worker.smem_storage.data());
  block.dynamic_smem = worker.smem_storage.data() + ((128 - smem_address % 128) % 128);
  std::memset(block.dynamic_smem, 0xff, smem_bytes);
#if CHAINRULE_EMU_ASAN
  // everything but the requested bytes is out of bounds
  unsigned char* storage_end = worker.smem_storage.data() + worker.smem_storage.size();
  unsigned char* requested_end = block.dynamic_smem + launch.dynamic_smem_bytes;
  ASAN_POISON_MEMORY_REGION(worker.smem_storage.data(), static_cast<size_t>(block.dynamic_smem - worker.smem_storage.data()));
  ASAN_POISON_MEMORY_REGION(requested_end, static_cast<size_t>(storage_end - requested_end));
#endif

  for (int i = 0; i < nthreads; ++i) {
    Fiber& fiber = worker.fibers[static_cast<size_t>(i)];
    fiber.state = FiberState::runnable;
    fiber.linear = i;
    fiber.index = uint3{static_cast<unsigned>(i) % bd.x, static_cast<unsigned>(i) / bd.x % bd.y,
                        static_cast<unsigned>(i) / (bd.x * bd.y)};
    fiber.block = &block;
    fiber.copies.clear();
    fiber.committed_groups = 0;
    fiber.syncwarps = 0;
    fiber.started = false;
#if CHAINRULE_EMU_TSAN
    __tsan_set_fiber_name(fiber.tsan_fiber, (std::string(launch.kernel_name) + " block " + format_dim(block.index) +
                                             " thread " + format_dim(fiber.index)).c_str());
#endif
#if CHAINRULE_EMU_ASAN
    // frames left by the last block (fibers end by switching away, not by returning) are stale
    ASAN_UNPOISON_MEMORY_REGION(fiber.stack.base, fiber.stack.size);
#endif
    context_init(fiber.context, fiber.stack, &fiber_main, &fiber);
  }

  t_block = &block;
  blockIdx = block.index;
  blockDim = launch.block;
  gridDim = launch.grid;

  const size_t nwarps = (static_cast<size_t>(nthreads) + 31) / 32;
  worker.warp_masks.assign(2 * nwarps, 0u);
  block.warp_waiting = worker.warp_masks.data();
  block.warp_exited = worker.warp_masks.data() + nwarps;
  worker.lane_tokens.resize(2 * static_cast<size_t>(nthreads));
  block.lane_tokens = worker.lane_tokens.data();
  sync_release(&block.start_token);
  auto& order = worker.order;
  order.resize(static_cast<size_t>(nthreads));
  uint64_t rng = mix64(launch.seed ^ mix64(block_linear + 1));
  while (block.exited < nthreads) {
    switch (launch.order) {
      case Schedule::forward:
        for (int i = 0; i < nthreads; ++i) order[static_cast<size_t>(i)] = i;
        break;
      case Schedule::reverse:
        for (int i = 0; i < nthreads; ++i) order[static_cast<size_t>(i)] = nthreads - 1 - i;
        break;
      case Schedule::random:
        for (int i = 0; i < nthreads; ++i) order[static_cast<size_t>(i)] = i;
        for (int i = nthreads - 1; i > 0; --i) {
          rng = mix64(rng);
          std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(rng % static_cast<uint64_t>(i + 1))]);
        }
        break;
    }
    bool ran = false;
    for (int i : order) {
      Fiber& fiber = worker.fibers[static_cast<size_t>(i)];
      if (fiber.state != FiberState::runnable) continue;
      ran = true;
      t_fiber = &fiber;
      threadIdx = fiber.index;
#if CHAINRULE_EMU_TSAN
      __tsan_switch_to_fiber(fiber.tsan_fiber, 1 /* no synchronisation */);
#endif
#if CHAINRULE_EMU_ASAN
      __sanitizer_start_switch_fiber(&worker.asan_scheduler_fake_stack, fiber.stack.base, fiber.stack.size);
#endif
      context_switch(worker.scheduler, fiber.context);
#if CHAINRULE_EMU_ASAN
      __sanitizer_finish_switch_fiber(worker.asan_scheduler_fake_stack, nullptr, nullptr);
#endif
      if (block.error) {
        t_fiber = nullptr;
        t_block = nullptr;
        settle_abandoned_fibers(worker, block);
        std::rethrow_exception(block.error);
      }
    }
    if (!ran) {
      t_fiber = nullptr;
      t_block = nullptr;
      settle_abandoned_fibers(worker, block);
      throw Error("chainrule::emu: " + describe_deadlock(block) + " (in " + where(block) + ")");
    }
  }
  sync_acquire(&block.exit_token);
  t_fiber = nullptr;
  t_block = nullptr;
}

// Per kernel function: the dynamic shared memory it opted in to (process-wide, as the CUDA
// attribute is per function and context).
struct SharedMemoryOptIns {
  std::mutex mutex;
  std::unordered_map<const void*, size_t> bytes;
};
inline SharedMemoryOptIns& shared_memory_opt_ins() {
  static SharedMemoryOptIns opt_ins;
  return opt_ins;
}

inline size_t max_dynamic_shared_bytes(const void* kernel) {
  auto& opt_ins = shared_memory_opt_ins();
  std::lock_guard<std::mutex> lock(opt_ins.mutex);
  const auto found = opt_ins.bytes.find(kernel);
  return found == opt_ins.bytes.end() ? kDefaultMaxDynamicSharedBytes : found->second;
}

inline void check_launch(const LaunchShared& launch) {
  const dim3 g = launch.grid, b = launch.block;
  const std::string name = "chainrule::emu::launch('" + std::string(launch.kernel_name) + "'): ";
  if (b.x == 0 || b.y == 0 || b.z == 0 || uint64_t{b.x} * b.y * b.z > kMaxThreadsPerBlock || b.z > 64)
    throw Error(name + "invalid block " + format_dim(b) + " (at most 1024 threads, z <= 64)");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    throw Error(name + "invalid grid " + format_dim(g));
  const size_t limit = max_dynamic_shared_bytes(launch.kernel_address);
  if (launch.dynamic_smem_bytes > limit)
    throw Error(name + std::to_string(launch.dynamic_smem_bytes) + " bytes of dynamic shared memory exceed the " +
                std::to_string(limit) + "-byte limit" +
                (limit == kDefaultMaxDynamicSharedBytes
                     ? std::string(" of a kernel that did not opt in (cudaFuncSetAttribute, "
                                   "chainrule::emu::set_max_dynamic_shared_memory)")
                     : std::string(" this kernel opted in to")));
}

inline void launch_erased(const LaunchShared& launch) {
  if (t_worker != nullptr)
    throw Error("chainrule::emu::launch('" + std::string(launch.kernel_name) +
                "'): launching from inside a kernel (dynamic parallelism) is not supported");
  check_launch(launch);
  g_launch_count.fetch_add(1, std::memory_order_relaxed);
  const uint64_t nblocks = uint64_t{launch.grid.x} * launch.grid.y * launch.grid.z;
  const unsigned nworkers = static_cast<unsigned>(std::min<uint64_t>(nblocks, worker_count()));

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
  uint64_t first_error_block = ~uint64_t{0};

  auto work = [&] {
    InternalAccess internal;
    auto worker = acquire_worker();
    t_worker = worker.get();
    // Save the caller's built-ins: a launch from the caller's thread must not leave them changed.
    const uint3 saved_thread = threadIdx, saved_block = blockIdx;
    const dim3 saved_block_dim = blockDim, saved_grid_dim = gridDim;
    while (!failed.load(std::memory_order_relaxed)) {
      const uint64_t b = next.fetch_add(1, std::memory_order_relaxed);
      if (b >= nblocks) break;
      try {
        run_block(*worker, launch, b);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (b < first_error_block) {  // report the lowest failing block: the same error on every run
          first_error_block = b;
          first_error = std::current_exception();
        }
        failed = true;
      }
    }
    threadIdx = saved_thread;
    blockIdx = saved_block;
    blockDim = saved_block_dim;
    gridDim = saved_grid_dim;
    t_worker = nullptr;
    release_worker(std::move(worker));
  };

  std::vector<std::thread> helpers;
  helpers.reserve(nworkers - 1);
  for (unsigned i = 1; i < nworkers; ++i) helpers.emplace_back(work);
  work();
  for (auto& helper : helpers) helper.join();
  if (first_error) std::rethrow_exception(first_error);
}

template <typename... Params>
constexpr size_t kernel_param_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(Params) - 1) / alignof(Params) * alignof(Params) + sizeof(Params)), ...);
  return offset;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public host API

inline void set_schedule(Schedule order, uint64_t seed = 0) {
  auto& setting = detail::schedule_setting();
  setting.order = static_cast<int>(order);
  setting.seed = seed;
}

inline Schedule schedule() { return static_cast<Schedule>(detail::schedule_setting().order.load()); }
inline uint64_t schedule_seed() { return detail::schedule_setting().seed.load(); }

inline uint64_t launch_count() { return detail::g_launch_count.load(); }

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): lets later
// launches of `kernel` use up to `bytes` of dynamic shared memory (48 KiB without it).
template <typename... Params>
void set_max_dynamic_shared_memory(void (*kernel)(Params...), size_t bytes) {
  if (bytes > kMaxDynamicSharedBytes)
    throw Error("chainrule::emu::set_max_dynamic_shared_memory: " + std::to_string(bytes) +
                " bytes exceed the " + std::to_string(kMaxDynamicSharedBytes) + "-byte maximum of sm_90");
  auto& opt_ins = detail::shared_memory_opt_ins();
  std::lock_guard<std::mutex> lock(opt_ins.mutex);
  opt_ins.bytes[reinterpret_cast<const void*>(kernel)] = bytes;
}

// Runs kernel<<<grid, block, dynamic_smem_bytes>>>(args...) on the CPU and returns when it is done.
// Arguments convert to the kernel's parameter types as in a CUDA launch; each CUDA thread gets its
// own copy.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "chainrule::emu::launch: wrong number of kernel arguments");
  static_assert((!std::is_reference_v<Params> && ...), "CUDA kernel parameters cannot be references");
  static_assert((std::is_trivially_copyable_v<Params> && ...),
                "CUDA kernel parameters must be trivially copyable: they are copied to the GPU byte by byte");
  static_assert(detail::kernel_param_bytes<Params...>() <= kMaxKernelParamBytes,
                "kernel parameters exceed the 4 KiB CUDA parameter limit (pass a pointer to the large part)");
  using Tuple = std::tuple<Params...>;
  struct Invocation {
    void (*kernel)(Params...);
    Tuple params;
  };
  const Invocation invocation{kernel, Tuple(std::forward<Args>(args)...)};
  detail::LaunchShared shared{};
  shared.kernel_name = kernel_name;
  shared.kernel_address = reinterpret_cast<const void*>(kernel);
  shared.grid = grid;
  shared.block = block;
  shared.dynamic_smem_bytes = dynamic_smem_bytes;
  shared.order = schedule();
  shared.seed = schedule_seed();
  shared.invoke = [](const void* context) {
    const auto& call = *static_cast<const Invocation*>(context);
    std::apply(call.kernel, call.params);
  };
  shared.invoke_context = &invocation;
  detail::launch_erased(shared);
}

}  // namespace chainrule::emu
