// The rule that picks our GEMM or ATen's for a CPU linear-layer call (see gemm_path.h and
// docs/cpu_gemm.md, "Which GEMM runs", for the measurements behind each branch).
#include "cpu/gemm_path.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace chainrule::cpu {

namespace {

CpuTraits read_cpu_traits() {
  CpuTraits t;
  const char* vendor = cpu_vendor();
  if (std::strcmp(vendor, "GenuineIntel") == 0) t.vendor = CpuTraits::Vendor::intel;
  if (std::strcmp(vendor, "AuthenticAMD") == 0) t.vendor = CpuTraits::Vendor::amd;
  unsigned r[4];
  cpuid(1, 0, r);
  const unsigned base_family = (r[0] >> 8) & 0xf, base_model = (r[0] >> 4) & 0xf;
  t.family = static_cast<int>(base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family);
  t.model = static_cast<int>(base_family == 0x6 || base_family == 0xf
                                 ? (((r[0] >> 16) & 0xf) << 4) | base_model
                                 : base_model);
  t.avx512_bf16 = cpu_has_avx512_bf16();
  // AMX-BF16 tiles (cpuid leaf 7) whose state the OS granted this process.
  t.amx_bf16 = gemm::amx_available();
  return t;
}

// -1: no override; otherwise a GemmPathMode value.
std::atomic<int> g_mode_override{-1};

GemmPathMode mode_from_environment() {
  const char* env = std::getenv("CHAINRULE_CPU_GEMM");
  if (env == nullptr || *env == 0) return GemmPathMode::automatic;
  GemmPathMode mode;
  TORCH_CHECK(parse_gemm_path_mode(env, &mode),
              "CHAINRULE_CPU_GEMM: expected auto, ours or aten, got '", env, "'");
  return mode;
}

bool low_precision(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf;
}

}  // namespace

const CpuTraits& cpu_traits() {
  static const CpuTraits traits = read_cpu_traits();
  return traits;
}

bool aten_multiplies_low_precision(const CpuTraits& cpu, at::ScalarType dtype) {
  return low_precision(dtype) && (cpu.avx512_bf16 || cpu.amx_bf16);
}

std::optional<gemm::ElementType> our_gemm_type(at::ScalarType dtype, CpuIsa isa) {
  std::optional<gemm::ElementType> type;
  if (dtype == at::kFloat) type = gemm::ElementType::float32;
  if (dtype == at::kBFloat16) type = gemm::ElementType::bfloat16;
  if (type && !gemm::supports(isa, *type)) type.reset();
  return type;
}

at::ScalarType aten_compute_type(at::ScalarType dtype) {
  if (!low_precision(dtype)) return dtype;
  return aten_multiplies_low_precision(cpu_traits(), dtype) ? dtype : at::kFloat;
}

GemmPath choose_gemm_path(const CpuTraits& cpu, bool ours_available, at::ScalarType dtype,
                          LinearPass /*pass: both take one answer, below*/, int64_t m, int64_t n,
                          int64_t k) {
  if (!ours_available) return GemmPath::aten;
  // bf16: oneDNN's bf16 GEMM (vdpbf16ps, AMX tiles where present) ran ahead of ours on every CPU
  // measured (Zen 4, Zen 5, an AMX Xeon); ours stays available with CHAINRULE_CPU_GEMM=ours.
  if (dtype != at::kFloat) return GemmPath::aten;
  // fp32 on Intel: MKL on its own vendor's CPUs ran ahead of ours at every shape measured (Ice
  // Lake, an AMX Xeon). On CPUs of other vendors MKL takes slower code paths, and ours wins once
  // the problem is large enough to amortise packing. Measured shape by shape on a Zen 4 (the
  // 240-row sweep of benchmarks/bench_sweep.py, docs/cpu_gemm.md): ours lost at M = 33 (0.76-0.95x
  // eager in the forward, mixed ours/ATen calls 0.85-0.91x) and at 4096 x 64 x 64 (0.78-0.86x),
  // and with this rule every row on ours ran 1.01-1.57x. Both passes take one answer, from the
  // same three sizes: the batch (M, wgrad's k) at least 64 rows, K and N above 64.
  if (cpu.vendor != CpuTraits::Vendor::amd) return GemmPath::aten;
  constexpr int64_t kMinRows = 64, kMinFeatures = 65;
  return m >= kMinRows && n >= kMinFeatures && k >= kMinFeatures ? GemmPath::ours : GemmPath::aten;
}

