// Fused linear layer on the CPU.
//
//   forward:  Z = X W^T + b,  Y = act(Z)              (Z kept for backward when asked)
//   backward: dZ = dY * act'(Z);  dX = dZ W;  dW = dZ^T X (or dW += ...);  db = sum_rows dZ
//
// Two paths, chosen per call by cpu/gemm_path.h from the CPU, the dtype and the shape (our kernels
// need float32 on AVX-512/AVX2 or bfloat16 on AVX512_BF16; the rule then picks the faster):
//  - our GEMM (cpu/gemm/gemm.h): the epilogues live inside it. The forward's bias, activation and pre-activation store happen in
//    the micro-tile write-back; the backward applies act'(Z) while packing dY for dX (writing dZ
//    out on the way, which dW then reads), adds dW into the gradient buffer in the write-back
//    (beta = 1) and takes the bias gradient as row sums of the packed dZᵀ.
//  - ATen's GEMM (MKL / oneDNN; also float64, float16 and ISA "fallback"), run as eager PyTorch
//    runs the layer but in one op: the forward is F.linear's addmm (bias inside the GEMM) and
//    torch's activation, with Z itself kept as the pre-activation; the backward is torch's
//    activation backward for dZ, fixed-order bias-gradient column sums, then the two GEMMs, the
//    weight gradient's adding into the gradient buffer (beta = 1) instead of a temporary.
//    bfloat16/float16 multiply as they are where oneDNN has bf16 instructions, otherwise they are
//    widened to float32, with bias, rounding and activation in one pass each way (the forward's
//    activation on the vector code where the ISA has it).
// The math of our kernels is csrc/include/chainrule/activation.h (vector twins:
// cpu/gemm/simd_math.h).
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "chainrule/activation.h"
#include "checks.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm_path.h"
#include "cpu/isa.h"
#include "ops.h"

namespace chainrule::cpu {

namespace {

// Rows per chunk of the bias-gradient reduction. Fixed (not derived from the thread count) so the
// summation order, and so the result's bits, do not depend on how many threads run.
constexpr int64_t kReduceRows = 256;

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// (rows, features) view of an (..., features) tensor; copies only when it is not contiguous. A
// contiguous 2-D tensor is returned as it is: no view op (~0.5 µs of a decoding layer's few).
at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2 && t.is_contiguous()) return t;
  return t.reshape({-1, t.size(-1)}).contiguous();
}

// `rows` (M, N) as the (..., N) output of sizes `out_sizes`; itself when those are 2-D.
at::Tensor shaped(const at::Tensor& rows, at::IntArrayRef out_sizes) {
  return out_sizes.size() == 2 ? rows : rows.view(out_sizes);
}

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out = sizes.vec();
  out.back() = last;
  return out;
}

// out = act(acc + bias), pre = acc + bias; acc is (M, N) in the accumulation type. With float
// sums and a vector ISA the activation runs on the vector code of our GEMM's write-back
// (gemm::activation_map, held against float64 by tests/test_cpu_isa.py), a row at a time; the
// scalar activation.h otherwise (float64, the fallback ISA).
template <Activation A, typename scalar_t, typename acc_t>
void forward_epilogue(const acc_t* acc, const scalar_t* bias, scalar_t* out, scalar_t* pre,
                      int64_t M, int64_t N) {
  const CpuIsa isa = active_isa();
  const bool vector = std::is_same_v<acc_t, float> && A != Activation::none &&
                      isa != CpuIsa::fallback;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> z_row(vector ? N : 0);
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
        if (vector) {
          z_row[j] = static_cast<float>(z);
        } else {
          out_row[j] = static_cast<scalar_t>(activation_forward<A>(z));
        }
      }
      if (vector) {
        gemm::activation_map(isa, A, /*derivative=*/false, z_row.data(), z_row.data(), N);
        for (int64_t j = 0; j < N; ++j) out_row[j] = static_cast<scalar_t>(z_row[j]);
      }
    }
  });
}


