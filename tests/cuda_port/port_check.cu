// The port check: every chainrule::port wrapper (csrc/cuda/port.cuh, the only inline PTX in
// chainrule) run on the GPU and under the emulator (csrc/emu/port_emulated.h) from the same kernel
// source (port_kernels.cuh), with the same inputs, and the two results compared word for word:
// ldmatrix x1/x2/x4 with and without .trans, mma.sync m16n8k16 and m16n8k8 in bf16 and f16,
// cp.async of 4, 8 and 16 bytes with every source size from 0 to the copy size and
// cp.async.wait_group 0 to 3. The emulator's result is first checked against the PTX ISA's layouts
// (port_cases.h), so a GPU result that differs points at the machine, not at the test.
//
// Build (one program, both halves; one command line):
//   nvcc -std=c++20 -O2 -arch=sm_90 -I csrc -I csrc/include -I tests/cuda_port
//        -Xcompiler -ffp-contract=off,-fno-strict-aliasing,-pthread
//        tests/cuda_port/port_check.cu tests/cuda_port/port_emulated.cpp -o port_check
// Run: ./port_check [--require-gpu]. One line per case (PASS, FAIL, or EMULATED: checked against
// the ISA only, as there is no GPU), then a summary. Exit 0 when nothing failed (with
// --require-gpu: and a GPU ran every case), 1 on a failure, 2 with --require-gpu and no GPU.
// tools/gpu_check.py builds and runs it for `make gpu-check`; tests/test_gpu_check.py builds it
// with nvcc and runs its emulated half.
#include "cuda/port.cuh"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "port_cases.h"
#include "port_kernels.cuh"

namespace port_check {

std::string run_emulated(int index, const std::vector<uint32_t>& in, std::vector<uint32_t>& out);

// Runs kernel `index` of kPortKernels on one warp of the GPU; "" or the CUDA error.
std::string run_on_gpu(int index, const std::vector<uint32_t>& in, std::vector<uint32_t>& out) {
  uint32_t *device_in = nullptr, *device_out = nullptr;
  std::string error;
  auto check = [&](cudaError_t status, const char* what) {
    if (status != cudaSuccess && error.empty()) error = std::string(what) + ": " + cudaGetErrorString(status);
    return error.empty();
  };
  if (check(cudaMalloc(&device_in, in.size() * 4), "cudaMalloc") &&
      check(cudaMalloc(&device_out, out.size() * 4), "cudaMalloc") &&
      check(cudaMemcpy(device_in, in.data(), in.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy to the GPU") &&
      check(cudaMemcpy(device_out, out.data(), out.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy to the GPU")) {
    kPortKernels[index].kernel<<<1, 32>>>(device_in, device_out);
    if (check(cudaGetLastError(), "launch") && check(cudaDeviceSynchronize(), "kernel"))
      check(cudaMemcpy(out.data(), device_out, out.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy from the GPU");
  }
  cudaFree(device_in);
  cudaFree(device_out);
  return error;
}

}  // namespace port_check

int main(int argc, char** argv) {
  using namespace port_check;
  bool require_gpu = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--require-gpu") == 0) {
      require_gpu = true;
    } else {
      std::fprintf(stderr, "port_check: unknown argument '%s' (expected --require-gpu)\n", argv[i]);
      return 2;
    }
  }
  int devices = 0;
  const cudaError_t device_status = cudaGetDeviceCount(&devices);
  std::string no_gpu;
  if (device_status != cudaSuccess) no_gpu = std::string("no CUDA device: ") + cudaGetErrorString(device_status);
  else if (devices == 0) no_gpu = "no CUDA device";
  if (no_gpu.empty()) {
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("port check on %s (sm_%d%d) and the emulator\n", prop.name, prop.major, prop.minor);
  } else {
    std::printf("port check: %s; the emulator's results are checked against the PTX ISA only\n", no_gpu.c_str());
  }

  int passed = 0, failed = 0, emulated_only = 0;
  const std::vector<PortCase> cases = port_cases();
  for (const PortCase& p : cases) {
    const std::vector<uint32_t> in = make_input(p);
    std::vector<uint32_t> emulated = initial_output(p);
    std::string error = run_emulated(p.kernel, in, emulated);
    if (!error.empty()) error = "emulator: " + error;
    if (error.empty()) {
      const std::string wrong = check_against_reference(p, in, emulated);
      if (!wrong.empty()) error = "emulator differs from the PTX ISA: " + wrong;
    }
    std::string detail;
    if (error.empty() && no_gpu.empty()) {
      std::vector<uint32_t> gpu = initial_output(p);
      error = run_on_gpu(p.kernel, in, gpu);
      if (!error.empty()) error = "gpu: " + error;
      else error = compare_gpu_with_emulator(p, in, gpu, emulated, detail);
    }
    if (!error.empty()) {
      ++failed;
      std::printf("FAIL %s %s\n", p.name.c_str(), error.c_str());
    } else if (!no_gpu.empty()) {
      ++emulated_only;
      std::printf("EMULATED %s emulator matches the PTX ISA; not compared with a GPU\n", p.name.c_str());
    } else {
      ++passed;
      std::printf("PASS %s gpu == emulator (%s)\n", p.name.c_str(), detail.c_str());
    }
  }
  std::printf("port check: %zu cases, %d passed, %d failed, %d emulator only%s\n", cases.size(), passed, failed,
              emulated_only, no_gpu.empty() ? "" : (" (" + no_gpu + ")").c_str());
  if (failed) return 1;
  if (require_gpu && !no_gpu.empty()) return 2;
  return 0;
}
