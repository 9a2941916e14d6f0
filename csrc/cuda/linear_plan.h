// Launch planning for the linear layer's kernels: which kernel, which grid, which shared memory.
//
// Written once and shared by the CUDA launcher (csrc/cuda/linear.cu, launching with <<<>>>) and
// the emulated twin (csrc/emulated/linear.cpp, launching with chainrule::emu::launch). Both pass
// a Launcher, a callable
//   launch(const char* name, void (*kernel)(Params), dim3 grid, dim3 block, size_t smem, Params)
// and nothing here depends on torch, so tests/test_cuda_build.py can instantiate every kernel
// from a tiny translation unit (announce_every_kernel()).
//
// Runtime choices become template constants here, once: element type (tensor cores for
// bfloat16/float16, SIMT for float32/float64), operand majorness (from the GEMM's role),
// activation, and accumulate. Bias and the pre-activation store stay runtime (a null pointer):
// they cost a uniform branch in the epilogue, and templating them would triple the forward
// instantiations (build time on small machines is a constraint of this project).
#pragma once

#include <cstddef>
#include <algorithm>
#include <cstdint>

#include "chainrule/activation.h"
#include "cuda/kernels/linear_bias_grad.cuh"
#include "cuda/kernels/linear_simt.cuh"
#include "cuda/kernels/linear_tensor_core.cuh"

