// The pass between the linear layer's backward GEMMs and grad_output:
//
//   dZ[m, n] = dY[m, n] * act'(Z[m, n])      (written only when the activation is not none)
//   db[n]    = sum_m dZ[m, n]                (or db += ..., accumulating into .grad)
//
// One read of dY and Z, one write of dZ, and the bias gradient as a by-product. db is reduced in
// a fixed order, so it has the same bits on every run (no float atomics): a block owns 32 columns
// and a slice of rows; its 8 warps stride over the rows, then warp 0 adds the 8 partial sums in
// warp order. With more than one row slice, each slice writes its column sums to a workspace and
// linear_bias_grad_finalize_kernel adds the slices in slice order. The slicing depends only on
// the shape.
//
// db sums dZ before it is rounded to the storage type (as the CPU backend does); the GEMMs read
// the rounded dZ, exactly what an unfused activation backward would hand them.
#pragma once

#include "cuda/kernels/linear_common.cuh"

namespace chainrule::kernels {

struct BiasGradParams {
  const void* grad_output;     // dY (M, N)
  const void* pre_activation;  // Z (M, N), or null when the activation is none
  void* grad_pre_activation;   // dZ (M, N), or null when the activation is none
  void* grad_bias;             // (N), or null: dZ only
  void* partial_sums;          // (slices, N) in the accumulation type when slices > 1
  int64_t ld_grad_output, ld_pre_activation, ld_grad_pre_activation;
  int m, n;
  int rows_per_slice;
  int slices;
  bool accumulate;             // db += sums instead of db = sums
};

struct BiasGradTile {
  static constexpr int kColumns = 32;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
};

template <typename T>
__device__ __forceinline__ void write_bias_grad(const BiasGradParams& p, int col,
                                                accumulate_t<T> sum) {
  T* grad_bias = static_cast<T*>(p.grad_bias);
  if (p.accumulate) sum += to_accumulate(grad_bias[col]);
  grad_bias[col] = from_accumulate<T>(sum);
}

template <typename T, Activation A>
__global__ void __launch_bounds__(BiasGradTile::kThreads)
    linear_bias_grad_kernel(const BiasGradParams p) {
  using Acc = accumulate_t<T>;
  Acc* warp_sums = port::dynamic_shared<Acc>();  // [kWarps][kColumns]
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int col = static_cast<int>(blockIdx.x) * BiasGradTile::kColumns + lane;
  const int row_begin = static_cast<int>(blockIdx.y) * p.rows_per_slice;
  const int row_end = p.m - row_begin < p.rows_per_slice ? p.m : row_begin + p.rows_per_slice;

  Acc sum = Acc(0);
  if (col < p.n) {
    const T* grad_output = static_cast<const T*>(p.grad_output);
    for (int row = row_begin + warp; row < row_end; row += BiasGradTile::kWarps) {
      Acc g = to_accumulate(grad_output[static_cast<int64_t>(row) * p.ld_grad_output + col]);
      if constexpr (A != Activation::none) {
        const T z = static_cast<const T*>(
            p.pre_activation)[static_cast<int64_t>(row) * p.ld_pre_activation + col];
        g = activation_grad<A>(g, to_accumulate(z));
        static_cast<T*>(p.grad_pre_activation)[static_cast<int64_t>(row) *
                                                   p.ld_grad_pre_activation + col] =
            from_accumulate<T>(g);
      }
      sum += g;
    }
  }
  if (p.grad_bias == nullptr) return;  // uniform over the grid
  warp_sums[warp * BiasGradTile::kColumns + lane] = sum;
  __syncthreads();
  if (warp != 0 || col >= p.n) return;
  Acc total = Acc(0);
CHAINRULE_UNROLL
  for (int w = 0; w < BiasGradTile::kWarps; ++w) total += warp_sums[w * BiasGradTile::kColumns + lane];
  if (p.slices > 1) {
    static_cast<Acc*>(p.partial_sums)[static_cast<int64_t>(blockIdx.y) * p.n + col] = total;
  } else {
    write_bias_grad<T>(p, col, total);
  }
}

template <typename T>
__global__ void __launch_bounds__(BiasGradTile::kThreads)
    linear_bias_grad_finalize_kernel(const BiasGradParams p) {
  using Acc = accumulate_t<T>;
  const int col = static_cast<int>(blockIdx.x) * BiasGradTile::kThreads + static_cast<int>(threadIdx.x);
  if (col >= p.n) return;
  const Acc* partial = static_cast<const Acc*>(p.partial_sums);
  Acc total = Acc(0);
  for (int s = 0; s < p.slices; ++s) total += partial[static_cast<int64_t>(s) * p.n + col];
  write_bias_grad<T>(p, col, total);
}

}  // namespace chainrule::kernels
