// Internal interface between the ISA-neutral GEMM front end (gemm.cpp: threading, workspace)
// and the per-ISA translation units (gemm_avx512.cpp, gemm_avx2.cpp), which are the only files
// compiled with -mavx512* / -mavx2 flags.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace chainrule::cpu::gemm {

// Per-thread scratch handed to a block by the front end.
struct Workspace {
  uint32_t* a_pack;  // ceil(mc / mr) * mr * ceil(kc / 2 or 1) units
  uint32_t* b_pack;  // ceil(nc / nr) * nr * ... units
  float* partial;    // non-fp32 outputs with k > kc: fp32 partial sums, rows x nc
  int64_t partial_ld;
};

// Computes the rows [m0, m1) x columns [n0, n1) of `problem` on the calling thread. The thread
// owning column 0 (`owns_row_sums`) adds to problem.a_row_sums.
using BlockFn = void (*)(const Problem& problem, const Blocking& blocking, int64_t m0, int64_t m1,
                         int64_t n0, int64_t n1, bool owns_row_sums, const Workspace& workspace);

// The caches of the CPU the kernel sets' blockings were tuned on (AMD Zen 4, 2 threads: 1 MiB of
// L2 per core, 32 MiB of L3 shared by both, 16 MiB per thread); fitted_blocking scales them to
// other caches.
constexpr int64_t kTunedL2Bytes = int64_t{1} << 20;
constexpr int64_t kTunedL3BytesPerThread = int64_t{16} << 20;

struct KernelSet {
  Blocking blocking;  // as tuned; run() fits it to the CPU's caches (fitted_blocking)
  BlockFn run_block;
};

// nullptr when this build or this element type has no kernel for the ISA.
const KernelSet* avx512_kernels(ElementType type);
const KernelSet* avx2_kernels(ElementType type);

// gemv's per-ISA part (gemv_kernel.h): acc(i, j) for the weight rows [j0, j1), m <= kGemvMaxRows
// rows of input x; w holds float or bf16 bits by the function's element type. x is float32
// (bf16 widened) for avx512_gemv / avx2_gemv, bf16 bits for avx512_gemv_bf16_dot (vdpbf16ps:
// needs AVX512_BF16).
using GemvFn = void (*)(const void* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
                        float* acc, int64_t ldacc);
GemvFn avx512_gemv(ElementType type);
GemvFn avx2_gemv(ElementType type);
GemvFn avx512_gemv_bf16_dot();

// The bf16 GEMV on AMX tiles (gemv_amx.cpp). amx_pack_input: the m <= 16 input rows as the B
// tile of each 32-wide step of k, amx_packed_input_units(m, k) units. amx_gemv_bf16: acc(i, j)
// for the whole 16-row tiles of weight rows from j0 (at most j1); returns the first row not done.
inline int64_t amx_packed_input_units(int64_t m, int64_t k) { return k / kAmxStepK * 16 * m; }
void amx_pack_input(const uint16_t* x, int m, int64_t k, uint32_t* packed);
int64_t amx_gemv_bf16(const uint32_t* packed, const uint16_t* x, int m, int64_t k,
                      const uint16_t* w, int64_t j0, int64_t j1, float* acc, int64_t ldacc);

// out[i] = act(in[i]) or act'(in[i]) with the ISA's vector activations (tests compare them with
// the scalar functions of chainrule/activation.h).
void avx512_activation_map(Activation activation, bool derivative, const float* in, float* out,
                           int64_t n);
void avx2_activation_map(Activation activation, bool derivative, const float* in, float* out,
                         int64_t n);

}  // namespace chainrule::cpu::gemm
