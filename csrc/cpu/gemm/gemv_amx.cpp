// The bf16 GEMV on AMX tiles (gemm.h's gemv on CPUs with AMX-BF16, Sapphire Rapids and later):
// the only translation unit compiled with -mamx-tile -mamx-bf16, entered only where cpuid shows
// the tiles and Linux has granted this process their state (amx_available()).
//
// acc(i, j) = Σ_p x(i, p) · w(j, p) is computed transposed, accᵀ = W · Xᵀ, so W is the A
// operand of TDPBF16PS: an A tile is 16 weight rows x 32 values of k, loaded straight from the
// weight with its row stride (no packing of the big operand, as in the vector GEMV), and the B
// tile of each 32-wide step of k is the m input rows packed once per call by amx_pack_input
// (16 rows of k pairs, one column of two bf16 values per input row). The product of a step, 16 x
// 32 x m multiply-adds, is one instruction, so the kernel runs at the speed the weight streams in.
// Each output is the float32 sum the tiles make over the multiple-of-32 part of k, plus the rest
// of k (< 32 values) summed in order by scalar code: a fixed order, so the bits do not depend on
// how the rows are split among threads.
#include <cstdint>

#include "cpu/gemm/gemm_kernels.h"

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__)
// A compiler without the tile instructions (CMakeLists.txt): no tiles, the vector GEMV runs.
namespace chainrule::cpu::gemm {
bool amx_available() { return false; }
void amx_pack_input(const uint16_t*, int, int64_t, uint32_t*) {}
int64_t amx_gemv_bf16(const uint32_t*, const uint16_t*, int, int64_t, const uint16_t*, int64_t j0,
                      int64_t, float*, int64_t) {
  return j0;
}
}  // namespace chainrule::cpu::gemm
#else
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

namespace chainrule::cpu::gemm {

namespace {

constexpr int kTileRows = 16;  // weight rows per A / C tile
constexpr int kStepK = kAmxStepK;  // values of k per A tile row (64 bytes of bf16)
// Weight-row tiles in flight: C tiles 0-3 accumulate 64 weight rows; A tiles 4 and 5 take turns;
// B is tile 6 (7 of the 8 tiles).
constexpr int kGroupTiles = 4;

// The palette-1 tile configuration (64 bytes, as LDTILECFG reads it).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}

// Writes the tiles' sums of weight rows [j, j + rows) plus the scalar tail of k into acc.
void write_rows(const float (*sums)[kTileRows], int rows, const uint16_t* x, int m, int64_t k,
                int64_t k_tiles, const uint16_t* w, int64_t j, float* acc, int64_t ldacc) {
  for (int r = 0; r < rows; ++r) {
    const uint16_t* w_row = w + (j + r) * k;
    for (int i = 0; i < m; ++i) {
      float s = sums[r][i];
      for (int64_t p = k_tiles; p < k; ++p) {
        s += bf16_to_float(x[i * k + p]) * bf16_to_float(w_row[p]);
      }
      acc[i * ldacc + j + r] = s;
    }
  }
}

}  // namespace

bool amx_available() {
  static const bool available = [] {
    unsigned r[4];
    cpuid(0, 0, r);
    if (r[0] < 7) return false;  // no leaf 7: no AMX
    cpuid(7, 0, r);
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    if (!((r[3] >> 22) & 1u) || !((r[3] >> 24) & 1u)) return false;
    // Linux hands out the 8 KiB of tile data state per process on request (ARCH_REQ_XCOMP_PERM
    // for XFEATURE_XTILEDATA); a kernel without AMX support refuses, and the tiles stay unused.
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return available;
}

void amx_pack_input(const uint16_t* x, int m, int64_t k, uint32_t* packed) {
  // packed[(step * 16 + pair) * m + i] = x(i, 32 step + 2 pair) | x(i, 32 step + 2 pair + 1) << 16
  const int64_t steps = k / kStepK;
  for (int64_t s = 0; s < steps; ++s) {
    for (int pair = 0; pair < kStepK / 2; ++pair) {
      uint32_t* out = packed + (s * (kStepK / 2) + pair) * m;
      const int64_t p = s * kStepK + 2 * pair;
      for (int i = 0; i < m; ++i) {
        out[i] = static_cast<uint32_t>(x[i * k + p]) |
                 (static_cast<uint32_t>(x[i * k + p + 1]) << 16);
      }
    }
  }
}

int64_t amx_gemv_bf16(const uint32_t* packed, const uint16_t* x, int m, int64_t k,
                      const uint16_t* w, int64_t j0, int64_t j1, float* acc, int64_t ldacc) {
  const int64_t steps = k / kStepK;
  const int64_t k_tiles = steps * kStepK;
  const int64_t full_end = j0 + (j1 - j0) / kTileRows * kTileRows;
  if (steps == 0 || full_end == j0) return j0;
  TileConfig config;
  for (int t = 0; t < kGroupTiles; ++t) {  // C: 16 weight rows x m float32 sums
    config.rows[t] = kTileRows;
    config.colsb[t] = static_cast<uint16_t>(4 * m);
  }
  for (int t : {4, 5}) {  // A: 16 weight rows x 32 bf16 of k
    config.rows[t] = kTileRows;
    config.colsb[t] = 2 * kStepK;
  }
  config.rows[6] = kStepK / 2;  // B: 16 pairs of k x m input rows
  config.colsb[6] = static_cast<uint16_t>(4 * m);
  _tile_loadconfig(&config);

  const int64_t w_stride = 2 * k;       // bytes between weight rows
  const int64_t b_stride = 4 * m;       // bytes between B rows
  const int64_t b_step = (kStepK / 2) * m;  // uint32 units per step of packed input
  alignas(64) float sums[kGroupTiles * kTileRows][kTileRows];
  int64_t j = j0;
  for (; j + kGroupTiles * kTileRows <= full_end; j += kGroupTiles * kTileRows) {
    const uint16_t* w0 = w + j * k;
    const int64_t tile_elems = kTileRows * k;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      const uint16_t* ws = w0 + s * kStepK;
      _tile_loadd(6, packed + s * b_step, b_stride);
      _tile_loadd(4, ws, w_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, ws + tile_elems, w_stride);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(4, ws + 2 * tile_elems, w_stride);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(5, ws + 3 * tile_elems, w_stride);
      _tile_dpbf16ps(3, 5, 6);
    }
    _tile_stored(0, sums[0], sizeof(sums[0]));
    _tile_stored(1, sums[kTileRows], sizeof(sums[0]));
    _tile_stored(2, sums[2 * kTileRows], sizeof(sums[0]));
    _tile_stored(3, sums[3 * kTileRows], sizeof(sums[0]));
    write_rows(sums, kGroupTiles * kTileRows, x, m, k, k_tiles, w, j, acc, ldacc);
  }
  for (; j < full_end; j += kTileRows) {
    const uint16_t* w0 = w + j * k;
    _tile_zero(0);
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(6, packed + s * b_step, b_stride);
      _tile_loadd(4, w0 + s * kStepK, w_stride);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, sums[0], sizeof(sums[0]));
    write_rows(sums, kTileRows, x, m, k, k_tiles, w, j, acc, ldacc);
  }
  _tile_release();
  return j;
}

}  // namespace chainrule::cpu::gemm
#endif  // __AMX_TILE__ && __AMX_BF16__
