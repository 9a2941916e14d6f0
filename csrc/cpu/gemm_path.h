// Which GEMM a CPU linear-layer call runs on: ours (csrc/cpu/gemm/, the epilogues fused into it)
// or ATen's (MKL / oneDNN) followed by our one-pass epilogues. Both compute the same function; the
// choice is for speed only, so it is made by a rule that depends on nothing but the CPU and the
// problem, and the same call always takes the same path (the results' bits do not depend on
// timing). docs/cpu_gemm.md, "Which GEMM runs", gives the measurements behind the rule.
//
//   CHAINRULE_CPU_GEMM=auto|ours|aten   (read once; default auto) or set_gemm_path_mode() (tests)
//
// "ours" still falls back to ATen where our kernels cannot run (float64, float16, bf16 without
// AVX512_BF16, ISA "fallback"); "aten" never runs our GEMM.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include <c10/core/ScalarType.h>

#include "cpu/gemm/gemm.h"
#include "cpu/isa.h"

namespace chainrule::cpu {

enum class GemmPath : int { ours = 0, aten = 1 };
enum class GemmPathMode : int { automatic = 0, ours = 1, aten = 2 };
enum class LinearPass : int { forward = 0, backward = 1 };

// What the rule needs to know of the CPU (from cpuid).
struct CpuTraits {
  enum class Vendor : int { intel, amd, other } vendor = Vendor::other;
  int family = 0, model = 0;     // display family / model
  bool avx512_bf16 = false;      // vdpbf16ps
  bool amx_bf16 = false;         // AMX tiles with bf16 (Sapphire Rapids and later), OS-granted
};
const CpuTraits& cpu_traits();

// The rule itself, a pure function so tests can hold it against every CPU class. m, n, k are
// the layer's rows (batch x tokens), out_features and in_features; `ours_available` says whether
// our kernels run this dtype on the active ISA.
GemmPath choose_gemm_path(const CpuTraits& cpu, bool ours_available, at::ScalarType dtype,
                          LinearPass pass, int64_t m, int64_t n, int64_t k);

// The path this process takes for the call: the mode (environment or override) applied to
// choose_gemm_path on this CPU.
GemmPath gemm_path(at::ScalarType dtype, bool ours_available, LinearPass pass, int64_t m,
                   int64_t n, int64_t k);

// Whether chainrule.functional.linear should run a CPU layer as torch's own ops (F.linear + the
// activation) instead of calling chainrule's: when the layer is so small (at most 2^21
// multiply-adds) that the fixed cost of a custom op and an autograd.Function, tens of
// microseconds of Python and dispatch, exceeds the work; and when the rule gives ATen's GEMM to
// both passes in the dtype as it is and nothing is accumulated into .grad, since ATen's path then
// runs the very ops eager PyTorch runs and would only add that fixed cost. Only in auto mode, and
// only while set_small_layers_to_torch(true) (the default, unless CHAINRULE_CPU_TORCH_OPS=0; the
// test suite turns it off to test chainrule's own code at every size).
// A forward that takes our GEMV (uses_gemv) is the exception: without a gradient (decoding) at
// every weight size (calls_forward_kernel); with one, of at most kGemvGradMaxRows rows and a
// weight of at least kGemvGradMinWeights values, where the GEMV's forward saves more than the op
// and the autograd.Function cost (the backward runs on ATen's GEMM, as eager's does): forward +
// backward 1.09-1.21x eager on the Zen 4 (docs/cpu_gemm.md, "Calls without a gradient"); at
// 8 rows 0.98-1.10x, at 1 x 256 x 256 0.90x.
constexpr int64_t kGemvGradMaxRows = 4;
constexpr int64_t kGemvGradMinWeights = int64_t{1} << 18;
bool prefers_torch_ops(at::ScalarType dtype, int64_t m, int64_t n, int64_t k, bool accumulate,
                       bool needs_grad = true);

// Whether chainrule.functional.linear computes a CPU layer that prefers_torch_ops leaves to
// chainrule by calling chainrule.linear_forward's CPU kernel itself, behind the op's checks, but
// without the dispatcher and the Python op call (~5 µs, more than the GEMV of a small weight
// takes): when it needs no gradient, under the same switches as prefers_torch_ops. The result is
// the op's, bit for bit.
bool calls_forward_kernel(bool needs_grad);

// Whether a forward of m <= gemm::kGemvMaxRows rows runs on our GEMV (gemm::gemv: the weight
// streamed once, no packing) instead of the GEMM the rule picks: float32 on AMD (MKL's small-m
// products ran far behind there) and on Intel from 4 rows (MKL's 4-row product took twice its
// 1-row time; other vendors unmeasured), and bfloat16 of at most 4 rows on every CPU (oneDNN's
// and the widened path's small-m bf16 products ran at a fraction of the memory bandwidth), of
// 4-8 on AMX tiles, of every row count where the GEMV runs on vdpbf16ps; at every weight size
// (the GEMV of a 64 x 64 weight takes ~0.2 µs, ATen's product microseconds, oneDNN's bf16 one
// tens); where the ISA has a GEMV (avx512, avx2); in auto and ours mode.
// choose_gemv is the rule, uses_gemv this process's answer.
bool choose_gemv(const CpuTraits& cpu, CpuIsa isa, at::ScalarType dtype, int64_t m, int64_t n,
                 int64_t k);
bool uses_gemv(at::ScalarType dtype, int64_t m, int64_t n, int64_t k);
// Whether the GEMV's bf16 product (off the AMX tiles) runs on vdpbf16ps rather than widening the
// weight for FMAs: on AMD CPUs with AVX512_BF16, ISA avx512 (gemm::gemv's bf16_dot).
bool bf16_dot_gemv(const CpuTraits& cpu, CpuIsa isa);
bool uses_bf16_dot_gemv(CpuIsa isa);
void set_small_layers_to_torch(bool enabled);

// The element type our GEMM runs `dtype` in on `isa`, or nullopt where our kernels cannot run it
// (float64, float16, bf16 without AVX512_BF16, ISA "fallback").
std::optional<gemm::ElementType> our_gemm_type(at::ScalarType dtype, CpuIsa isa);

// The type ATen's path multiplies `dtype` in: the dtype itself, or float32 for bfloat16/float16
// on a CPU whose oneDNN has no bf16 instructions to run them on.
at::ScalarType aten_compute_type(at::ScalarType dtype);

// Whether ATen's path multiplies bfloat16/float16 operands as they are (oneDNN's bf16 kernels on
// CPUs with bf16 dot products or AMX: fp32 accumulation, one rounding, as F.linear does) rather
// than widened to float32 first (CPUs without bf16 instructions, where ATen's bf16 GEMM is slow).
bool aten_multiplies_low_precision(const CpuTraits& cpu, at::ScalarType dtype);

GemmPathMode gemm_path_mode();
void set_gemm_path_mode(std::optional<GemmPathMode> mode);  // nullopt: back to the environment
bool parse_gemm_path_mode(std::string_view name, GemmPathMode* out);
const char* gemm_path_mode_name(GemmPathMode mode);
const char* gemm_path_name(GemmPath path);
const char* vendor_name(CpuTraits::Vendor vendor);

}  // namespace chainrule::cpu