namespace chainrule::linear_plan {

using kernels::BiasGradParams;
using kernels::GemmParams;
using kernels::Major;

enum class DType { float64, float32, bfloat16, float16 };

// The GEMM's role in the linear layer; it fixes the operands' majorness (linear_common.cuh).
enum class GemmRole {
  forward,      // Y = X . W^T        A = X  K-major,  B = W K-major
  grad_input,   // dX = dZ . W        A = dZ K-major,  B = W MN-major
  grad_weight,  // dW (+)= dZ^T . X   A = dZ MN-major, B = X MN-major
};

// Dynamic shared memory a kernel may use without opting in (cudaFuncSetAttribute); the
// launchers opt in above it.
constexpr size_t kDefaultMaxDynamicSharedBytes = 48 * 1024;

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Kernel names as launches report them (emulator errors, the build test): family<element type>.
#define CHAINRULE_KERNEL_NAME(family)                                                \
  (std::is_same_v<T, double>  ? family "<float64>"                                   \
   : std::is_same_v<T, float> ? family "<float32>"                                   \
   : std::is_same_v<T, __half> ? family "<float16>"                                  \
                               : family "<bfloat16>")

template <typename T>
constexpr bool uses_tensor_cores = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

// Block tile (M, N, K) of the GEMM kernel for element type T.
struct BlockTile {
  int m, n, k;
};

inline BlockTile block_tile(DType dtype) {
  switch (dtype) {
    case DType::float64: {
      using C = kernels::SimtConfig<double>;
      return {C::kBlockM, C::kBlockN, C::kBlockK};
    }
    case DType::float32: {
      using C = kernels::SimtConfig<float>;
      return {C::kBlockM, C::kBlockN, C::kBlockK};
    }
    default: {
      using C = kernels::TensorCoreTile;
      return {C::kBlockM, C::kBlockN, C::kBlockK};
    }
  }
}

// Split-K of grad_weight, whose reduction axis is the batch (often long) while its output, the
// weight, can be too small to fill the GPU: 4096 x 256 x 256 is 4 block tiles. The k axis is then
// cut into slices whose products land, unrounded, in a workspace and are added in slice order by
// linear_split_k_reduce_kernel. The split is a function of the shape only (not of the device), so
// a given shape gives the same bits on every GPU: aim for ~256 blocks, at least 64 k per slice,
// at most 32 slices. Other roles reduce over in_features / out_features and are not split.
struct SplitK {
  int splits;
  int k_per_split;
};

inline SplitK plan_split_k(DType dtype, GemmRole role, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kTargetBlocks = 256;
  constexpr int64_t kMinKPerSplit = 64;
  constexpr int64_t kMaxSplits = 32;
  const SplitK whole{1, static_cast<int>(k)};
  if (role != GemmRole::grad_weight || m == 0 || n == 0 || k == 0) return whole;
  const BlockTile tile = block_tile(dtype);
  const int64_t tiles = ((m + tile.m - 1) / tile.m) * ((n + tile.n - 1) / tile.n);
  if (tiles >= kTargetBlocks) return whole;
  int64_t splits = (kTargetBlocks + tiles - 1) / tiles;
  splits = std::min({splits, k / kMinKPerSplit, kMaxSplits});
  if (splits <= 1) return whole;
  int64_t k_per_split = (k + splits - 1) / splits;
  k_per_split = (k_per_split + tile.k - 1) / tile.k * tile.k;
  return {static_cast<int>((k + k_per_split - 1) / k_per_split), static_cast<int>(k_per_split)};
}

// Every output tile along x (kernels::block_tile_origin numbers them), k-slices along z. x
// allows 2^31 - 1 blocks: more tiles than that would be an output of over 2^45 elements.
inline dim3 gemm_grid(const GemmParams& p, int block_m, int block_n) {
  const int64_t tiles = int64_t{ceil_div(p.m, block_m)} * ceil_div(p.n, block_n);
  return dim3(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(p.splits));
}

template <typename T, Major kAMajor, Major kBMajor, Activation A, kernels::Store kStore,
          class Launcher>
void launch_gemm_kernel(Launcher& launch, const GemmParams& p) {
  if constexpr (!uses_tensor_cores<T>) {
    using Config = kernels::SimtConfig<T>;
    const dim3 grid = gemm_grid(p, Config::kBlockM, Config::kBlockN);
    launch(CHAINRULE_KERNEL_NAME("linear_gemm_simt_kernel"),
           &kernels::linear_gemm_simt_kernel<T, kAMajor, kBMajor, A, kStore>, grid,
           dim3(Config::kThreads), static_cast<size_t>(Config::kSmemBytes), p);
  } else {
    using Tile = kernels::TensorCoreTile;
    const dim3 grid = gemm_grid(p, Tile::kBlockM, Tile::kBlockN);
    launch(CHAINRULE_KERNEL_NAME("linear_gemm_tensor_core_kernel"),
           &kernels::linear_gemm_tensor_core_kernel<T, kAMajor, kBMajor, A, kStore>, grid,
           dim3(Tile::kThreads), static_cast<size_t>(Tile::kSmemBytes), p);
  }
}

template <typename T, class Launcher>
void launch_gemm_typed(Launcher& launch, GemmRole role, Activation activation,
                       const GemmParams& p) {
  using kernels::Store;
  switch (role) {
    case GemmRole::forward:
      dispatch_activation(activation, [&](auto act) {
        launch_gemm_kernel<T, Major::k, Major::k, decltype(act)::value, Store::output>(launch, p);
      });
      return;
    case GemmRole::grad_input:
      launch_gemm_kernel<T, Major::k, Major::mn, Activation::none, Store::output>(launch, p);
      return;
    case GemmRole::grad_weight:
      if (p.splits > 1) {
        launch_gemm_kernel<T, Major::mn, Major::mn, Activation::none, Store::partial>(launch, p);
        launch(CHAINRULE_KERNEL_NAME("linear_split_k_reduce_kernel"),
               &kernels::linear_split_k_reduce_kernel<T>,
               dim3(ceil_div(static_cast<int64_t>(p.m) * p.n, 256)), dim3(256), size_t{0}, p);
      } else if (p.accumulate) {
        launch_gemm_kernel<T, Major::mn, Major::mn, Activation::none, Store::accumulate>(launch, p);
      } else {
        launch_gemm_kernel<T, Major::mn, Major::mn, Activation::none, Store::output>(launch, p);
      }
      return;
  }
}

// C = epilogue(A . B) for one of the three roles. Does nothing for an empty output; K = 0 writes
// the epilogue of a zero product (bias and activation, or C unchanged when accumulating).
// p.splits / p.k_per_split come from plan_split_k (1 / k: not split), p.partial_sums holds
// splits * M * N accumulation-type values when split, p.accumulate selects C += for grad_weight.
template <class Launcher>
void launch_gemm(Launcher& launch, DType dtype, GemmRole role, Activation activation,
                 const GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  switch (dtype) {
    case DType::float64: return launch_gemm_typed<double>(launch, role, activation, p);
    case DType::float32: return launch_gemm_typed<float>(launch, role, activation, p);
    case DType::bfloat16: return launch_gemm_typed<__nv_bfloat16>(launch, role, activation, p);
    case DType::float16: return launch_gemm_typed<__half>(launch, role, activation, p);
  }
}

// Row slicing of the bias-gradient reduction: a function of M only, so db's summation order (and
// bits) never depends on the device. At least 256 rows per slice, at most 64 slices.
struct BiasGradSlicing {
  int rows_per_slice;
  int slices;
};

inline BiasGradSlicing plan_bias_grad(int64_t m) {
  int64_t rows = (m + 63) / 64;
  rows = (rows + 7) / 8 * 8;
  if (rows < 256) rows = 256;
  const int64_t slices = m == 0 ? 1 : (m + rows - 1) / rows;
  return {static_cast<int>(rows), static_cast<int>(slices)};
}

template <typename T, class Launcher>
void launch_bias_grad_typed(Launcher& launch, Activation activation, const BiasGradParams& p) {
  using Tile = kernels::BiasGradTile;
  using Acc = kernels::accumulate_t<T>;
  const dim3 grid(ceil_div(p.n, Tile::kColumns), p.slices);
  const size_t smem = sizeof(Acc) * Tile::kWarps * Tile::kColumns;
  dispatch_activation(activation, [&](auto act) {
    launch(CHAINRULE_KERNEL_NAME("linear_bias_grad_kernel"),
           &kernels::linear_bias_grad_kernel<T, decltype(act)::value>, grid, dim3(Tile::kThreads),
           smem, p);
  });
  if (p.grad_bias != nullptr && p.slices > 1) {
    launch(CHAINRULE_KERNEL_NAME("linear_bias_grad_finalize_kernel"),
           &kernels::linear_bias_grad_finalize_kernel<T>, dim3(ceil_div(p.n, Tile::kThreads)),
           dim3(Tile::kThreads), size_t{0}, p);
  }
}

// dZ = dY * act'(Z) (activation != none) and/or db (grad_bias != null); p.slices and
// p.rows_per_slice come from plan_bias_grad(p.m), and p.partial_sums holds slices * N
// accumulation-type values when slices > 1.
template <class Launcher>
void launch_bias_grad(Launcher& launch, DType dtype, Activation activation,
                      const BiasGradParams& p) {
  if (p.n == 0) return;
  switch (dtype) {
    case DType::float64: return launch_bias_grad_typed<double>(launch, activation, p);
    case DType::float32: return launch_bias_grad_typed<float>(launch, activation, p);
    case DType::bfloat16: return launch_bias_grad_typed<__nv_bfloat16>(launch, activation, p);
    case DType::float16: return launch_bias_grad_typed<__half>(launch, activation, p);
  }
}

// Hands every kernel of the linear layer to `launch` once, with dummy parameters: for the build
// test (tests/test_cuda_build.py), whose Launcher records the name, block and shared memory of
// each kernel instead of running it. Never call it with a launcher that runs kernels.
template <class Launcher>
void announce_every_kernel(Launcher& launch) {
  GemmParams gemm{};
  gemm.m = gemm.n = gemm.k = gemm.k_per_split = gemm.splits = 1;
  BiasGradParams bias{};
  bias.m = bias.n = 1;
  bias.rows_per_slice = 1;
  bias.slices = 2;
  bias.grad_bias = &bias;  // non-null: the finalize kernel is announced too
  for (DType dtype : {DType::float64, DType::float32, DType::bfloat16, DType::float16}) {
    for (int a = 0; a < kNumActivations; ++a) {
      const Activation activation = static_cast<Activation>(a);
      launch_gemm(launch, dtype, GemmRole::forward, activation, gemm);
      launch_bias_grad(launch, dtype, activation, bias);
    }
    launch_gemm(launch, dtype, GemmRole::grad_input, Activation::none, gemm);
    for (bool accumulate : {false, true}) {
      GemmParams grad_weight = gemm;
      grad_weight.accumulate = accumulate;
      launch_gemm(launch, dtype, GemmRole::grad_weight, Activation::none, grad_weight);
    }
    GemmParams split = gemm;
    split.splits = 2;
    launch_gemm(launch, dtype, GemmRole::grad_weight, Activation::none, split);
  }
}

#undef CHAINRULE_KERNEL_NAME

}  // namespace chainrule::linear_plan
