// Tensor-core GEMM for bfloat16 / float16 with the linear layer's fused epilogues.
//
//   C[M, N] = epilogue(A[M, K] . B[K, N]),  fp32 accumulation, any M, N, K.
//
// Block tile 128 x 128 x 32, 8 warps as 2 (M) x 4 (N), each warp owning a 64 x 32 sub-tile:
// per 16-deep k-step a warp loads four A fragments and four B fragments with ldmatrix.x4 and
// issues 4 x 4 mma.sync.m16n8k16 (PTX ISA "Warp-level matrix fragment mma.m16n8k16").
// Operand tiles stream through a 3-stage cp.async ring (48 KiB of shared memory), so the loads of
// tile k + 2 overlap the math of tile k. An operand stored MN-major is loaded with ldmatrix.trans,
// which hands every lane the same fragment it would get from a K-major tile.
//
// Shared memory is swizzled rather than padded (so 3 stages fit in 48 KiB): a tile row holds
// R 16-byte chunks, and the chunk index is XORed with bits of the row so that the eight rows one
// ldmatrix phase reads (and the eight chunks a quarter-warp of cp.async writes) fall in eight
// different 16-byte bank groups:
//   R >= 8 (256-byte rows, MN-major tiles): chunk ^ (row & 7)
//   R == 4 ( 64-byte rows, K-major tiles):  chunk ^ ((row >> 1) & 3)   (two rows per 128 bytes)
//
// Tails: a row chunk that runs past M, N or K is zero-filled by cp.async's src-size operand; the
// epilogue masks rows and columns. When an operand's base or leading dimension is not 16-byte
// aligned, the same kernel copies its chunks with plain element loads instead (the slower path
// the launcher picks; see GemmParams::operands_aligned16).
#pragma once

#include "cuda/kernels/linear_common.cuh"

namespace chainrule::kernels {

struct TensorCoreTile {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 32;
  static constexpr int kStages = 3;
  static constexpr int kWarpsM = 2;
  static constexpr int kWarpsN = 4;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  // Two resident blocks per SM (<= 128 registers a thread, 2 x 48 KiB of shared memory): one
  // block's epilogue and prologue overlap the other's main loop.
  static constexpr int kMinBlocksPerSM = 2;
  static constexpr int kWarpTileM = kBlockM / kWarpsM;  // 64: four m16 fragments
  static constexpr int kWarpTileN = kBlockN / kWarpsN;  // 32: four n8 fragments
  static constexpr int kFragmentsM = kWarpTileM / 16;
  static constexpr int kFragmentsN = kWarpTileN / 8;
  static constexpr int kOperandTileBytes = kBlockM * kBlockK * 2;  // one operand, one stage
  static constexpr int kSmemBytes = 2 * kOperandTileBytes * kStages;
  static_assert(kBlockM == kBlockN, "both operand tiles share one size");
  static_assert(kSmemBytes <= 48 * 1024, "fits without opting in to large shared memory");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of kRowChunks chunks/row.
template <int kRowChunks>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  int physical;
  if constexpr (kRowChunks >= 8) {
    physical = chunk ^ (row & 7);
  } else {
    static_assert(kRowChunks == 4, "64-byte or >= 128-byte rows");
    physical = chunk ^ ((row >> 1) & 3);
  }
  return (row * kRowChunks + physical) * 16;
}

// Shared-memory shape of one operand tile. A K-major operand is kept as [mn][k] (rows of
// kBlockK elements), an MN-major one as [k][mn] (rows of kBlockM elements), as in global memory.
template <Major kMajor>
struct OperandTile {
  using Tile = TensorCoreTile;
  static constexpr int kRowChunks = kMajor == Major::k ? Tile::kBlockK / 8 : Tile::kBlockM / 8;
  static constexpr int kRows = kMajor == Major::k ? Tile::kBlockM : Tile::kBlockK;
  static constexpr int kChunks = kRows * kRowChunks;
  static constexpr int kChunksPerThread = kChunks / Tile::kThreads;
  static_assert(kChunks % Tile::kThreads == 0, "every thread copies the same number of chunks");

