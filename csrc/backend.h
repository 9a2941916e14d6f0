// Which implementation runs chainrule ops on CPU tensors: the CPU kernels, or the CUDA kernel
// source executed by the emulator (chainrule.backends.emulated_cuda()).
#pragma once

namespace chainrule {

enum class HostBackend : int { cpu = 0, emulated_cuda = 1 };

HostBackend host_backend();
void set_host_backend(HostBackend backend);

}  // namespace chainrule
