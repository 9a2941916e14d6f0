// Run-time choice of the CPU SIMD path (see isa.h).
#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
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
    unsigned r[4];
    cpuid(7, 1, r);
    return ((r[0] >> 5) & 1u) != 0;
  }();
  return has;
}

void cpuid(unsigned leaf, unsigned subleaf, unsigned regs[4]) {
  unsigned eax = leaf, ebx = 0, ecx = subleaf, edx = 0;
  __asm__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
  regs[0] = eax;
  regs[1] = ebx;
  regs[2] = ecx;
  regs[3] = edx;
}

const char* cpu_vendor() {
  static const std::string vendor = [] {
    unsigned r[4];
    cpuid(0, 0, r);
    char name[13] = {};
    std::memcpy(name, &r[1], 4);
    std::memcpy(name + 4, &r[3], 4);
    std::memcpy(name + 8, &r[2], 4);
    return std::string(name);
  }();
  return vendor.c_str();
}

namespace {
std::mutex g_caches_mutex;
std::optional<CpuCaches> g_caches_override;  // guarded by g_caches_mutex
std::atomic<bool> g_caches_overridden{false};

const CpuCaches& reported_caches() {
  static const CpuCaches caches = [] {
    CpuCaches c;
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    unsigned leaf = 0;
    if (std::strcmp(cpu_vendor(), "GenuineIntel") == 0 && max_leaf >= 4) {
      leaf = 4;
    } else if (std::strcmp(cpu_vendor(), "AuthenticAMD") == 0) {
      cpuid(0x80000000u, 0, r);
      const unsigned max_extended = r[0];
      if (max_extended >= 0x8000001Du) {
        cpuid(0x80000001u, 0, r);
        if ((r[2] >> 22) & 1u) leaf = 0x8000001Du;  // ECX bit 22: topology extensions
      }
    }
    if (leaf == 0) return c;
    // Both leaves list one cache per subleaf until type 0: EAX type (1 data, 3 unified) in bits
    // 4:0, level in 7:5, sharing logical processors - 1 in 25:14; EBX line size - 1 in 11:0,
    // partitions - 1 in 21:12, ways - 1 in 31:22; ECX sets - 1.
    for (unsigned sub = 0; sub < 16; ++sub) {
      cpuid(leaf, sub, r);
      const unsigned type = r[0] & 0x1fu;
      if (type == 0) break;
      if (type != 1 && type != 3) continue;
      const unsigned level = (r[0] >> 5) & 0x7u;
      const int shared = static_cast<int>(((r[0] >> 14) & 0xfffu) + 1);
      const int64_t bytes = static_cast<int64_t>((r[1] >> 22) + 1) * (((r[1] >> 12) & 0x3ffu) + 1) *
                            ((r[1] & 0xfffu) + 1) * (static_cast<int64_t>(r[2]) + 1);
      if (level == 1) c.l1d = bytes;
      if (level == 2) { c.l2 = bytes; c.l2_shared_by = shared; }
      if (level == 3) { c.l3 = bytes; c.l3_shared_by = shared; }
    }
    return c;
  }();
  return caches;
}
}  // namespace

CpuCaches cpu_caches() {
  if (g_caches_overridden.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_caches_mutex);
    if (g_caches_override) return *g_caches_override;
  }
  return reported_caches();
}

void set_cpu_caches_override(std::optional<CpuCaches> caches) {
  std::lock_guard<std::mutex> lock(g_caches_mutex);
  g_caches_override = caches;
  g_caches_overridden.store(caches.has_value(), std::memory_order_release);
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
