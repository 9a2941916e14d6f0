// ISA-neutral front end of the CPU GEMM: splits C over threads, allocates each thread's packing
// buffers and calls the ISA's block function. Compiled without -m flags.
#include "cpu/gemm/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu/gemm/gemm_kernels.h"

namespace chainrule::cpu::gemm {

namespace {

const KernelSet* kernels_for(CpuIsa isa, ElementType type) {
  switch (isa) {
    case CpuIsa::avx512:
      if (type == ElementType::bfloat16 && !cpu_has_avx512_bf16()) return nullptr;
      return avx512_kernels(type);
    case CpuIsa::avx2: return avx2_kernels(type);
    case CpuIsa::fallback: return nullptr;
  }
  return nullptr;
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<void, AlignedFree>;

Buffer allocate(size_t bytes) {
  if (bytes == 0) return Buffer(nullptr);
  void* p = std::aligned_alloc(64, round_up(static_cast<int64_t>(bytes), 64));
  if (p == nullptr) throw std::bad_alloc();
  return Buffer(p);
}

// How the threads tile C: a grid of row_parts x col_parts blocks. Every block packs its own A rows
// (once per nc columns) and B columns, so the grid that packs least is the one whose blocks are
// most square in (m, n); rows are preferred (they share nothing in the write-back).
void choose_grid(int64_t m, int64_t n, const Blocking& bl, int threads, int* row_parts,
                 int* col_parts) {
  const int64_t row_tiles = (m + bl.mr - 1) / bl.mr;
  const int64_t col_tiles = (n + bl.nr - 1) / bl.nr;
  int best_rows = 1;
  double best_cost = -1;
  for (int rows = 1; rows <= threads; ++rows) {
    if (threads % rows != 0) continue;
    const int cols = threads / rows;
    if (rows > row_tiles || cols > col_tiles) continue;
    // Elements packed: each column part packs all of A once, each row part all of B once.
    const double cost = static_cast<double>(cols) * m + static_cast<double>(rows) * n;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_rows = rows;
    }
  }
  *row_parts = best_rows;
  *col_parts = std::max<int64_t>(1, std::min<int64_t>(threads / best_rows, col_tiles));
}

// [begin, end) of part `index` of `parts` over `extent`, in whole multiples of `unit`.
std::pair<int64_t, int64_t> part_range(int64_t extent, int64_t unit, int parts, int index) {
  const int64_t tiles = (extent + unit - 1) / unit;
  const int64_t begin = tiles * index / parts * unit;
  const int64_t end = std::min(extent, tiles * (index + 1) / parts * unit);
  return {std::min(begin, extent), end};
}

// See blocking_for (gemm.h).
Blocking fitted_blocking(const Blocking& tuned, ElementType type, const CpuCaches& caches,
                         int threads) {
  Blocking bl = tuned;
  const int64_t ku = type == ElementType::float32 ? 1 : 2;
  const int64_t panel_row_bytes = 4 * ((tuned.kc + ku - 1) / ku);  // one packed row of kc
  if (caches.l2 > 0) {
    // The L2 the B micro-panel leaves, in proportion to what it left on the tuning CPU; at least
    // one micro-panel of A.
    const int64_t b_panel = panel_row_bytes * tuned.nr;
    const int64_t left = std::max<int64_t>(caches.l2 - b_panel, 0);
    bl.a_block_bytes = std::max(tuned.a_block_bytes * left / (kTunedL2Bytes - b_panel),
                                panel_row_bytes * tuned.mr);
  }
  if (caches.l3 > 0) {
    // The L3 per thread of the GEMM's (of those that share it), against the tuning CPU's.
    const int64_t sharing = std::clamp(threads, 1, std::max(caches.l3_shared_by, 1));
    const int64_t per_thread = caches.l3 / sharing;
    if (per_thread < kTunedL3BytesPerThread) {
      const int64_t nc = tuned.nc * per_thread / kTunedL3BytesPerThread / tuned.nr * tuned.nr;
      bl.nc = std::max<int64_t>(nc, tuned.nr);
    }
  }
  return bl;
}

}  // namespace

void activation_map(CpuIsa isa, Activation activation, bool derivative, const float* in,
                    float* out, int64_t n) {
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(detected_isa()) && isa != CpuIsa::fallback,
              "chainrule: no vector activations for ISA ", isa_name(isa));
  if (isa == CpuIsa::avx512) {
    avx512_activation_map(activation, derivative, in, out, n);
  } else {
    avx2_activation_map(activation, derivative, in, out, n);
  }
}

bool supports(CpuIsa isa, ElementType type) { return kernels_for(isa, type) != nullptr; }

bool blocking_for(CpuIsa isa, ElementType type, const CpuCaches& caches, int threads,
                  Blocking* out) {
  const KernelSet* ks = kernels_for(isa, type);
  if (ks == nullptr) return false;
  *out = fitted_blocking(ks->blocking, type, caches, threads);
  return true;
}

