// Test hooks over the launch planners shared by csrc/cuda/*.cu and csrc/emulated/*.cpp; see
// hooks.h. Nothing here runs a kernel.
#include "emulated/hooks.h"

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/adam_plan.h"
#include "cuda/linear_plan.h"

namespace chainrule::emulated {

namespace {

using LaunchRecord = std::tuple<std::string, std::tuple<unsigned, unsigned, unsigned>,
                                std::tuple<unsigned, unsigned, unsigned>, size_t>;

// A linear_plan Launcher that records each launch instead of running it.
struct RecordingLauncher {
  std::vector<LaunchRecord> launches;

  template <typename Params>
  void operator()(const char* name, void (*)(Params), dim3 grid, dim3 block, size_t smem_bytes,
                  const Params&) {
    launches.emplace_back(name, std::make_tuple(grid.x, grid.y, grid.z),
                          std::make_tuple(block.x, block.y, block.z), smem_bytes);
  }
};

linear_plan::DType parse_dtype(const std::string& name) {
  if (name == "float64") return linear_plan::DType::float64;
  if (name == "float32") return linear_plan::DType::float32;
  if (name == "bfloat16") return linear_plan::DType::bfloat16;
  TORCH_CHECK(name == "float16", "chainrule._C._linear_plan_launches: unknown dtype '", name, "'");
  return linear_plan::DType::float16;
}

linear_plan::GemmRole parse_role(const std::string& name) {
  if (name == "forward") return linear_plan::GemmRole::forward;
  if (name == "grad_input") return linear_plan::GemmRole::grad_input;
  TORCH_CHECK(name == "grad_weight", "chainrule._C._linear_plan_launches: unknown role '", name,
              "'");
  return linear_plan::GemmRole::grad_weight;
}

// The launches of one GEMM of the linear layer, as the CUDA launcher would make them.
std::vector<LaunchRecord> linear_plan_launches(const std::string& dtype_name,
                                               const std::string& role_name, int64_t m, int64_t n,
                                               int64_t k, bool accumulate) {
  const linear_plan::DType dtype = parse_dtype(dtype_name);
  const linear_plan::GemmRole role = parse_role(role_name);
  const linear_plan::SplitK split = linear_plan::plan_split_k(dtype, role, m, n, k);
  kernels::GemmParams p{};
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.splits = split.splits;
  p.k_per_split = split.k_per_split;
  p.accumulate = accumulate;
  RecordingLauncher launcher;
  linear_plan::launch_gemm(launcher, dtype, role, Activation::none, p);
  return std::move(launcher.launches);
}

// Plans one Adam step over the given lists (no kernel runs) and describes each launch.
pybind11::list adam_plan_launches(const std::vector<at::Tensor>& params,
                                  const std::vector<at::Tensor>& grads,
                                  const std::vector<at::Tensor>& exp_avgs,
                                  const std::vector<at::Tensor>& exp_avg_sqs,
                                  const std::vector<at::Tensor>& state_steps, bool capturing) {
  const std::optional<at::Tensor> none;
  adam_plan::AdamArgs a = adam_plan::make_args(params, grads, exp_avgs, exp_avg_sqs, {},
                                               state_steps, {}, 0.9, 0.999, 0.0, 1e-8, false,
                                               false, false, none, none);
  a.lr = 1e-3;
  pybind11::list out;
  for (const adam_plan::Launch& launch : adam_plan::plan(a, 132 * 3, capturing)) {
    pybind11::dict d;
    d["buffer"] = reinterpret_cast<uintptr_t>(launch.buffer.data_ptr());
    d["counter"] = reinterpret_cast<uintptr_t>(launch.params.blocks_done);
    d["counter_value"] = *launch.params.blocks_done;
    d["grid"] = launch.grid;
    d["kernel_uploads"] = launch.uploads.size();
    out.append(d);
  }
  return out;
}

}  // namespace

void add_python_hooks(pybind11::module_& m) {
  m.def("_emu_set_simulated_capture", &set_simulated_capture,
        "While True, emulated Adam steps are planned as under CUDA graph capture");
  m.def("_adam_plan_stats", [] {
    auto& s = adam_plan::stats();
    pybind11::dict d;
    d["entries"] = adam_plan::cache_size();
    d["metadata_uploads"] = s.metadata_uploads.load();
    d["gradient_uploads"] = s.gradient_uploads.load();
    d["staged_uploads"] = s.staged_uploads.load();
    d["kernel_uploads"] = s.kernel_uploads.load();
    return d;
  });
  m.def("_adam_plan_launches", &adam_plan_launches);
  m.def("_linear_plan_launches", &linear_plan_launches);
}

}  // namespace chainrule::emulated
