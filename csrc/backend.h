// Which implementation runs chainrule ops on CPU tensors: the CPU kernels, or the CUDA kernel
// source executed by the emulator (chainrule.backends.emulated_cuda()).
// Process-wide, not per thread: autograd runs a backward on its own threads, which must follow
// the thread that ran the forward. emulated_cuda() turns it on while any thread has a context
// open (it counts them) and off when the last one exits (docs/reliability.md, "Threads").
#pragma once

namespace chainrule {

enum class HostBackend : int { cpu = 0, emulated_cuda = 1 };

HostBackend host_backend();
void set_host_backend(HostBackend backend);

}  // namespace chainrule
