// Pieces shared by the linear layer's CUDA kernels: element types and their conversions, the GEMM
// parameter block and the fused epilogue that every GEMM kernel ends with.
//
// Every GEMM here computes C[M, N] = epilogue(A[M, K] . B[K, N]) with row-major PyTorch tensors.
// An operand is "K-major" when consecutive elements of a row run along the reduction (K) axis and
// "MN-major" when they run along M (for A) or N (for B). The linear layer needs three layouts:
//
//   forward      Y[M, N]  = X[M, K]  . W[N, K]^T   A = X   K-major,  B = W   K-major
//   grad_input   dX[M, K] = dZ[M, N] . W[N, K]     A = dZ  K-major,  B = W   MN-major
//   grad_weight  dW[N, K] = dZ[M, N]^T . X[M, K]   A = dZ  MN-major, B = X   MN-major
//
// so one kernel template per arithmetic (tensor-core, SIMT) serves all three, with the majorness
// of each operand a template constant.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "chainrule/activation.h"
#include "cuda/port.cuh"

// Full unrolling of the fixed-trip loops of the tiles. The host compiler (emulator) does not know
// the CUDA pragma and needs no unrolling to be correct.
#if defined(__CUDACC__)
#define CHAINRULE_UNROLL _Pragma("unroll")
#else
#define CHAINRULE_UNROLL
#endif

namespace chainrule::kernels {

enum class Major : int { k = 0, mn = 1 };

// Accumulation type: float for float32/bfloat16/float16, double for float64.
template <typename T>
using accumulate_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__host__ __device__ __forceinline__ accumulate_t<T> to_accumulate(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return v;
  }
}

template <typename T>
__host__ __device__ __forceinline__ T from_accumulate(accumulate_t<T> v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return v;
  }
}

// Raw 16-bit pattern of a bfloat16/float16 value (memcpy: the types have no portable bit cast).
template <typename T>
__host__ __device__ __forceinline__ uint16_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

// Two 16-bit values as one 32-bit word, the first in the low half (the lower address).
template <typename T>
__host__ __device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  return uint32_t(bits16(lo)) | (uint32_t(bits16(hi)) << 16);
}

// C = epilogue(A . B). Sizes are int (the launcher checks they fit); offsets into the tensors are
// computed in int64 because M * K can exceed 2^31 elements.
struct GemmParams {
  const void* a;
  const void* b;
  void* c;
  const void* bias;          // (N) added to every row, or null
  void* pre_activation;      // (M, N) Z = A.B + bias stored before the activation, or null
  int64_t lda, ldb, ldc, ld_pre_activation;
  int m, n, k;
  // Split-K: block z reduces k in [z * k_per_split, (z + 1) * k_per_split) (k_per_split = k when
  // not split) and, with Store::partial, writes its unrounded sums to partial_sums[z][m][n].
  int k_per_split;
  int splits;
  void* partial_sums;
  bool accumulate;           // split-K reduction: C = round(C + sum) instead of round(sum)
  bool operands_aligned16;   // a, b, lda, ldb allow 16-byte cp.async of every row chunk
  bool output_pairs_aligned; // c, pre_activation, ldc, ld_pre allow 2-element stores
};

// The output tile of this block. Tiles are numbered along gridDim.x alone, M fastest (the launch
// order of an (M tiles, N tiles) grid): gridDim.y allows only 65535 blocks, which would cap N at
// 65535 * block_n (8.4M for 128-wide tiles), while gridDim.x allows 2^31 - 1.
__device__ __forceinline__ void block_tile_origin(const GemmParams& p, int block_m, int block_n,
                                                  int& m0, int& n0) {
  const unsigned tiles_m = static_cast<unsigned>((p.m + block_m - 1) / block_m);
  m0 = static_cast<int>(blockIdx.x % tiles_m) * block_m;
  n0 = static_cast<int>(blockIdx.x / tiles_m) * block_n;
}

// What a GEMM's epilogue does with its accumulators (a template constant).
enum class Store : int {
  output = 0,      // Z = round(acc + bias); C = round(act(Z)); Z stored when asked
  accumulate = 1,  // C = round(C + acc), fp32 (fp64) math: grad_weight with beta = 1
  partial = 2,     // partial_sums[z] = acc, unrounded: one k-slice of a split-K GEMM
};

