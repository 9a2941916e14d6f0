// Run-time choice of the CPU SIMD path (see isa.h).
#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace chainrule::cpu {

namespace {
// -1: no override; otherwise a CpuIsa value.
std::atomic<int> g_override{-1};

CpuIsa from_environment() {
  const char* env = std::getenv("CHAINRULE_CPU_ISA");
  CpuIsa best = detected_isa();
  if (env == nullptr || *env == 0) return best;
  CpuIsa asked;
  TORCH_CHECK(parse_isa(env, &asked), "CHAINRULE_CPU_ISA: expected avx512, avx2 or fallback, got '",
              env, "'");
  TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), "CHAINRULE_CPU_ISA=", env,
              ": this CPU supports at most ", isa_name(best));
  return asked;
}
}  // namespace

CpuIsa detected_isa() {
  static const CpuIsa detected = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma")) {
      return CpuIsa::avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
    return CpuIsa::fallback;
  }();
  return detected;
}

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    if (detected_isa() != CpuIsa::avx512) return false;
    // CPUID.(EAX=7, ECX=1):EAX bit 5 = AVX512_BF16.
    unsigned eax = 7, ebx = 0, ecx = 1, edx = 0;
    __asm__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    return ((eax >> 5) & 1u) != 0;
  }();
  return has;
}

CpuIsa active_isa() {
  int forced = g_override.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<CpuIsa>(forced);
  static const CpuIsa from_env = from_environment();
  return from_env;
}

void set_isa_override(std::optional<CpuIsa> isa) {
  if (!isa) {
    g_override.store(-1);
    return;
  }
  TORCH_CHECK(static_cast<int>(*isa) <= static_cast<int>(detected_isa()),
              "chainrule: cannot force the CPU ISA to ", isa_name(*isa),
              ": this CPU supports at most ", isa_name(detected_isa()));
  g_override.store(static_cast<int>(*isa));
}

bool parse_isa(std::string_view name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::fallback, CpuIsa::avx2, CpuIsa::avx512}) {
    if (name == isa_name(isa)) {
      *out = isa;
      return true;
    }
  }
  return false;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::fallback: return "fallback";
  }
  return "?";
}

}  // namespace chainrule::cpu