GemmPathMode gemm_path_mode() {
  const int forced = g_mode_override.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<GemmPathMode>(forced);
  static const GemmPathMode from_env = mode_from_environment();
  return from_env;
}

void set_gemm_path_mode(std::optional<GemmPathMode> mode) {
  g_mode_override.store(mode ? static_cast<int>(*mode) : -1);
}

GemmPath gemm_path(at::ScalarType dtype, bool ours_available, LinearPass pass, int64_t m,
                   int64_t n, int64_t k) {
  if (!ours_available) return GemmPath::aten;
  switch (gemm_path_mode()) {
    case GemmPathMode::ours: return GemmPath::ours;
    case GemmPathMode::aten: return GemmPath::aten;
    case GemmPathMode::automatic: break;
  }
  return choose_gemm_path(cpu_traits(), ours_available, dtype, pass, m, n, k);
}

// -1: not set yet (CHAINRULE_CPU_TORCH_OPS=0 turns it off, for tests' subprocesses); 0 / 1.
std::atomic<int> g_small_layers_to_torch{-1};

void set_small_layers_to_torch(bool enabled) { g_small_layers_to_torch.store(enabled ? 1 : 0); }

bool small_layers_to_torch() {
  int value = g_small_layers_to_torch.load(std::memory_order_relaxed);
  if (value < 0) {
    const char* env = std::getenv("CHAINRULE_CPU_TORCH_OPS");
    value = env != nullptr && std::string_view(env) == "0" ? 0 : 1;
    int unset = -1;
    g_small_layers_to_torch.compare_exchange_strong(unset, value);
  }
  return value != 0;
}

bool choose_gemv(const CpuTraits& cpu, CpuIsa isa, at::ScalarType dtype, int64_t m, int64_t n,
                 int64_t k) {
  if (!gemm::gemv_supports(isa) || m < 1 || m > gemm::kGemvMaxRows || k < 1 || n < 1) {
    return false;
  }
  // The measurements behind each branch: docs/cpu_gemm.md, "Small batches: the GEMV".
  // bf16: up to 4 rows on the vector kernel that widens the weight. From 5 it is bound by its
  // FMAs, and oneDNN's product kept up (the kernel alone 0.95-1.18x at 8 rows of 1024x1024 and
  // 768x3072 on an AMX Xeon). Where the CPU has AMX tiles (ISA avx512, k >= 32), 4-8 rows run on
  // them: 16 weight rows x 32 of k x m rows is one instruction, and the kernel runs at the speed
  // the weight streams in (1.8-2.8x oneDNN's AMX product at 8 rows). Where the kernel runs on
  // vdpbf16ps (bf16_dot_gemv), it multiplies twice the values of k per instruction and every row
  // count takes it.
  constexpr int64_t kBf16MaxRows = 4;
  if (dtype == at::kBFloat16) {
    return m <= kBf16MaxRows || bf16_dot_gemv(cpu, isa) ||
           (cpu.amx_bf16 && isa == CpuIsa::avx512 && k >= gemm::kAmxStepK);
  }
  if (dtype != at::kFloat) return false;
  // fp32: on AMD, MKL's product of a few rows ran far behind at every row count measured. On
  // Intel it kept up for 1-3 rows, where the op's fixed cost made the layer 0.72-1.00x eager, and
  // slowed down from 4 (the kernel alone 1.32-2.24x at 4-8 rows). CPUs of other vendors were never
  // measured and keep ATen's.
  constexpr int64_t kIntelMinRows = 4;
  if (cpu.vendor == CpuTraits::Vendor::amd) return true;
  return cpu.vendor == CpuTraits::Vendor::intel && m >= kIntelMinRows;
}

