// CPU multi-tensor Adam / AdamW: one parallel region over all tensors, SIMD inner loops.
//
// The update is chainrule::adam_update_element (csrc/include/chainrule/adam_math.h), the function
// the CUDA kernel calls; the AVX-512 and AVX2 loops (adam_avx512.cpp, adam_avx2.cpp, through
// adam_simd_loop.h) evaluate that same function on whole registers, so float32 results are
// bitwise identical to the emulated (and real) CUDA kernel's whichever path runs here.
//
// Design (figures in ARCHITECTURE.md, "Adam kernels"):
//   * the per-tensor scalars (bias corrections from the step count, lr, 1 / grad_scale) are
//     computed once per tensor before the parallel region; found_inf is checked first;
//   * all tensors are laid end to end in one element space and at::parallel_for cuts it into
//     one contiguous range per thread, so each thread streams through its part of memory once,
//     whatever the number and sizes of the tensors, and there is one fork/join per step;
//   * each range is walked tensor by tensor; the inner loop is chosen from the CPU's features or
//     CHAINRULE_CPU_ISA=avx512|avx2|fallback;
//   * the step counts advance after the parallel region.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "chainrule/adam_math.h"
#include "cpu/adam_simd.h"
#include "ops.h"

#if __has_include("cpu/isa.h")
#include "cpu/isa.h"
#define CHAINRULE_HAVE_CPU_ISA 1
#endif

namespace chainrule::cpu {

namespace {

using adam_simd::ParamKind;
using adam_simd::Span;

// ---------------------------------------------------------------------------------------------
// Which inner loop runs.

enum class AdamIsa { fallback, avx2, avx512 };

AdamIsa adam_isa() {
#ifdef CHAINRULE_HAVE_CPU_ISA
  switch (active_isa()) {
    case CpuIsa::avx512: return AdamIsa::avx512;
    case CpuIsa::avx2: return AdamIsa::avx2;
    default: return AdamIsa::fallback;
  }
#else
  // Until the shared ISA selection (csrc/cpu/isa.h) is in the tree: the same environment variable.
  static const AdamIsa isa = [] {
    __builtin_cpu_init();
    AdamIsa best = AdamIsa::fallback;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      best = AdamIsa::avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c")) {
      best = AdamIsa::avx2;
    }
    const char* env = std::getenv("CHAINRULE_CPU_ISA");
    if (env == nullptr || *env == 0) return best;
    const std::string_view asked(env);
    AdamIsa want = asked == "avx512" ? AdamIsa::avx512
                   : asked == "avx2" ? AdamIsa::avx2
                                     : AdamIsa::fallback;
    TORCH_CHECK(asked == "avx512" || asked == "avx2" || asked == "fallback",
                "CHAINRULE_CPU_ISA: expected avx512, avx2 or fallback, got '", env, "'");
    TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "CHAINRULE_CPU_ISA=", env,
                ": this CPU cannot run it");
    return want;
  }();
  return isa;
#endif
}

// ---------------------------------------------------------------------------------------------
// Inner loops: the SIMD ones live in their own translation units; this is the portable one.

template <typename P>
void update_span_portable(const Span& t, const AdamScalars<float>& s) {
  auto* param = static_cast<P*>(t.param);
  const auto* grad = static_cast<const P*>(t.grad);
  for (int64_t i = 0; i < t.numel; ++i) {
    float value = t.master != nullptr ? t.master[i] : static_cast<float>(param[i]);
    float unused = 0.0f;
    float& max_exp_avg_sq = t.max_exp_avg_sq != nullptr ? t.max_exp_avg_sq[i] : unused;
    adam_update_element<float>(value, static_cast<float>(grad[i]), t.exp_avg[i], t.exp_avg_sq[i],
                               max_exp_avg_sq, s);
    if (t.master != nullptr) t.master[i] = value;
    param[i] = static_cast<P>(value);
  }
}

void update_span_fallback(const Span& t, const AdamScalars<float>& s) {
  switch (t.kind) {
    case ParamKind::bfloat16: update_span_portable<c10::BFloat16>(t, s); break;
    case ParamKind::float16: update_span_portable<c10::Half>(t, s); break;
    default: update_span_portable<float>(t, s); break;
  }
}

void update_span_double(double* param, const double* grad, double* exp_avg, double* exp_avg_sq,
                        double* max_exp_avg_sq, int64_t numel, const AdamScalars<double>& s) {
  for (int64_t i = 0; i < numel; ++i) {
    double unused = 0.0;
    double& max_sq = max_exp_avg_sq != nullptr ? max_exp_avg_sq[i] : unused;
    adam_update_element<double>(param[i], grad[i], exp_avg[i], exp_avg_sq[i], max_sq, s);
  }
}

// ---------------------------------------------------------------------------------------------
// The op.

struct TensorWork {
  Span span;                      // float32 / bfloat16 / float16 params
  AdamScalars<float> scalars;
  AdamScalars<double> scalars_double;
  bool is_double;
};

