// The port check's emulated half: port_kernels.cuh compiled by the host compiler, so every
// chainrule::port wrapper is the emulator's (csrc/emu/port_emulated.h), run by chainrule::emu.
#include "cuda/port.cuh"

#include <string>
#include <vector>

#include "port_kernels.cuh"

namespace port_check {

// Runs kernel `index` of kPortKernels on one warp; "" or the emulator's error.
std::string run_emulated(int index, const std::vector<uint32_t>& in, std::vector<uint32_t>& out) {
  try {
    chainrule::emu::launch(kPortKernels[index].name, kPortKernels[index].kernel, dim3(1), dim3(32), 0, in.data(),
                           out.data());
  } catch (const chainrule::emu::Error& error) {
    return error.what();
  }
  return "";
}

}  // namespace port_check