  // Copies the tile at (mn0, k0) of a 16-bit operand with leading dimension ld into smem.
  static __device__ __forceinline__ void load(char* smem, const uint16_t* base, int64_t ld,
                                              int mn0, int mn_size, int k0, int k_size,
                                              bool aligned16) {
CHAINRULE_UNROLL
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int chunk_id = static_cast<int>(threadIdx.x) + i * Tile::kThreads;
      const int row = chunk_id / kRowChunks;
      const int chunk = chunk_id % kRowChunks;
      int outer, inner, outer_size, inner_size;
      if constexpr (kMajor == Major::k) {
        outer = mn0 + row; inner = k0 + chunk * 8; outer_size = mn_size; inner_size = k_size;
      } else {
        outer = k0 + row; inner = mn0 + chunk * 8; outer_size = k_size; inner_size = mn_size;
      }
      int valid = inner_size - inner;
      valid = outer < outer_size ? (valid < 0 ? 0 : (valid > 8 ? 8 : valid)) : 0;
      const uint16_t* src = valid > 0 ? base + static_cast<int64_t>(outer) * ld + inner : base;
      char* dst = smem + swizzled_offset<kRowChunks>(row, chunk);
      if (aligned16) {
        port::cp_async<16>(dst, src, valid * 2);
      } else {
        uint32_t packed[4];
CHAINRULE_UNROLL
        for (int j = 0; j < 4; ++j) {
          const uint32_t lo = 2 * j < valid ? src[2 * j] : 0u;
          const uint32_t hi = 2 * j + 1 < valid ? src[2 * j + 1] : 0u;
          packed[j] = lo | (hi << 16);
        }
        uint4 v;
        v.x = packed[0]; v.y = packed[1]; v.z = packed[2]; v.w = packed[3];
        port::store_vector(reinterpret_cast<uint4*>(dst), v);
      }
    }
  }
};

template <typename T, Major kAMajor, Major kBMajor, Activation A, Store kStore>
__global__ void __launch_bounds__(TensorCoreTile::kThreads, TensorCoreTile::kMinBlocksPerSM)
    linear_gemm_tensor_core_kernel(const GemmParams p) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "tensor-core GEMM takes bfloat16 or float16");
  using Tile = TensorCoreTile;
  using ATile = OperandTile<kAMajor>;
  using BTile = OperandTile<kBMajor>;

  char* smem = port::dynamic_shared<char>();
  char* smem_a = smem;
  char* smem_b = smem + Tile::kStages * Tile::kOperandTileBytes;

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warp_m = warp / Tile::kWarpsN;
  const int warp_n = warp % Tile::kWarpsN;
  int m0, n0;
  block_tile_origin(p, Tile::kBlockM, Tile::kBlockN, m0, n0);
  const uint16_t* a = static_cast<const uint16_t*>(p.a);
  const uint16_t* b = static_cast<const uint16_t*>(p.b);

  float acc[Tile::kFragmentsM][Tile::kFragmentsN][4];
CHAINRULE_UNROLL
  for (int i = 0; i < Tile::kFragmentsM; ++i)
CHAINRULE_UNROLL
    for (int j = 0; j < Tile::kFragmentsN; ++j)
CHAINRULE_UNROLL
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // This block's k-slice (all of k unless the GEMM is split along k).
  const int k_begin = static_cast<int>(blockIdx.z) * p.k_per_split;
  const int k_end = p.k - k_begin < p.k_per_split ? p.k : k_begin + p.k_per_split;
  const int k_tiles = k_end > k_begin ? (k_end - k_begin + Tile::kBlockK - 1) / Tile::kBlockK : 0;
  auto load_stage = [&](int stage, int k_tile) {
    const int k0 = k_begin + k_tile * Tile::kBlockK;
    ATile::load(smem_a + stage * Tile::kOperandTileBytes, a, p.lda, m0, p.m, k0, k_end,
                p.operands_aligned16);
    BTile::load(smem_b + stage * Tile::kOperandTileBytes, b, p.ldb, n0, p.n, k0, k_end,
                p.operands_aligned16);
  };

  // Prologue: stages 0 .. kStages-2 in flight. Every step commits a group (possibly empty) so
  // that wait_group<kStages-2> always means "the tile about to be used has landed".
