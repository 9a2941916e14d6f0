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

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Kernel names as launches report them (emulator errors, the build test): family<element type>.
#define CHAINRULE_KERNEL_NAME(family)                                                \
  (std::is_same_v<T, double>  ? family "<float64>"                                   \
   : std::is_same_v<T, float> ? family "<float32>"                                   \
   : std::is_same_v<T, __half> ? family "<float16>"                                  \
                               : family "<bfloat16>")

template <typename T, Major kAMajor, Major kBMajor, Activation A, bool kAccumulate, class Launcher>
void launch_gemm_kernel(Launcher& launch, const GemmParams& p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using Config = kernels::SimtConfig<T>;
    const dim3 grid(ceil_div(p.m, Config::kBlockM), ceil_div(p.n, Config::kBlockN));
    launch(CHAINRULE_KERNEL_NAME("linear_gemm_simt_kernel"),
           &kernels::linear_gemm_simt_kernel<T, kAMajor, kBMajor, A, kAccumulate>, grid,
           dim3(Config::kThreads), static_cast<size_t>(Config::kSmemBytes), p);
  } else {
    using Tile = kernels::TensorCoreTile;
    const dim3 grid(ceil_div(p.m, Tile::kBlockM), ceil_div(p.n, Tile::kBlockN));
    launch(CHAINRULE_KERNEL_NAME("linear_gemm_tensor_core_kernel"),
           &kernels::linear_gemm_tensor_core_kernel<T, kAMajor, kBMajor, A, kAccumulate>, grid,
           dim3(Tile::kThreads), static_cast<size_t>(Tile::kSmemBytes), p);
  }
}

template <typename T, class Launcher>
void launch_gemm_typed(Launcher& launch, GemmRole role, Activation activation, bool accumulate,
                       const GemmParams& p) {
  switch (role) {
    case GemmRole::forward:
      dispatch_activation(activation, [&](auto act) {
        launch_gemm_kernel<T, Major::k, Major::k, decltype(act)::value, false>(launch, p);
      });
      return;
    case GemmRole::grad_input:
      launch_gemm_kernel<T, Major::k, Major::mn, Activation::none, false>(launch, p);
      return;
    case GemmRole::grad_weight:
      if (accumulate) {
        launch_gemm_kernel<T, Major::mn, Major::mn, Activation::none, true>(launch, p);
      } else {
        launch_gemm_kernel<T, Major::mn, Major::mn, Activation::none, false>(launch, p);
      }
      return;
  }
}

// C = epilogue(A . B) for one of the three roles. Does nothing for an empty output; K = 0 writes
// the epilogue of a zero product (bias and activation, or C unchanged when accumulating).
template <class Launcher>
void launch_gemm(Launcher& launch, DType dtype, GemmRole role, Activation activation,
                 bool accumulate, const GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  switch (dtype) {
    case DType::float64: return launch_gemm_typed<double>(launch, role, activation, accumulate, p);
    case DType::float32: return launch_gemm_typed<float>(launch, role, activation, accumulate, p);
    case DType::bfloat16:
      return launch_gemm_typed<__nv_bfloat16>(launch, role, activation, accumulate, p);
    case DType::float16: return launch_gemm_typed<__half>(launch, role, activation, accumulate, p);
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
  gemm.m = gemm.n = gemm.k = 1;
  BiasGradParams bias{};
  bias.m = bias.n = 1;
  bias.rows_per_slice = 1;
  bias.slices = 2;
  bias.grad_bias = &bias;  // non-null: the finalize kernel is announced too
  for (DType dtype : {DType::float64, DType::float32, DType::bfloat16, DType::float16}) {
    for (int a = 0; a < kNumActivations; ++a) {
      const Activation activation = static_cast<Activation>(a);
      launch_gemm(launch, dtype, GemmRole::forward, activation, false, gemm);
      launch_bias_grad(launch, dtype, activation, bias);
    }
    launch_gemm(launch, dtype, GemmRole::grad_input, Activation::none, false, gemm);
    launch_gemm(launch, dtype, GemmRole::grad_weight, Activation::none, false, gemm);
    launch_gemm(launch, dtype, GemmRole::grad_weight, Activation::none, true, gemm);
  }
}

#undef CHAINRULE_KERNEL_NAME

}  // namespace chainrule::linear_plan
