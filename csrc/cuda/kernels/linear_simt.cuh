// SIMT GEMM for float32 and float64 with the linear layer's fused epilogues.
//
//   C[M, N] = epilogue(A[M, K] . B[K, N]),  accumulation in the element type, any M, N, K.
//
// Register blocking: 256 threads as 16 x 16, each owning TM x TN outputs (float32: 8 x 8 of a
// 128 x 128 block tile; float64: 4 x 4 of 64 x 64), fed per k by TM + TN shared-memory reads.
// A thread's rows (and columns) are two interleaved groups of four, ty*4 + {0..3} and
// BM/2 + ty*4 + {0..3}, so the 16 threads of a half-warp read 64 consecutive values.
// Both operands are staged k-major in shared memory ([k][m] and [k][n]) whatever their global
// layout; the transposition happens in the element-wise cp.async copy (4- or 8-byte copies need
// no alignment beyond the element's own, so there is no unaligned fallback to maintain), which
// runs a 2-stage pipeline: tile k + 1 is in flight while tile k is multiplied.
// Copies past M, N or K are zero-filled (src-size 0); the epilogue masks rows and columns.
//
// float64 runs here so that gradcheck exercises the same tiling, tails and epilogues as
// training does on the GPU.
#pragma once

#include "cuda/kernels/linear_common.cuh"

namespace chainrule::kernels {

template <typename T>
struct SimtTile;

template <>
struct SimtTile<float> {
  static constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 8;
  static constexpr int kThreadM = 8, kThreadN = 8;
  static constexpr int kPad = 4;  // [k][m] rows of 132 floats: k * 4 + m covers 32 banks
};

template <>
struct SimtTile<double> {
  static constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 8;
  static constexpr int kThreadM = 4, kThreadN = 4;
  static constexpr int kPad = 2;
};

template <typename T>
struct SimtConfig : SimtTile<T> {
  using SimtTile<T>::kBlockM;
  using SimtTile<T>::kBlockN;
  using SimtTile<T>::kBlockK;
  using SimtTile<T>::kPad;
  static constexpr int kThreads = 256;
  // One block per SM is all the 8 x 8 float32 micro-tile can promise without spilling on sm_80
  // (~135 registers); sm_90 fits it in 128 and runs two.
  static constexpr int kMinBlocksPerSM = 1;
  static constexpr int kStages = 2;
  static constexpr int kStrideA = kBlockM + kPad;  // elements per [k] row of the A tile
  static constexpr int kStrideB = kBlockN + kPad;
  static constexpr int kStageElements = kBlockK * (kStrideA + kStrideB);
  static constexpr int kSmemBytes = kStages * kStageElements * static_cast<int>(sizeof(T));
  static_assert((kBlockM / SimtTile<T>::kThreadM) * (kBlockN / SimtTile<T>::kThreadN) == kThreads);
};

// Copies the (mn0, k0) tile of one operand into smem laid out [k][mn] with row stride kStride.
template <typename T, Major kMajor, int kExtent, int kStride>
__device__ __forceinline__ void simt_load_tile(T* smem, const T* base, int64_t ld, int mn0,
                                               int mn_size, int k0, int k_size) {
  constexpr int kBlockK = SimtConfig<T>::kBlockK;
  constexpr int kThreads = SimtConfig<T>::kThreads;
  constexpr int kPerThread = kExtent * kBlockK / kThreads;
  static_assert(kExtent * kBlockK % kThreads == 0);
CHAINRULE_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    // Consecutive threads walk the contiguous global axis, for coalescing.
    int k, mn;
    if constexpr (kMajor == Major::k) {
      k = e % kBlockK; mn = e / kBlockK;
    } else {
      mn = e % kExtent; k = e / kExtent;
    }
    const int gk = k0 + k;
    const int gmn = mn0 + mn;
    const bool valid = gk < k_size && gmn < mn_size;
    const int64_t offset = kMajor == Major::k ? static_cast<int64_t>(gmn) * ld + gk
                                              : static_cast<int64_t>(gk) * ld + gmn;
    port::cp_async<sizeof(T)>(smem + k * kStride + mn, valid ? base + offset : base,
                              valid ? static_cast<int>(sizeof(T)) : 0);
  }
}