// torch's own activation and its backward, as eager F.linear + activation runs them, but on
// fixed blocks of kElementwiseBlock values: torch's vectorised and scalar code differ in the last
// bits (GELU, SiLU), and where a block's scalar tail falls would otherwise depend on how many
// threads split the tensor. A block is at::internal::GRAIN_SIZE values, which torch never splits
// further, and inside at::parallel_for each runs on one thread: the same bits at any thread count.
constexpr int64_t kElementwiseBlock = 32768;

// f(out_block, in_blocks...) over 1-D blocks of `out` and `ins` (all contiguous, same size).
template <typename F>
void elementwise_blocks(const at::Tensor& out, std::initializer_list<at::Tensor> ins, F&& f) {
  const int64_t n = out.numel();
  at::Tensor out_flat = out.view({-1});
  std::vector<at::Tensor> ins_flat;
  for (const at::Tensor& t : ins) ins_flat.push_back(t.view({-1}));
  at::parallel_for(0, (n + kElementwiseBlock - 1) / kElementwiseBlock, 1,
                   [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first = block * kElementwiseBlock;
      const int64_t count = std::min(kElementwiseBlock, n - first);
      std::vector<at::Tensor> slices;
      for (const at::Tensor& t : ins_flat) slices.push_back(t.narrow(0, first, count));
      f(out_flat.narrow(0, first, count), slices);
    }
  });
}

at::Tensor torch_activation(const at::Tensor& z, Activation act) {
  if (act == Activation::none) return z;
  if (act == Activation::relu) return at::relu(z);  // exact: no vector/scalar difference
  at::Tensor out = at::empty_like(z);
  elementwise_blocks(out, {z}, [&](at::Tensor o, const std::vector<at::Tensor>& in) {
    if (act == Activation::gelu) at::gelu_out(o, in[0]);
    else if (act == Activation::gelu_tanh) at::gelu_out(o, in[0], "tanh");
    else at::silu_out(o, in[0]);
  });
  return out;
}

at::Tensor torch_activation_backward(const at::Tensor& grad, const at::Tensor& z, Activation act) {
  if (act == Activation::none) return grad;
  if (act == Activation::relu) return at::threshold_backward(grad, z, 0);
  at::Tensor out = at::empty_like(grad);
  elementwise_blocks(out, {grad, z}, [&](at::Tensor o, const std::vector<at::Tensor>& in) {
    if (act == Activation::gelu) at::gelu_backward_out(o, in[0], in[1]);
    else if (act == Activation::gelu_tanh) at::gelu_backward_out(o, in[0], in[1], "tanh");
    else at::silu_backward_out(o, in[0], in[1]);
  });
  return out;
}

// out[j] = sum over c of partial[c * N + j], chunk by chunk in order: the last step of the
// fixed-order column sums below.
template <typename acc_t>
void sum_chunks(const std::vector<acc_t>& partial, int64_t chunks, int64_t N, acc_t* out) {
  at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * N + j];
      out[j] = s;
    }
  });
}

// out[j] = sum_i values[i, j] of an (M, N) matrix in acc_t, in a fixed order (chunks of
// kReduceRows rows, then the chunks in order): the same bits whatever the thread count.
template <typename scalar_t, typename acc_t>
void column_sums(const scalar_t* values, acc_t* out, int64_t M, int64_t N) {
  const int64_t chunks = (M + kReduceRows - 1) / kReduceRows;
  std::vector<acc_t> partial(chunks * N, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      acc_t* sums = partial.data() + c * N;
      for (int64_t i = c * kReduceRows; i < std::min(M, (c + 1) * kReduceRows); ++i) {
        const scalar_t* row = values + i * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) sums[j] += static_cast<acc_t>(row[j]);
      }
    }
  });
  sum_chunks(partial, chunks, N, out);
}

// dZ = dY * act'(Z) in grad_t (not stored when grad_pre is null), and db = column sums of dZ in
// acc_t, in a fixed order (deterministic whatever the thread count).
template <Activation A, typename scalar_t, typename grad_t, typename acc_t>
void backward_prologue(const scalar_t* grad_output, const scalar_t* pre, grad_t* grad_pre,
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
            g = activation_grad<A>(g, static_cast<acc_t>(pre[i * N + j]));
          }
          if (grad_pre) grad_pre[i * N + j] = static_cast<grad_t>(g);
          if (sums) sums[j] += g;
        }
      }
    }
  });
  if (grad_bias) sum_chunks(partial, chunks, N, grad_bias);
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