bool bf16_dot_gemv(const CpuTraits& cpu, CpuIsa isa) {
  // AMD's Zen 4 and Zen 5 run vdpbf16ps at the rate of an FMA (probe: 463 against 232 GFLOP/s on
  // a Zen 4), so one instruction does the work of two FMAs and the widening: 1.01-1.75x the
  // widened kernel there at 1-8 rows (docs/cpu_gemm.md). Intel's run it on one port, at half the
  // rate of its FMAs (214 against 427 GFLOP/s on an AMX Xeon), where it was not measured.
  return cpu.vendor == CpuTraits::Vendor::amd && cpu.avx512_bf16 && isa == CpuIsa::avx512;
}

bool uses_bf16_dot_gemv(CpuIsa isa) { return bf16_dot_gemv(cpu_traits(), isa); }

bool uses_gemv(at::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  if (gemm_path_mode() == GemmPathMode::aten) return false;
  return choose_gemv(cpu_traits(), active_isa(), dtype, m, n, k);
}

// The switches of functional.linear's first step (prefers_torch_ops, calls_forward_kernel).
bool first_step_on() {
  return small_layers_to_torch() && gemm_path_mode() == GemmPathMode::automatic;
}

bool prefers_torch_ops(at::ScalarType dtype, int64_t m, int64_t n, int64_t k, bool accumulate,
                       bool needs_grad) {
  if (!first_step_on()) return false;
  if (uses_gemv(dtype, m, n, k) &&
      (!needs_grad || (m <= kGemvGradMaxRows && n * k >= kGemvGradMinWeights))) {
    return false;
  }
  // 2^21 multiply-adds: a 1 x 1024 x 1024 or 512 x 64 x 64 layer, ~20-100 µs of work on two
  // cores, about what chainrule's Python layers and op dispatch cost (bench_sweep.py).
  constexpr double kMaxMultiplyAdds = double(1 << 21);
  if (static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) <= kMaxMultiplyAdds) {
    return true;
  }
  if (accumulate) return false;
  // chainrule's widened path beats ATen's slow bf16/fp16 GEMM on CPUs without bf16 instructions.
  if (aten_compute_type(dtype) != dtype) return false;
  const bool ours = our_gemm_type(dtype, active_isa()).has_value();
  return gemm_path(dtype, ours, LinearPass::forward, m, n, k) == GemmPath::aten &&
         gemm_path(dtype, ours, LinearPass::backward, m, n, k) == GemmPath::aten;
}

bool calls_forward_kernel(bool needs_grad) {
  return !needs_grad && first_step_on();
}

bool parse_gemm_path_mode(std::string_view name, GemmPathMode* out) {
  for (GemmPathMode mode : {GemmPathMode::automatic, GemmPathMode::ours, GemmPathMode::aten}) {
    if (name == gemm_path_mode_name(mode)) {
      *out = mode;
      return true;
    }
  }
  return false;
}

const char* gemm_path_mode_name(GemmPathMode mode) {
  switch (mode) {
    case GemmPathMode::automatic: return "auto";
    case GemmPathMode::ours: return "ours";
    case GemmPathMode::aten: return "aten";
  }
  return "?";
}

const char* gemm_path_name(GemmPath path) { return path == GemmPath::ours ? "ours" : "aten"; }

const char* vendor_name(CpuTraits::Vendor vendor) {
  switch (vendor) {
    case CpuTraits::Vendor::intel: return "intel";
    case CpuTraits::Vendor::amd: return "amd";
    case CpuTraits::Vendor::other: return "other";
  }
  return "?";
}

}  // namespace chainrule::cpu
