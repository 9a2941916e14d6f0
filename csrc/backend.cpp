#include "backend.h"

#include <atomic>

namespace chainrule {

namespace {
// Process-wide rather than thread-local: autograd may run a backward on another thread than the
// one that entered the emulated_cuda() context.
std::atomic<int> g_host_backend{static_cast<int>(HostBackend::cpu)};
}  // namespace

HostBackend host_backend() { return static_cast<HostBackend>(g_host_backend.load()); }

void set_host_backend(HostBackend backend) { g_host_backend.store(static_cast<int>(backend)); }

}  // namespace chainrule