// ---- our GEMM ------------------------------------------------------------------------------


// Forward through our GEMM: output = act(X W^T + b), pre = X W^T + b.
void forward_gemm(gemm::ElementType type, CpuIsa isa, const at::Tensor& input_rows,
                  const at::Tensor& weight, const at::Tensor* bias, Activation act,
                  at::Tensor& output, at::Tensor* pre) {
  gemm::Problem p;
  p.type = type;
  p.m = input_rows.size(0);
  p.n = weight.size(0);
  p.k = weight.size(1);
  p.a = input_rows.const_data_ptr();
  p.a_row_stride = p.k;
  p.a_col_stride = 1;
  p.b = weight.const_data_ptr();  // B(k, j) = W[j, k]
  p.b_row_stride = 1;
  p.b_col_stride = p.k;
  p.c = output.mutable_data_ptr();
  p.ldc = p.n;
  p.bias = bias ? bias->const_data_ptr() : nullptr;
  p.activation = act;
  p.pre_activation = pre ? pre->mutable_data_ptr() : nullptr;
  gemm::run(p, isa);
}

// Backward through our GEMM. grad_rows / pre_rows: (M, N) contiguous; input_rows: (M, K);
// weight: (N, K) contiguous. grad_weight (contiguous) is written or, with `accumulate`, added to;
// the bias gradient goes to grad_bias the same way.
void backward_gemm(gemm::ElementType type, CpuIsa isa, const at::Tensor& grad_rows,
                   const at::Tensor& pre_rows, const at::Tensor& input_rows,
                   const at::Tensor& weight, Activation act, at::Tensor* grad_input_rows,
                   const at::Tensor* grad_weight, const at::Tensor* grad_bias, bool accumulate) {
  const int64_t M = grad_rows.size(0), N = weight.size(0), K = weight.size(1);
  const void* pre = act == Activation::none ? nullptr : pre_rows.const_data_ptr();
  // When both GEMMs run, dgrad's packing also writes dZ out, and wgrad reads dZ instead of dY and
  // Z: act' is evaluated once, and wgrad reads half the bytes.
  at::Tensor grad_pre;
  if (grad_input_rows && grad_weight && act != Activation::none) grad_pre = at::empty_like(grad_rows);
  if (grad_input_rows) {
    // dX (M x K) = dZ (M x N) · W (N x K)
    gemm::Problem p;
    p.type = type;
    p.m = M; p.n = K; p.k = N;
    p.a = grad_rows.const_data_ptr();
    p.a_row_stride = N; p.a_col_stride = 1;
    p.activation_grad = act;
    p.a_pre = pre;
    p.b = weight.const_data_ptr();
    p.b_row_stride = K; p.b_col_stride = 1;
    p.a_transformed = grad_pre.defined() ? grad_pre.mutable_data_ptr() : nullptr;
    p.c = grad_input_rows->mutable_data_ptr();
    p.ldc = K;
    gemm::run(p, isa);
  }
  at::Tensor bias_sums;
  if (grad_bias) bias_sums = at::zeros({N}, grad_rows.options().dtype(at::kFloat));
  if (grad_weight) {
    // dW (N x K) (+)= dZᵀ (N x M) · X (M x K); the bias gradient rides along as row sums of dZᵀ.
    gemm::Problem p;
    p.type = type;
    p.m = N; p.n = K; p.k = M;
    p.a_row_stride = 1; p.a_col_stride = N;  // A(n, m) = dZ[m, n]
    if (grad_pre.defined()) {
      p.a = grad_pre.const_data_ptr();
    } else {
      p.a = grad_rows.const_data_ptr();
      p.activation_grad = act;
      p.a_pre = pre;
    }
    p.a_row_sums = grad_bias ? bias_sums.mutable_data_ptr<float>() : nullptr;
    p.b = input_rows.const_data_ptr();
    p.b_row_stride = K; p.b_col_stride = 1;
    p.c = grad_weight->mutable_data_ptr();
    p.ldc = K;
    p.accumulate = accumulate;
    gemm::run(p, isa);
  } else if (grad_bias) {
    // No weight gradient asked: the bias gradient alone, in the one-pass prologue (dZ not kept).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(),
                                    "chainrule.linear_backward", [&] {
      dispatch_activation(act, [&](auto a) {
        backward_prologue<decltype(a)::value, scalar_t, float, float>(
            grad_rows.const_data_ptr<scalar_t>(),
            pre ? pre_rows.const_data_ptr<scalar_t>() : nullptr, /*grad_pre=*/nullptr,
            bias_sums.mutable_data_ptr<float>(), M, N);
      });
    });
  }
  if (grad_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_bias->scalar_type(),
                                    "chainrule.linear_backward", [&] {
      store_rounded<scalar_t, float>(bias_sums.const_data_ptr<float>(),
                                     grad_bias->mutable_data_ptr<scalar_t>(), N, accumulate);
    });
  }
}