ParamKind param_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return ParamKind::bfloat16;
    case at::kHalf: return ParamKind::float16;
    default: return ParamKind::float32;
  }
}

double scalar_value(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return *t.data_ptr<double>();
    case at::kFloat: return static_cast<double>(*t.data_ptr<float>());
    default: return t.item<double>();
  }
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, at::TensorList master_params, double lr,
              const AdamOptions& options, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  // GradScaler found an inf/nan: nothing changes, not even the step counts.
  if (found_inf.has_value() && scalar_value(*found_inf) != 0.0) return;
  float grad_scale_value = 1.0f;
  const float* grad_scale_ptr = nullptr;
  if (grad_scale.has_value()) {
    grad_scale_value = static_cast<float>(scalar_value(*grad_scale));
    grad_scale_ptr = &grad_scale_value;
  }

  std::vector<TensorWork> work(n);
  std::vector<int64_t> offsets(n + 1);  // tensors laid end to end
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.is_contiguous() && grads[i].is_contiguous() &&
                    exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous() &&
                    (!options.amsgrad || max_exp_avg_sqs[i].is_contiguous()) &&
                    (master_params.empty() || master_params[i].is_contiguous()),
                "chainrule.adam_: params, grads and states must be contiguous (index ", i, ")");
    const int64_t step = static_cast<int64_t>(scalar_value(state_steps[i])) + 1;
    TensorWork& w = work[i];
    w.is_double = param.scalar_type() == at::kDouble;
    w.span.param = param.data_ptr();
    w.span.grad = grads[i].data_ptr();
    w.span.exp_avg = static_cast<float*>(exp_avgs[i].data_ptr());
    w.span.exp_avg_sq = static_cast<float*>(exp_avg_sqs[i].data_ptr());
    w.span.max_exp_avg_sq = options.amsgrad ? static_cast<float*>(max_exp_avg_sqs[i].data_ptr()) : nullptr;
    w.span.master = master_params.empty() ? nullptr : master_params[i].data_ptr<float>();
    w.span.numel = param.numel();
    w.span.kind = param_kind(param);
    if (w.is_double) {
      w.scalars_double = adam_scalars<double>(options, lr, step, grad_scale_ptr);
    } else {
      w.scalars = adam_scalars<float>(options, lr, step, grad_scale_ptr);
    }
    offsets[i] = total;
    total += w.span.numel;
  }
  offsets[n] = total;

  const AdamIsa isa = adam_isa();
  auto run_span = [&](const TensorWork& w, int64_t begin, int64_t end) {
    if (w.is_double) {
      auto* max_sq = static_cast<double*>(static_cast<void*>(w.span.max_exp_avg_sq));
      update_span_double(static_cast<double*>(w.span.param) + begin,
                         static_cast<const double*>(w.span.grad) + begin,
                         reinterpret_cast<double*>(w.span.exp_avg) + begin,
                         reinterpret_cast<double*>(w.span.exp_avg_sq) + begin,
                         max_sq != nullptr ? max_sq + begin : nullptr, end - begin,
                         w.scalars_double);
      return;
    }
    const int64_t element_size = w.span.kind == ParamKind::float32 ? 4 : 2;
    Span part = w.span;
    part.param = static_cast<char*>(part.param) + begin * element_size;
    part.grad = static_cast<const char*>(part.grad) + begin * element_size;
    part.exp_avg += begin;
    part.exp_avg_sq += begin;
    if (part.max_exp_avg_sq != nullptr) part.max_exp_avg_sq += begin;
    if (part.master != nullptr) part.master += begin;
    part.numel = end - begin;
    switch (isa) {
      case AdamIsa::avx512: adam_simd::update_span_avx512(part, w.scalars); break;
      case AdamIsa::avx2: adam_simd::update_span_avx2(part, w.scalars); break;
      default: update_span_fallback(part, w.scalars); break;
    }
  };

  // One contiguous range of the concatenated tensors per thread; small steps stay on one thread.
  constexpr int64_t kGrain = 32768;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t position = begin; position < end; ++t) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > position) run_span(work[t], position - offsets[t], stop - offsets[t]);
      position = std::max(position, stop);
    }
  });

  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& step = state_steps[i];
    if (step.scalar_type() == at::kDouble) {
      *step.data_ptr<double>() += 1.0;
    } else {
      *step.data_ptr<float>() += 1.0f;
    }
  }
}

}  // namespace

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           at::TensorList master_params, double lr, double beta1, double beta2, double weight_decay,
           double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
           AdamOptions{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
           grad_scale, found_inf);
}

void adam_tensor_lr_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, at::TensorList master_params, const at::Tensor& lr,
                     double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                     bool maximize, bool decoupled_weight_decay,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
           scalar_value(lr),
           AdamOptions{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
           grad_scale, found_inf);
}

}  // namespace chainrule::cpu