// The fused epilogue, chosen at compile time (Store above). Store::output with A = none and no
// bias is the plain store of grad_input and of an overwritten grad_weight.
// Z is rounded to the storage type before the activation, as the unfused F.linear + activation
// would do and as the CPU backend does, so backward differentiates at the value that was stored.
template <typename T, Activation A, Store kStore>
struct Epilogue {
  using Acc = accumulate_t<T>;

  // Final value of element (row, col); writes the pre-activation as a side effect.
  static __device__ __forceinline__ Acc finish(const GemmParams& p, int64_t row, int col, Acc v) {
    if constexpr (kStore == Store::accumulate) {
      return v + to_accumulate(static_cast<const T*>(p.c)[row * p.ldc + col]);
    } else {
      if (p.bias != nullptr) v += to_accumulate(static_cast<const T*>(p.bias)[col]);
      if constexpr (A == Activation::none) {
        return v;
      } else {
        const T z = from_accumulate<T>(v);
        if (p.pre_activation != nullptr) {
          static_cast<T*>(p.pre_activation)[row * p.ld_pre_activation + col] = z;
        }
        return activation_forward<A>(to_accumulate(z));
      }
    }
  }

  static __device__ __forceinline__ void store(const GemmParams& p, int64_t row, int col, Acc v) {
    if (row >= p.m || col >= p.n) return;
    if constexpr (kStore == Store::partial) {
      static_cast<Acc*>(p.partial_sums)[(static_cast<int64_t>(blockIdx.z) * p.m + row) * p.n + col] = v;
    } else {
      static_cast<T*>(p.c)[row * p.ldc + col] = from_accumulate<T>(finish(p, row, col, v));
    }
  }

  // Columns col and col + 1 of one row (the layout of an mma accumulator fragment).
  static __device__ __forceinline__ void store_pair(const GemmParams& p, int64_t row, int col,
                                                    Acc v0, Acc v1) {
    if (row >= p.m || col >= p.n) return;
    if constexpr (sizeof(T) == 2 && kStore != Store::partial) {
      if (col + 1 < p.n && p.output_pairs_aligned) {
        if constexpr (kStore == Store::output && A != Activation::none) {
          // Pre-activation pair store: finish() would store the halves one by one.
          Acc b0 = 0, b1 = 0;
          if (p.bias != nullptr) {
            b0 = to_accumulate(static_cast<const T*>(p.bias)[col]);
            b1 = to_accumulate(static_cast<const T*>(p.bias)[col + 1]);
          }
          const T z0 = from_accumulate<T>(v0 + b0);
          const T z1 = from_accumulate<T>(v1 + b1);
          if (p.pre_activation != nullptr) {
            port::store_vector(reinterpret_cast<uint32_t*>(static_cast<T*>(p.pre_activation) +
                                                           row * p.ld_pre_activation + col),
                               pack_pair(z0, z1));
          }
          v0 = activation_forward<A>(to_accumulate(z0));
          v1 = activation_forward<A>(to_accumulate(z1));
        } else {
          v0 = finish(p, row, col, v0);
          v1 = finish(p, row, col + 1, v1);
        }
        port::store_vector(reinterpret_cast<uint32_t*>(static_cast<T*>(p.c) + row * p.ldc + col),
                           pack_pair(from_accumulate<T>(v0), from_accumulate<T>(v1)));
        return;
      }
    }
    store(p, row, col, v0);
    store(p, row, col + 1, v1);
  }
};

// Second half of a split-K GEMM: C = round(sum_z partial_sums[z]) or round(C + sum_z ...),
// adding the k-slices in slice order, so the result does not depend on which slice finished first.
template <typename T>
__global__ void __launch_bounds__(256) linear_split_k_reduce_kernel(const GemmParams p) {
  using Acc = accumulate_t<T>;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int64_t size = static_cast<int64_t>(p.m) * p.n;
  if (index >= size) return;
  const int64_t row = index / p.n;
  const int col = static_cast<int>(index % p.n);
  const Acc* partial = static_cast<const Acc*>(p.partial_sums);
  Acc sum = partial[index];
  for (int z = 1; z < p.splits; ++z) sum += partial[z * size + index];
  T* c = static_cast<T*>(p.c) + row * p.ldc + col;
  if (p.accumulate) sum += to_accumulate(*c);
  *c = from_accumulate<T>(sum);
}

}  // namespace chainrule::kernels
