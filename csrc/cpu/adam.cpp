// Fused multi-tensor Adam/AdamW on the CPU: one call updates every tensor of a param group.
// The per-element math is csrc/include/chainrule/adam_math.h, shared with the CUDA kernel and
// its emulated twin, so a float32 step gives the same bits on every backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "chainrule/adam_math.h"
#include "ops.h"

namespace chainrule::cpu {

namespace {

// One tensor. param_t is the parameter's storage type; T the math and state type. With a float32
// master copy, the update runs on the master and the parameter receives its rounding.
template <typename param_t, typename T>
void adam_tensor(param_t* param, const param_t* grad, T* exp_avg, T* exp_avg_sq,
                 T* max_exp_avg_sq, T* master, int64_t n, const AdamScalars<T>& s) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    T unused_max = 0;
    for (int64_t i = begin; i < end; ++i) {
      T p = master ? master[i] : static_cast<T>(param[i]);
      T& vmax = max_exp_avg_sq ? max_exp_avg_sq[i] : unused_max;
      adam_update_element<T>(p, static_cast<T>(grad[i]), exp_avg[i], exp_avg_sq[i], vmax, s);
      if (master) master[i] = p;
      param[i] = static_cast<param_t>(p);
    }
  });
}

void adam_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, at::TensorList master_params, double lr,
               const AdamOptions& options, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) return;
  const float* scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  for (size_t i = 0; i < params.size(); ++i) {
    float* step_ptr = state_steps[i].mutable_data_ptr<float>();
    *step_ptr += 1.0f;
    const int64_t step = static_cast<int64_t>(*step_ptr);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(),
                                    "chainrule.adam_", [&] {
      using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const AdamScalars<T> s = adam_scalars<T>(options, lr, step, scale);
      adam_tensor<scalar_t, T>(
          params[i].mutable_data_ptr<scalar_t>(), grads[i].const_data_ptr<scalar_t>(),
          exp_avgs[i].mutable_data_ptr<T>(), exp_avg_sqs[i].mutable_data_ptr<T>(),
          options.amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr<T>() : nullptr,
          master_params.empty() ? nullptr : master_params[i].mutable_data_ptr<T>(),
          params[i].numel(), s);
    });
  }
}

}  // namespace

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
           at::TensorList master_params, double lr, double beta1, double beta2,
           double weight_decay, double eps, bool amsgrad, bool maximize,
           bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf) {
  adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, lr,
            AdamOptions{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
            grad_scale, found_inf);
}

void adam_tensor_lr_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList state_steps, at::TensorList master_params,
                     const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                     double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  // On the CPU the tensor lr is host memory: read it directly, with no dispatcher call.
  double lr_value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lr.scalar_type(), "chainrule.adam_", [&] {
    lr_value = static_cast<double>(*lr.const_data_ptr<scalar_t>());
  });
  adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
            lr_value,
            AdamOptions{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
            grad_scale, found_inf);
}

}  // namespace chainrule::cpu
