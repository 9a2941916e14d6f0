// Fibers for the CUDA emulator: user-space contexts that run the threads of one CUDA block on one
// OS thread, switching only where a CUDA thread waits (a barrier, a warp collective, its exit).
//
// On x86-64 System V the switch is hand-written: push the callee-saved registers, swap stack
// pointers, pop, return (about 20 ns a switch here; ucontext's swapcontext makes a sigprocmask
// system call and costs about 420 ns). Every other host uses the portable ucontext fallback, which
// can also be forced with -DCHAINRULE_EMU_UCONTEXT to test it.
//
// The floating-point control state (MXCSR, x87 control word) is not switched: all fibers of a
// block share one OS thread and CUDA kernel code has no way to change the rounding mode.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if !defined(CHAINRULE_EMU_UCONTEXT) && !(defined(__x86_64__) && !defined(_WIN32))
#define CHAINRULE_EMU_UCONTEXT 1
#endif

#if defined(CHAINRULE_EMU_UCONTEXT)
#include <ucontext.h>
#else
// One copy across all translation units: the code sits in a COMDAT group, like an inline function.
// chainrule_emu_switch_context(void** save_sp, void* load_sp) saves the current context on the
// current stack, stores the stack pointer in *save_sp and resumes the context saved at load_sp.
// chainrule_emu_fiber_start is where a new fiber's first switch "returns" to: it calls
// entry(arg) with the stack 16-byte aligned; entry never returns.
asm(R"(
.pushsection .text.chainrule_emu_switch_context,"axG",@progbits,chainrule_emu_switch_context,comdat
.weak chainrule_emu_switch_context
.hidden chainrule_emu_switch_context
.type chainrule_emu_switch_context,@function
.p2align 4
chainrule_emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size chainrule_emu_switch_context,.-chainrule_emu_switch_context
.weak chainrule_emu_fiber_start
.hidden chainrule_emu_fiber_start
.type chainrule_emu_fiber_start,@function
.p2align 4
chainrule_emu_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
.size chainrule_emu_fiber_start,.-chainrule_emu_fiber_start
.popsection
)");
extern "C" void chainrule_emu_switch_context(void** save_sp, void* load_sp);
extern "C" void chainrule_emu_fiber_start();
#endif

namespace chainrule::emu::detail {

using FiberEntry = void (*)(void*);

// A fiber stack: mapped lazily (only touched pages cost memory) with a guard page below it, so an
// overflow faults instead of corrupting the neighbouring fiber.
struct FiberStack {
  unsigned char* base = nullptr;  // lowest usable byte
  size_t size = 0;
  size_t mapped = 0;

  FiberStack() = default;
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  FiberStack(FiberStack&& other) noexcept { *this = static_cast<FiberStack&&>(other); }
  FiberStack& operator=(FiberStack&& other) noexcept {
    release();
    base = other.base;
    size = other.size;
    mapped = other.mapped;
    other.base = nullptr;
    other.size = other.mapped = 0;
    return *this;
  }
  ~FiberStack() { release(); }

  void allocate(size_t bytes) {
    release();
#if defined(__unix__) || defined(__APPLE__)
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = (bytes + page - 1) / page * page;
    void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);
    base = static_cast<unsigned char*>(p) + page;
    mapped = bytes + page;
#else
    base = static_cast<unsigned char*>(std::malloc(bytes));
    if (base == nullptr) throw std::bad_alloc();
#endif
    size = bytes;
  }

  void release() {
    if (base == nullptr) return;
#if defined(__unix__) || defined(__APPLE__)
    munmap(base - (mapped - size), mapped);
#else
    std::free(base);
#endif
    base = nullptr;
    size = mapped = 0;
  }
};

#if defined(CHAINRULE_EMU_UCONTEXT)

struct Context {
  ucontext_t uc;
};

inline void ucontext_trampoline(unsigned hi, unsigned lo, unsigned entry_hi, unsigned entry_lo) {
  auto arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo);
  auto entry = reinterpret_cast<FiberEntry>((static_cast<uintptr_t>(entry_hi) << 32) | entry_lo);
  entry(arg);
  std::abort();  // entry switches away for good
}

inline void context_init(Context& context, FiberStack& stack, FiberEntry entry, void* arg) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack.base;
  context.uc.uc_stack.ss_size = stack.size;
  context.uc.uc_link = nullptr;
  const auto a = reinterpret_cast<uintptr_t>(arg);
  const auto e = reinterpret_cast<uintptr_t>(entry);
  makecontext(&context.uc, reinterpret_cast<void (*)()>(&ucontext_trampoline), 4,
              static_cast<unsigned>(static_cast<uint64_t>(a) >> 32), static_cast<unsigned>(a),
              static_cast<unsigned>(static_cast<uint64_t>(e) >> 32), static_cast<unsigned>(e));
}

inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#else

struct Context {
  void* sp = nullptr;
};

inline void context_init(Context& context, FiberStack& stack, FiberEntry entry, void* arg) {
  // The frame chainrule_emu_switch_context pops: r15 r14 r13 r12 rbx rbp, then the return address.
  // After that return rsp == top (16-byte aligned), as the call in chainrule_emu_fiber_start needs.
  auto top = reinterpret_cast<uintptr_t>(stack.base + stack.size) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top) - 7;
  frame[0] = 0;                                                          // r15
  frame[1] = 0;                                                          // r14
  frame[2] = reinterpret_cast<uint64_t>(arg);                            // r13
  frame[3] = reinterpret_cast<uint64_t>(entry);                          // r12
  frame[4] = 0;                                                          // rbx
  frame[5] = 0;                                                          // rbp
  frame[6] = reinterpret_cast<uint64_t>(&chainrule_emu_fiber_start);     // return address
  context.sp = frame;
}

inline void context_switch(Context& from, Context& to) { chainrule_emu_switch_context(&from.sp, to.sp); }

#endif

}  // namespace chainrule::emu::detail
