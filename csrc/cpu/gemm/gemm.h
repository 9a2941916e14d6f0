// Our CPU GEMM with the linear layer's epilogues fused (see ARCHITECTURE.md, "CPU GEMM").
//
//   C (m x n, row-major) = act( op(A) · op(B) + bias )          forward  X·Wᵀ
//   C                    = (dY ⊙ act'(pre)) · W                  dgrad    dZ·W
//   C                   += (dY ⊙ act'(pre))ᵀ · X                 wgrad    dZᵀ·X, beta = 1
//
// A (m x k) and B (k x n) are strided views of torch's row-major tensors: exactly one of each
// view's strides is 1, which covers the three layouts without copies. The activation derivative
// is applied to A while it is packed; the bias, the activation, the pre-activation store and the
// beta = 1 accumulation are applied while the micro-tile is written back.
#pragma once

#include <cstdint>

#include "chainrule/activation.h"
#include "cpu/isa.h"

namespace chainrule::cpu::gemm {

enum class ElementType : int { float32, bfloat16 };

struct Problem {
  int64_t m = 0, n = 0, k = 0;
  ElementType type = ElementType::float32;  // of A, B, C, bias, pre_activation, a_pre

  // A(i, p) = a[i * a_row_stride + p * a_col_stride]; one of the two strides is 1.
  const void* a = nullptr;
  int64_t a_row_stride = 0, a_col_stride = 0;
  // When activation_grad != none, A(i, p) is replaced by A(i, p) * act'(a_pre(i, p)) while it
  // is packed (a_pre has A's strides): dZ = dY ⊙ act'(pre-activation).
  Activation activation_grad = Activation::none;
  const void* a_pre = nullptr;
  // When set, a_row_sums[i] += Σ_p A(i, p) (after the derivative): the bias gradient of wgrad.
  float* a_row_sums = nullptr;
  // When set (A with rows contiguous only), the transformed A (dZ) is also written here, with
  // A's strides, in A's element type: dgrad hands dZ to wgrad so act' is evaluated once.
  void* a_transformed = nullptr;

  // B(p, j) = b[p * b_row_stride + j * b_col_stride]; one of the two strides is 1.
  const void* b = nullptr;
  int64_t b_row_stride = 0, b_col_stride = 0;

  void* c = nullptr;  // row-major, leading dimension ldc
  int64_t ldc = 0;
  bool accumulate = false;  // C += A·B (beta = 1) instead of C = ...

  // Forward epilogue: z = A·B + bias; pre_activation = z (ldc); C = act(z).
  const void* bias = nullptr;  // length n
  Activation activation = Activation::none;
  void* pre_activation = nullptr;
};

// The cache blocks our GEMM runs with. Packed panels are stored in 4-byte units: one float
// (fp32) or one pair of bf16 values adjacent in k (bf16, the operand layout of vdpbf16ps).
struct Blocking {
  int mr, nr;          // micro-tile
  int64_t kc, mc, nc;  // cache blocks, in elements of k, m, n (kc is even); mc is an upper bound
  int64_t a_block_bytes;  // run() picks mc so the packed mc x kc A block is about this
};

// The blocking of `isa`'s kernel for `type` on a CPU with `caches`, for a GEMM on `threads`
// threads (run() asks with cpu_caches() and its threads); false where there is no kernel. Each
// kernel's blocking was tuned on a CPU with a 1 MiB L2 per core and 16 MiB of L3 per thread (a
// 2-core Zen 4) and is fitted to other caches (docs/cpu_gemm.md, "Blocking per CPU"): the packed
// A block scales with the L2 that the kc x nr B micro-panel leaves; each thread's kc x nc B block
// shrinks with less L3 per thread (of the GEMM's threads, those that share it), and never grows
// past the tuned nc. A cache cpuid does not report keeps the tuned value. kc and the micro-tile
// stay as tuned, so the order of every sum, and so the results' bits, do not depend on the caches.
bool blocking_for(CpuIsa isa, ElementType type, const CpuCaches& caches, int threads,
                  Blocking* out);

// Whether our kernels run `problem` with `isa` (fp32 needs avx2 or avx512; bf16 needs avx512
// with AVX512_BF16). Otherwise the caller uses ATen's GEMM.
bool supports(CpuIsa isa, ElementType type);

// out[i] = act(in[i]) (or act'(in[i]) when `derivative`) with the vector activations that the
// kernels of `isa` use (avx512 or avx2); exposed so tests can hold them against activation.h.
void activation_map(CpuIsa isa, Activation activation, bool derivative, const float* in,
                    float* out, int64_t n);

// Runs `problem` on at::get_num_threads() threads. Requires supports(isa, problem.type).
void run(const Problem& problem, CpuIsa isa);

// The decoding-sized forward product, for at most kGemvMaxRows input rows:
//   acc (m x n, float32, row-major) = X · Wᵀ,  X (m x k) and W (n x k) row-major in `type`.
// Every weight row is read once, straight from memory, with no packing (packing W, as run() does,
// is never paid back by so few rows); the sums are float32 in a fixed order per output, so the
// bits do not depend on the thread count. Needs avx512 or avx2 (bf16 is widened exactly; no
// AVX512_BF16 needed).
constexpr int64_t kGemvMaxRows = 8;
bool gemv_supports(CpuIsa isa);
// AMX: the CPU has AMX-BF16 tiles and the OS granted this process their state (asked once, on
// the first call). gemv's bf16 product of m >= kAmxMinRows rows runs on the tiles
// (csrc/cpu/gemm/gemv_amx.cpp) with ISA avx512 and k >= kAmxStepK, the values of k one tile row
// holds. Of 1-3 rows the vector kernel kept up (docs/cpu_gemm.md, "Small batches: the GEMV").
constexpr int64_t kAmxStepK = 32;
constexpr int64_t kAmxMinRows = 4;
bool amx_available();
bool uses_amx_gemv(CpuIsa isa, int64_t m, int64_t k);
// bf16_dot: a bf16 product not on the tiles runs on vdpbf16ps (the input rows kept bf16) instead
// of widening the weight for FMAs; needs gemv_bf16_dot_supports(isa): ISA avx512 on a CPU with
// AVX512_BF16 (where it is faster is the caller's rule: gemm_path.h, uses_bf16_dot_gemv).
bool gemv_bf16_dot_supports(CpuIsa isa);
void gemv(ElementType type, CpuIsa isa, const void* x, int64_t m, int64_t k, const void* w,
          int64_t n, float* acc, bool bf16_dot = false);

}  // namespace chainrule::cpu::gemm
