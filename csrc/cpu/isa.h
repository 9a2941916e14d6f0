// Which SIMD instruction set the CPU kernels use, chosen at run time.
//
// Detection reads the CPU's features (cpuid via __builtin_cpu_supports). The environment variable
// CHAINRULE_CPU_ISA=avx512|avx2|fallback, read once, or set_isa_override() (tests) forces a lower
// path; asking for a path the CPU cannot run is an error. "fallback" means ATen's GEMM with our
// fused epilogues.
#pragma once

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

}  // namespace chainrule::cpu
