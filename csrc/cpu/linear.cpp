// Fused linear layer on the CPU.
//
//   forward:  Z = X W^T + b,  Y = act(Z)              (Z kept for backward when asked)
//   backward: dZ = dY * act'(Z);  dX = dZ W;  dW = dZ^T X (or dW += ...);  db = sum_rows dZ
//
// The GEMMs call ATen's BLAS for now, in the accumulation type (float32 for bfloat16/float16,
// else the tensor's own type). Everything around them is ours and done in one pass each: bias +
// activation + pre-activation store after the forward GEMM; activation derivative + bias-gradient
// column sums before the backward GEMMs; the fp32 -> storage-type rounding (and, for low-precision
// gradient buffers, the accumulation) after them. The math is csrc/include/chainrule/activation.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "chainrule/activation.h"
#include "checks.h"
#include "ops.h"

namespace chainrule::cpu {

namespace {

// Rows per chunk of the bias-gradient reduction. Fixed (not derived from the thread count) so the
// summation order, and so the result's bits, do not depend on how many threads run.
constexpr int64_t kReduceRows = 256;

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// (rows, features) view of an (..., features) tensor; copies only when it is not contiguous.
at::Tensor as_rows(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}).contiguous(); }

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out = sizes.vec();
  out.back() = last;
  return out;
}

// out = act(acc + bias), pre = acc + bias; acc is (M, N) in the accumulation type.
template <Activation A, typename scalar_t, typename acc_t>
void forward_epilogue(const acc_t* acc, const scalar_t* bias, scalar_t* out, scalar_t* pre,
                      int64_t M, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* acc_row = acc + i * N;
      scalar_t* out_row = out + i * N;
      scalar_t* pre_row = pre ? pre + i * N : nullptr;
      for (int64_t j = 0; j < N; ++j) {
        acc_t z = acc_row[j];
        if (bias) z += static_cast<acc_t>(bias[j]);
        // Round Z to the storage type first, as the unfused F.linear + activation would: the
        // output is then the same whether or not Z is kept, and backward sees the value used.
        const scalar_t z_stored = static_cast<scalar_t>(z);
        if (pre_row) pre_row[j] = z_stored;
        z = static_cast<acc_t>(z_stored);
        out_row[j] = static_cast<scalar_t>(activation_forward<A>(z));
      }
    }
  });
}

// dZ = dY * act'(Z) in the accumulation type, and db = column sums of dZ (deterministic).
template <Activation A, typename scalar_t, typename acc_t>
void backward_prologue(const scalar_t* grad_output, const scalar_t* pre, acc_t* grad_pre,
                       acc_t* grad_bias, int64_t M, int64_t N) {
  const int64_t chunks = (M + kReduceRows - 1) / kReduceRows;
  std::vector<acc_t> partial(grad_bias ? chunks * N : 0, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      acc_t* sums = grad_bias ? partial.data() + c * N : nullptr;
      for (int64_t i = c * kReduceRows; i < std::min(M, (c + 1) * kReduceRows); ++i) {
        for (int64_t j = 0; j < N; ++j) {
          acc_t g = static_cast<acc_t>(grad_output[i * N + j]);
          if constexpr (A != Activation::none) {
            g *= activation_derivative<A>(static_cast<acc_t>(pre[i * N + j]));
          }
          grad_pre[i * N + j] = g;
          if (sums) sums[j] += g;
        }
      }
    }
  });
  if (!grad_bias) return;
  at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * N + j];
      grad_bias[j] = s;
    }
  });
}

// dst = round(src) or dst = round(dst + src), elementwise over n values.
template <typename scalar_t, typename acc_t>
void store_rounded(const acc_t* src, scalar_t* dst, int64_t n, bool accumulate) {
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t v = src[i];
      if (accumulate) v += static_cast<acc_t>(dst[i]);
      dst[i] = static_cast<scalar_t>(v);
    }
  });
}

