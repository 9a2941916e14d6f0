// The multi-tensor Adam kernel (csrc/cuda/kernels/adam.cuh) run by the CUDA emulator on CPU
// tensors: the emulated twin of csrc/cuda/adam.cu, with the same planner (csrc/cuda/adam_plan.h)
// and the same kernel source, compiled by the host compiler.
#include "cuda/adam_plan.h"
#include "emu/emu.h"
#include "emulated/hooks.h"
#include "ops.h"

namespace chainrule::emulated {

namespace {

namespace k = chainrule::kernels::adam;

// The grid an H100 would get: 132 SMs x 3 resident blocks (see the kernel's __launch_bounds__).
constexpr int kEmulatedMaxBlocks = 132 * 3;

std::atomic<bool> g_simulated_capture{false};

void run(const adam_plan::AdamArgs& args) {
  for (const adam_plan::Launch& launch :
       adam_plan::plan(args, kEmulatedMaxBlocks, g_simulated_capture.load())) {
    for (const k::ByteUpload& upload : launch.uploads) {
      emu::launch("chainrule::kernels::adam::upload_bytes_kernel",
                  k::upload_bytes_kernel<k::ByteUpload>, dim3(1), dim3(k::kThreads), 0, upload);
    }
    if (launch.double_math) {
      emu::launch("chainrule::kernels::adam::multi_tensor_adam_kernel<double>",
                  k::multi_tensor_adam_kernel<double>, dim3(launch.grid), dim3(k::kThreads), 0,
                  launch.params);
    } else {
      emu::launch("chainrule::kernels::adam::multi_tensor_adam_kernel<float>",
                  k::multi_tensor_adam_kernel<float>, dim3(launch.grid), dim3(k::kThreads), 0,
                  launch.params);
    }
  }
}

}  // namespace

void set_simulated_capture(bool capturing) { g_simulated_capture = capturing; }

CHAINRULE_DEFINE_ADAM_ENTRY_POINTS(run)

}  // namespace chainrule::emulated
