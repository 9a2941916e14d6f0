// chainrule._C: loads the ops (registration.cpp and the per-device kernels register themselves
// when this library is loaded) and holds small helpers: build information and test hooks.
#include <torch/extension.h>

#include "backend.h"
#include "cpu/gemm_path.h"  // [cpu-gemm]
#include "cpu/isa.h"  // [cpu-gemm]

#if CHAINRULE_WITH_EMULATOR && __has_include("emu/emu.h")
#define CHAINRULE_EMULATOR_HOOKS 1
#include "emu/emu.h"
#include "emulated/hooks.h"
#else
#define CHAINRULE_EMULATOR_HOOKS 0
#endif

// [cpu-gemm] ISA switch, vector activations and raw GEMM hooks: csrc/cpu/python_hooks.cpp.
namespace chainrule::cpu {
void add_python_hooks(pybind11::module_& m);
}  // namespace chainrule::cpu

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = CHAINRULE_VERSION;
  info["torch_version"] = CHAINRULE_TORCH_VERSION;
  info["cuda_compiled"] = static_cast<bool>(CHAINRULE_WITH_CUDA);
  pybind11::list archs;
  std::string arch_list = CHAINRULE_CUDA_ARCHS;
  size_t start = 0;
  while (start < arch_list.size()) {
    size_t comma = arch_list.find(',', start);
    if (comma == std::string::npos) comma = arch_list.size();
    archs.append("sm_" + arch_list.substr(start, comma - start));
    start = comma + 1;
  }
  info["cuda_architectures"] = archs;
  info["cpu_simd"] = chainrule::cpu::isa_name();  // [cpu-gemm] active ISA
  // [cpu-gemm] auto | ours | aten: how linear calls choose between our GEMM and ATen's
  info["cpu_gemm"] = chainrule::cpu::gemm_path_mode_name(chainrule::cpu::gemm_path_mode());
  // [cpu-gemm] the data caches cpuid reports (bytes; 0: not reported), which fit our GEMM's
  // blocking
  const chainrule::cpu::CpuCaches& caches = chainrule::cpu::cpu_caches();
  pybind11::dict cpu_caches;
  cpu_caches["l1d"] = caches.l1d;
  cpu_caches["l2"] = caches.l2;
  cpu_caches["l3"] = caches.l3;
  cpu_caches["l2_shared_by"] = caches.l2_shared_by;
  cpu_caches["l3_shared_by"] = caches.l3_shared_by;
  info["cpu_caches"] = cpu_caches;
  info["emulator_available"] = static_cast<bool>(CHAINRULE_EMULATOR_HOOKS);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "chainrule's compiled kernels; use the chainrule package, not this module";
  m.def("build_info", &build_info, "How this chainrule was built (a dict)");
  chainrule::cpu::add_python_hooks(m);  // [cpu-gemm]
  m.def("_set_host_backend",
        [](const std::string& name) {
          if (name == "cpu") {
            chainrule::set_host_backend(chainrule::HostBackend::cpu);
          } else if (name == "emulated_cuda") {
            TORCH_CHECK(CHAINRULE_WITH_EMULATOR,
                        "chainrule: the emulated_cuda backend is not built into this chainrule");
            chainrule::set_host_backend(chainrule::HostBackend::emulated_cuda);
          } else {
            TORCH_CHECK(false, "chainrule: unknown host backend '", name,
                        "'; expected 'cpu' or 'emulated_cuda'");
          }
        });
  m.def("_host_backend", [] {
    return chainrule::host_backend() == chainrule::HostBackend::cpu ? "cpu" : "emulated_cuda";
  });

#if CHAINRULE_EMULATOR_HOOKS
  m.def("_emu_launch_count", [] { return chainrule::emu::launch_count(); });
  m.def("_emu_set_schedule", [](const std::string& name, uint64_t seed) {
    using chainrule::emu::Schedule;
    Schedule schedule = Schedule::forward;
    if (name == "reverse") {
      schedule = Schedule::reverse;
    } else if (name == "random") {
      schedule = Schedule::random;
    } else {
      TORCH_CHECK(name == "forward", "chainrule: unknown emulator schedule '", name,
                  "'; expected 'forward', 'reverse' or 'random'");
    }
    chainrule::emu::set_schedule(schedule, seed);
  });
  chainrule::emulated::add_python_hooks(m);
  m.def("_emu_get_schedule", [] {
    const char* names[] = {"forward", "reverse", "random"};
    return pybind11::make_tuple(names[static_cast<int>(chainrule::emu::schedule())],
                                chainrule::emu::schedule_seed());
  });
#endif
}