CHAINRULE_UNROLL
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    port::cp_async_commit();
  }

  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    port::cp_async_wait<Tile::kStages - 2>();
    // Tile k_tile is visible to all threads, and all threads are done with the stage that the
    // prefetch below overwrites (it was read in the previous iteration).
    __syncthreads();
    const int prefetch = k_tile + Tile::kStages - 1;
    if (prefetch < k_tiles) load_stage(prefetch % Tile::kStages, prefetch);
    port::cp_async_commit();

    const int stage = k_tile % Tile::kStages;
    const char* tile_a = smem_a + stage * Tile::kOperandTileBytes;
    const char* tile_b = smem_b + stage * Tile::kOperandTileBytes;
CHAINRULE_UNROLL
    for (int k_step = 0; k_step < Tile::kBlockK / 16; ++k_step) {
      uint32_t a_frag[Tile::kFragmentsM][4];
      uint32_t b_frag[Tile::kFragmentsN][2];
      // ldmatrix.x4: lane l gives the row address of 8x8 matrix l / 8, row l % 8. The four
      // matrices of an A fragment are (m, k) = (0, 0), (8, 0), (0, 8), (8, 8).
CHAINRULE_UNROLL
      for (int i = 0; i < Tile::kFragmentsM; ++i) {
        const int m = warp_m * Tile::kWarpTileM + i * 16;
        if constexpr (kAMajor == Major::k) {
          const int row = m + (lane & 15);
          const int chunk = k_step * 2 + (lane >> 4);
          port::ldmatrix_x4(a_frag[i], tile_a + swizzled_offset<ATile::kRowChunks>(row, chunk));
        } else {
          const int row = k_step * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = m / 8 + ((lane >> 3) & 1);
          port::ldmatrix_x4_trans(a_frag[i],
                                  tile_a + swizzled_offset<ATile::kRowChunks>(row, chunk));
        }
      }
      // One ldmatrix.x4 covers two n8 fragments: matrices (n, k) = (0, 0), (0, 8), (8, 0), (8, 8).
CHAINRULE_UNROLL
      for (int j = 0; j < Tile::kFragmentsN / 2; ++j) {
        const int n = warp_n * Tile::kWarpTileN + j * 16;
        uint32_t r[4];
        if constexpr (kBMajor == Major::k) {
          const int row = n + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = k_step * 2 + ((lane >> 3) & 1);
          port::ldmatrix_x4(r, tile_b + swizzled_offset<BTile::kRowChunks>(row, chunk));
        } else {
          const int row = k_step * 16 + (lane & 15);
          const int chunk = n / 8 + (lane >> 4);
          port::ldmatrix_x4_trans(r, tile_b + swizzled_offset<BTile::kRowChunks>(row, chunk));
        }
        b_frag[2 * j][0] = r[0];
        b_frag[2 * j][1] = r[1];
        b_frag[2 * j + 1][0] = r[2];
        b_frag[2 * j + 1][1] = r[3];
      }
CHAINRULE_UNROLL
      for (int i = 0; i < Tile::kFragmentsM; ++i)
CHAINRULE_UNROLL
        for (int j = 0; j < Tile::kFragmentsN; ++j)
          port::mma_m16n8k16<T>(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
  }
  port::cp_async_wait<0>();

  // Accumulator fragment: lane holds rows lane/4 and lane/4 + 8, columns 2 (lane % 4) + {0, 1}.
  using Epi = Epilogue<T, A, kStore>;
CHAINRULE_UNROLL
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
CHAINRULE_UNROLL
    for (int j = 0; j < Tile::kFragmentsN; ++j) {
      const int64_t row = m0 + warp_m * Tile::kWarpTileM + i * 16 + (lane >> 2);
      const int col = n0 + warp_n * Tile::kWarpTileN + j * 8 + (lane & 3) * 2;
      Epi::store_pair(p, row, col, acc[i][j][0], acc[i][j][1]);
      Epi::store_pair(p, row + 8, col, acc[i][j][2], acc[i][j][3]);
    }
  }
}

}  // namespace chainrule::kernels
