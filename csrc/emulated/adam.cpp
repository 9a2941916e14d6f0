// The multi-tensor Adam kernel (csrc/cuda/kernels/adam.cuh) run by the CUDA emulator on CPU
// tensors: the emulated twin of csrc/cuda/adam.cu, with the same planner (csrc/cuda/adam_plan.h)
// and the same kernel source, compiled by the host compiler.
#include "cuda/adam_plan.h"
#include "emu/emu.h"
#include "ops.h"

namespace chainrule::emulated {

namespace {

namespace k = chainrule::kernels::adam;

// The grid an H100 would get: 132 SMs x 3 resident blocks (see the kernel's __launch_bounds__).
constexpr int kEmulatedMaxBlocks = 132 * 3;

void run(const adam_plan::AdamArgs& args) {
  for (const adam_plan::Launch& launch : adam_plan::plan(args, kEmulatedMaxBlocks)) {
    try {
      if (launch.double_math) {
        emu::launch("chainrule::kernels::adam::multi_tensor_adam_kernel<double>",
                    k::multi_tensor_adam_kernel<double>, dim3(launch.grid), dim3(k::kThreads), 0,
                    launch.params);
      } else {
        emu::launch("chainrule::kernels::adam::multi_tensor_adam_kernel<float>",
                    k::multi_tensor_adam_kernel<float>, dim3(launch.grid), dim3(k::kThreads), 0,
                    launch.params);
      }
    } catch (...) {
      // A kernel that failed part-way leaves the completion counter wherever it stopped; the
      // next launch on this parameter set must start from zero.
      *launch.params.blocks_done = 0;
      throw;
    }
  }
}

}  // namespace

CHAINRULE_DEFINE_ADAM_ENTRY_POINTS(run)

}  // namespace chainrule::emulated
