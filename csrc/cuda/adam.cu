// CUDA launcher of the multi-tensor Adam kernel (csrc/cuda/kernels/adam.cuh).
//
// The planner (csrc/cuda/adam_plan.h) builds or reuses the kernel's metadata buffer; this file
// only picks the grid for the device and launches on the current stream. The op's arguments
// were validated by the shared checks before the dispatcher got here.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <torch/library.h>

#include "cuda/adam_plan.h"
#include "dispatch.h"
#include "ops.h"

namespace chainrule::cuda {

namespace {

namespace k = chainrule::kernels::adam;

template <typename Math>
int max_resident_blocks() {
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_sm, k::multi_tensor_adam_kernel<Math>, k::kThreads, 0));
  return sm_count * std::max(blocks_per_sm, 1);
}

void run(const adam_plan::AdamArgs& args) {
  if (args.params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(args.params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Both instantiations have the same block size; the float one bounds the grid for both.
  static thread_local int cached_device = -1, cached_blocks = 0;
  const int device = args.params[0].get_device();
  if (cached_device != device) {
    cached_blocks = max_resident_blocks<float>();
    cached_device = device;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  for (const adam_plan::Launch& launch :
       adam_plan::plan(args, cached_blocks, capture != cudaStreamCaptureStatusNone)) {
    // The cached buffer may have been allocated on another stream: the allocator must not hand
    // its memory out again before this stream's kernels are done with it.
    c10::cuda::CUDACachingAllocator::recordStream(launch.buffer.storage().data_ptr(),
                                                  at::cuda::getCurrentCUDAStream());
    for (const k::ByteUpload& upload : launch.uploads) {
      k::upload_bytes_kernel<k::ByteUpload><<<1, k::kThreads, 0, stream>>>(upload);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (launch.double_math) {
      k::multi_tensor_adam_kernel<double><<<launch.grid, k::kThreads, 0, stream>>>(launch.params);
    } else {
      k::multi_tensor_adam_kernel<float><<<launch.grid, k::kThreads, 0, stream>>>(launch.params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

CHAINRULE_DEFINE_ADAM_ENTRY_POINTS(run)

}  // namespace chainrule::cuda

// Only the Adam ops: the linear ops register themselves in their own file (csrc/cuda/linear.cu).
TORCH_LIBRARY_IMPL(chainrule, CUDA, m) {
  m.impl("adam_", &chainrule::checked_adam<&chainrule::cuda::adam_>);
  m.impl("adam_.tensor_lr", &chainrule::checked_adam_tensor_lr<&chainrule::cuda::adam_tensor_lr_>);
}
