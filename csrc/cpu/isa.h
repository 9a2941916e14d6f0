// Which SIMD instruction set the CPU kernels use, chosen at run time.
//
// Detection reads the CPU's features (cpuid via __builtin_cpu_supports). The environment variable
// CHAINRULE_CPU_ISA=avx512|avx2|fallback, read once, or set_isa_override() (tests) forces a lower
// path; asking for a path the CPU cannot run is an error. "fallback" means ATen's GEMM with our
// fused epilogues.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace chainrule::cpu {

enum class CpuIsa : int { fallback = 0, avx2 = 1, avx512 = 2 };

// Best ISA this CPU supports (avx512 needs AVX-512 F/BW/VL/DQ; avx2 needs AVX2 + FMA).
CpuIsa detected_isa();
// Whether the CPU has AVX512_BF16 (vdpbf16ps); the bf16 GEMM needs it on top of avx512.
bool cpu_has_avx512_bf16();
// The ISA the kernels use now: the override if set, else CHAINRULE_CPU_ISA, else detected_isa().
CpuIsa active_isa();
// Forces an ISA (std::nullopt clears the override and returns to the environment/detection).
// Throws (TORCH_CHECK) when the CPU cannot run `isa`.
void set_isa_override(std::optional<CpuIsa> isa);
// Parses "avx512" | "avx2" | "fallback"; false for anything else.
bool parse_isa(std::string_view name, CpuIsa* out);
const char* isa_name(CpuIsa isa);
inline const char* isa_name() { return isa_name(active_isa()); }

// One cpuid query: regs = eax, ebx, ecx, edx of (leaf, subleaf).
void cpuid(unsigned leaf, unsigned subleaf, unsigned regs[4]);
// The vendor string of cpuid leaf 0 ("GenuineIntel", "AuthenticAMD", ...).
const char* cpu_vendor();

// The data caches one core sees, as cpuid describes them (Intel: leaf 4; AMD: leaf 0x8000001D,
// with the topology extensions): sizes in bytes, and how many logical processors share each.
// 0 where the CPU does not say (other vendors, a hypervisor that hides the leaves).
struct CpuCaches {
  int64_t l1d = 0, l2 = 0, l3 = 0;
  int l2_shared_by = 0, l3_shared_by = 0;
};
// cpuid's answer, or the caches set_cpu_caches_override describes.
CpuCaches cpu_caches();
// Describes other caches to the GEMM's blocking (tests, and timing another CPU's blocking on this
// one); std::nullopt returns to cpuid's.
void set_cpu_caches_override(std::optional<CpuCaches> caches);

}  // namespace chainrule::cpu