// ---- the backward -------------------------------------------------------------------------

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

  const CpuIsa isa = active_isa();
  const std::optional<gemm::ElementType> type = our_gemm_type(dtype, isa);
  if (type && M > 0 && N > 0 && K > 0 && (!grad_weight || grad_weight->is_contiguous()) &&
      gemm_path(dtype, true, LinearPass::backward, M, N, K) == GemmPath::ours) {
    at::Tensor weight_c = weight.contiguous();
    at::Tensor input_rows = as_rows(input);
    at::Tensor grad_input_rows;
    if (compute_grad_input) grad_input_rows = at::empty({M, K}, input.options());
    backward_gemm(*type, isa, grad_rows, pre_rows, input_rows, weight_c, activation,
                  compute_grad_input ? &grad_input_rows : nullptr, grad_weight, grad_bias,
                  accumulate);
    if (!compute_grad_input) return at::empty({0}, input.options());
    return grad_input_rows.reshape(input.sizes());
  }

  const at::ScalarType compute = aten_compute_type(dtype);
  at::Tensor grad_pre;  // dZ, (M, N) in the compute type
  at::Tensor bias_sums =
      grad_bias ? at::empty({N}, grad_rows.options().dtype(acc_dtype)) : at::Tensor();
  if (compute == dtype) {
    grad_pre = torch_activation_backward(grad_rows, pre_rows, activation);
    if (grad_bias) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_backward", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        column_sums<scalar_t, acc_t>(grad_pre.const_data_ptr<scalar_t>(),
                                     bias_sums.mutable_data_ptr<acc_t>(), M, N);
      });
    }
  } else {
    // Widened: dZ in float32 and the bias sums in one scalar pass.
    grad_pre = at::empty({M, N}, grad_rows.options().dtype(compute));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_backward", [&] {
      dispatch_activation(activation, [&](auto act) {
        backward_prologue<decltype(act)::value, scalar_t, float, float>(
            grad_rows.const_data_ptr<scalar_t>(),
            pre_rows.defined() ? pre_rows.const_data_ptr<scalar_t>() : nullptr,
            grad_pre.mutable_data_ptr<float>(),
            grad_bias ? bias_sums.mutable_data_ptr<float>() : nullptr, M, N);
      });
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (grad_bias) {
      store_rounded<scalar_t, acc_t>(bias_sums.const_data_ptr<acc_t>(),
                                     grad_bias->mutable_data_ptr<scalar_t>(), N, accumulate);
    }
    if (grad_weight) {
      at::Tensor input_rows = as_rows(input).to(compute);
      if (compute == dtype) {
        // Straight into the gradient buffer: beta = 1 adds inside the GEMM, beta = 0 overwrites
        // (addmm_ rather than mm's out= form, which misses oneDNN's bf16 GEMM).
        grad_weight->addmm_(grad_pre.t(), input_rows, /*beta=*/accumulate ? 1 : 0);
      } else {
        at::Tensor product = at::mm(grad_pre.t(), input_rows);
        store_rounded<scalar_t, acc_t>(product.const_data_ptr<acc_t>(),
                                       grad_weight->mutable_data_ptr<scalar_t>(), N * K,
                                       accumulate);
      }
    }
  });
  if (!compute_grad_input) return at::empty({0}, input.options());
  at::Tensor grad_input_rows = at::mm(grad_pre, weight.to(compute));
  return grad_input_rows.to(dtype).reshape(input.sizes());
}

