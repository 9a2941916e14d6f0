// The linear layer's ops when there is nothing to multiply: an empty batch (M = 0),
// out_features = 0 (N = 0) or in_features = 0 (K = 0). F.linear accepts all three; with K = 0 the
// output is act(bias) broadcast (or act(0)) and the bias gradient is the row sum of
// dY * act'(bias), every other gradient being zeros (or empty) of its argument's shape.
//
// These are written once, from ATen ops that work on any device, and the shared dispatch layer
// (dispatch.h) calls them before any backend: no kernel, tile plan or GEMM driver ever sees a zero
// extent. The activation and its derivative are ATen's own (relu, gelu, silu and their
// *_backward), which is what F.linear + the activation computes.
#pragma once

#include <array>
#include <optional>

#include <ATen/core/Tensor.h>

#include "chainrule/activation.h"

namespace chainrule::empty_linear {

// True when input @ weight^T has no product to form: any of M, N, K is zero.
inline bool applies(const at::Tensor& input, const at::Tensor& weight) {
  return input.numel() == 0 || weight.numel() == 0;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           Activation activation, bool save_pre_activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, Activation activation, bool has_bias,
    std::array<bool, 3> output_mask);

at::Tensor backward_accumulate(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& weight,
                               const std::optional<at::Tensor>& pre_activation,
                               Activation activation, bool compute_grad_input,
                               const at::Tensor& grad_weight,
                               const std::optional<at::Tensor>& grad_bias);

}  // namespace chainrule::empty_linear