template <typename T, Major kAMajor, Major kBMajor, Activation A, Store kStore>
__global__ void __launch_bounds__(SimtConfig<T>::kThreads, SimtConfig<T>::kMinBlocksPerSM)
    linear_gemm_simt_kernel(const GemmParams p) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  using Config = SimtConfig<T>;
  constexpr int TM = Config::kThreadM;
  constexpr int TN = Config::kThreadN;
  constexpr int BK = Config::kBlockK;

  T* smem = port::dynamic_shared<T>();
  const int tx = static_cast<int>(threadIdx.x) % (Config::kBlockN / TN);
  const int ty = static_cast<int>(threadIdx.x) / (Config::kBlockN / TN);
  int m0, n0;
  block_tile_origin(p, Config::kBlockM, Config::kBlockN, m0, n0);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);

  // Row of the thread's i-th output (same formula for columns).
  auto local_m = [&](int i) { return (i / 4) * (Config::kBlockM / (TM / 4)) + ty * 4 + i % 4; };
  auto local_n = [&](int j) { return (j / 4) * (Config::kBlockN / (TN / 4)) + tx * 4 + j % 4; };

  T acc[TM][TN];
CHAINRULE_UNROLL
  for (int i = 0; i < TM; ++i)
CHAINRULE_UNROLL
    for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

  // This block's k-slice (all of k unless the GEMM is split along k).
  const int k_begin = static_cast<int>(blockIdx.z) * p.k_per_split;
  const int k_end = p.k - k_begin < p.k_per_split ? p.k : k_begin + p.k_per_split;
  const int k_tiles = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  auto load_stage = [&](int stage, int k_tile) {
    T* tile_a = smem + stage * Config::kStageElements;
    T* tile_b = tile_a + BK * Config::kStrideA;
    simt_load_tile<T, kAMajor, Config::kBlockM, Config::kStrideA>(tile_a, a, p.lda, m0, p.m,
                                                                  k_begin + k_tile * BK, k_end);
    simt_load_tile<T, kBMajor, Config::kBlockN, Config::kStrideB>(tile_b, b, p.ldb, n0, p.n,
                                                                  k_begin + k_tile * BK, k_end);
  };

CHAINRULE_UNROLL
  for (int s = 0; s < Config::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    port::cp_async_commit();
  }
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    port::cp_async_wait<Config::kStages - 2>();
    __syncthreads();
    const int prefetch = k_tile + Config::kStages - 1;
    if (prefetch < k_tiles) load_stage(prefetch % Config::kStages, prefetch);
    port::cp_async_commit();

    const T* tile_a = smem + (k_tile % Config::kStages) * Config::kStageElements;
    const T* tile_b = tile_a + BK * Config::kStrideA;
CHAINRULE_UNROLL
    for (int k = 0; k < BK; ++k) {
      T a_reg[TM], b_reg[TN];
CHAINRULE_UNROLL
      for (int i = 0; i < TM; ++i) a_reg[i] = tile_a[k * Config::kStrideA + local_m(i)];
CHAINRULE_UNROLL
      for (int j = 0; j < TN; ++j) b_reg[j] = tile_b[k * Config::kStrideB + local_n(j)];
CHAINRULE_UNROLL
      for (int i = 0; i < TM; ++i)
CHAINRULE_UNROLL
        for (int j = 0; j < TN; ++j) acc[i][j] = math::fma(a_reg[i], b_reg[j], acc[i][j]);
    }
  }
  port::cp_async_wait<0>();

  using Epi = Epilogue<T, A, kStore>;
CHAINRULE_UNROLL
  for (int i = 0; i < TM; ++i)
CHAINRULE_UNROLL
    for (int j = 0; j < TN; ++j)
      Epi::store(p, static_cast<int64_t>(m0) + local_m(i), n0 + local_n(j), acc[i][j]);
}

}  // namespace chainrule::kernels