// output = act(acc + b), pre = acc + b, from (M, N) sums in the accumulation type: one rounding
// to the storage type, bias and activation in one pass (activation.h's scalar functions). `acc`
// is the caller's own: where it already holds the storage type, the pass runs in place in it.
std::tuple<at::Tensor, at::Tensor> forward_from_accumulators(
    const at::Tensor& acc, const std::optional<at::Tensor>& bias, Activation act, bool keep_pre,
    const at::TensorOptions& options, const std::vector<int64_t>& out_sizes) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const at::ScalarType dtype = options.dtype().toScalarType();
  at::Tensor output = acc.scalar_type() == dtype ? acc : at::empty({M, N}, options);
  at::Tensor pre = keep_pre ? at::empty({M, N}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "chainrule.linear_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_activation(act, [&](auto a) {
      forward_epilogue<decltype(a)::value, scalar_t, acc_t>(
          acc.const_data_ptr<acc_t>(), bias ? bias->contiguous().const_data_ptr<scalar_t>() : nullptr,
          output.mutable_data_ptr<scalar_t>(),
          keep_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr, M, N);
    });
  });
  return {shaped(output, out_sizes), keep_pre ? shaped(pre, out_sizes) : pre};
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

  const bool keep_pre = save_pre_activation && act != Activation::none;
  auto out_sizes = with_last_dim(input.sizes(), N);
  // The second output where no pre-activation is kept: an empty tensor.
  const auto no_pre = [&] { return at::empty({0}, input.options()); };

  const CpuIsa isa = active_isa();
  const int64_t K = weight.size(1);
  const bool nonempty = M > 0 && N > 0 && K > 0;
  if (nonempty && uses_gemv(dtype, M, N, K)) {
    // Decoding-sized: the weight streamed once (gemm::gemv), then the one-pass epilogue.
    at::Tensor acc = at::empty({M, N}, input.options().dtype(at::kFloat));
    gemm::gemv(dtype == at::kFloat ? gemm::ElementType::float32 : gemm::ElementType::bfloat16,
               isa, input_rows.const_data_ptr(), M, K, weight.contiguous().const_data_ptr(), N,
               acc.mutable_data_ptr<float>(), uses_bf16_dot_gemv(isa));
    return forward_from_accumulators(acc, bias, act, keep_pre, input.options(), out_sizes);
  }
  if (auto type = our_gemm_type(dtype, isa);
      type && nonempty &&
      gemm_path(dtype, true, LinearPass::forward, M, N, K) == GemmPath::ours) {
    at::Tensor output = at::empty({M, N}, input.options());
    at::Tensor pre = keep_pre ? at::empty({M, N}, input.options()) : no_pre();
    at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
    forward_gemm(*type, isa, input_rows, weight.contiguous(), bias ? &bias_c : nullptr, act,
                 output, keep_pre ? &pre : nullptr);
    return {shaped(output, out_sizes), keep_pre ? shaped(pre, out_sizes) : pre};
  }

  if (aten_compute_type(dtype) == dtype) {
    // F.linear's own GEMM, Z = addmm(b, X, Wᵀ) rounded once, and torch's activation; Z itself is
    // kept as the pre-activation.
    at::Tensor pre = bias ? at::addmm(*bias, input_rows, weight.t()) : at::mm(input_rows, weight.t());
    if (act == Activation::none) return {shaped(pre, out_sizes), no_pre()};
    at::Tensor output = torch_activation(pre, act);
    return {shaped(output, out_sizes), keep_pre ? shaped(pre, out_sizes) : no_pre()};
  }

  // Widened to float32: one rounding at the end, bias and activation in one pass.
  return forward_from_accumulators(at::mm(input_rows.to(acc_dtype), weight.to(acc_dtype).t()),
                                   bias, act, keep_pre, input.options(), out_sizes);
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