// The backward shared by linear_backward and linear_backward_accumulate. Writes into the given
// buffers (accumulating when asked) and returns grad_input (or an empty tensor).
at::Tensor backward_into(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight, const std::optional<at::Tensor>& pre_activation,
                         Activation activation, bool compute_grad_input,
                         const at::Tensor* grad_weight, const at::Tensor* grad_bias,
                         bool accumulate) {
  const int64_t N = weight.size(0);
  const int64_t K = weight.size(1);
  const at::ScalarType dtype = weight.scalar_type();
  const at::ScalarType acc_dtype = accumulate_type(dtype);
  at::Tensor grad_rows = as_rows(grad_output);
  const int64_t M = grad_rows.size(0);
  at::Tensor pre_rows =
      activation == Activation::none ? at::Tensor() : as_rows(*pre_activation);

  at::Tensor grad_pre = at::empty({M, N}, grad_rows.options().dtype(acc_dtype));
  at::Tensor bias_sums =
      grad_bias ? at::empty({N}, grad_rows.options().dtype(acc_dtype)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_activation(activation, [&](auto act) {
      backward_prologue<decltype(act)::value, scalar_t, acc_t>(
          grad_rows.const_data_ptr<scalar_t>(),
          pre_rows.defined() ? pre_rows.const_data_ptr<scalar_t>() : nullptr,
          grad_pre.mutable_data_ptr<acc_t>(),
          grad_bias ? bias_sums.mutable_data_ptr<acc_t>() : nullptr, M, N);
    });
    if (grad_bias) {
      store_rounded<scalar_t, acc_t>(bias_sums.const_data_ptr<acc_t>(),
                                     grad_bias->mutable_data_ptr<scalar_t>(), N, accumulate);
    }
    if (grad_weight) {
      at::Tensor input_rows = as_rows(input).to(acc_dtype);
      if (dtype == acc_dtype && accumulate) {
        // beta = 1 accumulation inside the GEMM itself, straight into the gradient buffer.
        grad_weight->addmm_(grad_pre.t(), input_rows);
      } else if (dtype == acc_dtype) {
        at::mm_out(const_cast<at::Tensor&>(*grad_weight), grad_pre.t(), input_rows);
      } else {
        at::Tensor product = at::mm(grad_pre.t(), input_rows);
        store_rounded<scalar_t, acc_t>(product.const_data_ptr<acc_t>(),
                                       grad_weight->mutable_data_ptr<scalar_t>(), N * K,
                                       accumulate);
      }
    }
  });
  if (!compute_grad_input) return at::empty({0}, input.options());
  at::Tensor grad_input_rows = at::mm(grad_pre, weight.to(acc_dtype));
  return grad_input_rows.to(dtype).reshape(input.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::string_view activation,
                                                  bool save_pre_activation) {
  const Activation act = check_activation("chainrule.linear_forward", activation);
  const int64_t N = weight.size(0);
  const at::ScalarType dtype = weight.scalar_type();
  const at::ScalarType acc_dtype = accumulate_type(dtype);
  at::Tensor input_rows = as_rows(input);
  const int64_t M = input_rows.size(0);

  at::Tensor acc = at::mm(input_rows.to(acc_dtype), weight.to(acc_dtype).t());
  at::Tensor output = at::empty({M, N}, input.options());
  const bool keep_pre = save_pre_activation && act != Activation::none;
  at::Tensor pre = keep_pre ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_activation(act, [&](auto a) {
      forward_epilogue<decltype(a)::value, scalar_t, acc_t>(
          acc.const_data_ptr<acc_t>(), bias ? bias->contiguous().const_data_ptr<scalar_t>() : nullptr,
          output.mutable_data_ptr<scalar_t>(),
          keep_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr, M, N);
    });
  });
  auto out_sizes = with_last_dim(input.sizes(), N);
  return {output.view(out_sizes), keep_pre ? pre.view(out_sizes) : pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& pre_activation, std::string_view activation, bool has_bias,
    std::array<bool, 3> output_mask) {
  const Activation act = check_activation("chainrule.linear_backward", activation);
  at::Tensor grad_weight =
      output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  const bool want_bias = has_bias && output_mask[2];
  at::Tensor grad_bias =
      want_bias ? at::empty({weight.size(0)}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_input =
      backward_into(grad_output, input, weight, pre_activation, act, output_mask[0],
                    output_mask[1] ? &grad_weight : nullptr, want_bias ? &grad_bias : nullptr,
                    /*accumulate=*/false);
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor linear_backward_accumulate(const at::Tensor& grad_output, const at::Tensor& input,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& pre_activation,
                                      std::string_view activation, bool compute_grad_input,
                                      const at::Tensor& grad_weight,
                                      const std::optional<at::Tensor>& grad_bias) {
  const Activation act = check_activation("chainrule.linear_backward_accumulate", activation);
  return backward_into(grad_output, input, weight, pre_activation, act, compute_grad_input,
                       &grad_weight, grad_bias ? &*grad_bias : nullptr, /*accumulate=*/true);
}

}  // namespace chainrule::cpu