void run(const Problem& p, CpuIsa isa) {
  const KernelSet* ks = kernels_for(isa, p.type);
  TORCH_INTERNAL_ASSERT(ks != nullptr, "chainrule: no CPU GEMM kernel for this ISA and dtype");
  TORCH_INTERNAL_ASSERT(p.a_row_stride == 1 || p.a_col_stride == 1);
  TORCH_INTERNAL_ASSERT(p.b_row_stride == 1 || p.b_col_stride == 1);
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    // Nothing to multiply, but the epilogue still runs (C = act(bias) or C unchanged).
    // Callers handle k == 0 themselves; see csrc/cpu/linear.cpp.
    TORCH_INTERNAL_ASSERT(false, "chainrule: CPU GEMM called with k == 0");
  }

  // Small problems are not worth waking a second thread for (~ 1 MFLOP per thread).
  const double flops = 2.0 * p.m * p.n * p.k;
  int threads = static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
  threads = static_cast<int>(std::min<double>(threads, std::max(1.0, flops / 2e6)));
  Blocking bl = fitted_blocking(ks->blocking, p.type, cpu_caches(), threads);
  int row_parts = 1, col_parts = 1;
  choose_grid(p.m, p.n, bl, threads, &row_parts, &col_parts);
  const int parts = row_parts * col_parts;

  const int64_t ku = p.type == ElementType::float32 ? 1 : 2;
  const int64_t kc = std::min(bl.kc, round_up(p.k, ku));
  const int64_t kc_units = (kc + ku - 1) / ku;
  // mc: the packed A block (mc x kc, 4-byte units) about a_block_bytes, in whole micro-tiles.
  bl.mc = std::clamp<int64_t>(bl.a_block_bytes / (4 * kc_units) / bl.mr * bl.mr, bl.mr, bl.mc);
  const bool needs_partial = p.type != ElementType::float32 && p.k > bl.kc;

  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int row_part = static_cast<int>(part / col_parts);
      const int col_part = static_cast<int>(part % col_parts);
      const auto [m0, m1] = part_range(p.m, bl.mr, row_parts, row_part);
      const auto [n0, n1] = part_range(p.n, bl.nr, col_parts, col_part);
      if (m0 >= m1 || n0 >= n1) continue;
      const int64_t mc = std::min(bl.mc, round_up(m1 - m0, bl.mr));
      const int64_t nc = std::min(bl.nc, round_up(n1 - n0, bl.nr));
      Buffer a_pack = allocate(sizeof(uint32_t) * round_up(mc, bl.mr) * kc_units);
      Buffer b_pack = allocate(sizeof(uint32_t) * round_up(nc, bl.nr) * kc_units);
      Buffer partial = needs_partial ? allocate(sizeof(float) * (m1 - m0) * nc) : Buffer(nullptr);
      Workspace ws{static_cast<uint32_t*>(a_pack.get()), static_cast<uint32_t*>(b_pack.get()),
                   static_cast<float*>(partial.get()), nc};
      ks->run_block(p, bl, m0, m1, n0, n1, /*owns_row_sums=*/col_part == 0, ws);
    }
  });
}

bool gemv_supports(CpuIsa isa) { return isa == CpuIsa::avx512 || isa == CpuIsa::avx2; }

bool gemv_bf16_dot_supports(CpuIsa isa) {
  return isa == CpuIsa::avx512 && cpu_has_avx512_bf16();
}

void gemv(ElementType type, CpuIsa isa, const void* x, int64_t m, int64_t k, const void* w,
          int64_t n, float* acc, bool bf16_dot) {
  TORCH_INTERNAL_ASSERT(gemv_supports(isa) && m >= 1 && m <= kGemvMaxRows && k > 0 && n > 0);
  const bool dot = type == ElementType::bfloat16 && bf16_dot;
  TORCH_INTERNAL_ASSERT(!dot || gemv_bf16_dot_supports(isa));
  const GemvFn fn = dot                      ? avx512_gemv_bf16_dot()
                    : isa == CpuIsa::avx512 ? avx512_gemv(type)
                                            : avx2_gemv(type);
  // The widened kernels take the input rows in float32 (bf16 widened exactly): m x k, a few KiB.
  std::vector<float> x_f32;
  const void* xf = x;
  if (type == ElementType::bfloat16 && !dot) {
    x_f32.resize(static_cast<size_t>(m * k));
    const uint16_t* bits = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < m * k; ++i) {
      const uint32_t widened = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(&x_f32[static_cast<size_t>(i)], &widened, sizeof(float));
    }
    xf = x_f32.data();
  }
  // Tasks of kTaskRows weight rows; a thread takes at least kMinBytesPerThread of the weight, so
  // a layer whose weight is smaller than that stays on one thread (waking a second costs more).
  constexpr int64_t kTaskRows = 16;
  constexpr int64_t kMinBytesPerThread = 256 << 10;
  const int64_t row_bytes = k * (type == ElementType::float32 ? 4 : 2);
  const int64_t tasks = (n + kTaskRows - 1) / kTaskRows;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (row_bytes * kTaskRows));
  // bf16 on AMX tiles where the CPU and the OS allow them (gemv_amx.cpp): whole tiles of 16
  // weight rows there, the last rows of the weight (n mod 16) on the vector kernel.
  std::vector<uint32_t> x_tiles;
  if (type == ElementType::bfloat16 && uses_amx_gemv(isa, m, k)) {
    x_tiles.resize(static_cast<size_t>(amx_packed_input_units(m, k)));
    amx_pack_input(static_cast<const uint16_t*>(x), static_cast<int>(m), k, x_tiles.data());
  }
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    int64_t j = begin * kTaskRows;
    const int64_t j_end = std::min(n, end * kTaskRows);
    if (!x_tiles.empty()) {
      j = amx_gemv_bf16(x_tiles.data(), static_cast<const uint16_t*>(x), static_cast<int>(m), k,
                        static_cast<const uint16_t*>(w), j, j_end, acc, n);
    }
    if (j < j_end) fn(xf, static_cast<int>(m), k, w, j, j_end, acc, n);
  });
}

bool uses_amx_gemv(CpuIsa isa, int64_t m, int64_t k) {
  return isa == CpuIsa::avx512 && m >= kAmxMinRows && k >= kAmxStepK && amx_available();
}

}  // namespace chainrule::cpu::gemm
