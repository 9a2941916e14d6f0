#include "checks.h"

#include <string>

#include <c10/util/Exception.h>

namespace chainrule {

namespace {

// torch's spelling of a dtype: "float32", "bfloat16", ...
std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

// "a 3-D float32 tensor of shape [2, 3, 4] on cpu"
std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << "a " << t.dim() << "-D " << dtype_name(t.scalar_type()) << " tensor of shape "
      << t.sizes() << " on " << t.device();
  return out.str();
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name,
              " must be a floating-point tensor (float64, float32, bfloat16 or float16), got ",
              describe(t));
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ",
              t.layout(), " layout");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " and ", ref_name,
              " must have the same dtype, got ", name, " ", dtype_name(t.scalar_type()), " and ",
              ref_name, " ", dtype_name(ref.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " and ", ref_name,
              " must be on the same device, got ", name, " on ", t.device(), " and ", ref_name,
              " on ", ref.device());
}

}  // namespace

Activation check_activation(const char* op, std::string_view activation) {
  Activation parsed = Activation::none;
  std::string name(activation);
  TORCH_CHECK(parse_activation(name.c_str(), &parsed), op, ": unknown activation '", name,
              "'; expected one of None, 'relu', 'gelu', 'gelu_tanh', 'silu'");
  return parsed;
}

void check_linear_forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  check_floating(op, "input", input);
  check_floating(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ",
              describe(weight));
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension (..., in_features), got ",
              describe(input));
  check_like(op, "input", input, "weight", weight);
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input's last dimension (", input.size(-1),
              ") must equal weight's in_features (", weight.size(1), "); input is ",
              describe(input), ", weight is ", describe(weight));
  if (bias.has_value()) {
    check_floating(op, "bias", *bias);
    check_like(op, "bias", *bias, "weight", weight);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be 1-D of size out_features (", weight.size(0), "), got ",
                describe(*bias));
  }
}

void check_linear_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& pre_activation,
                           Activation activation) {
  check_linear_forward(op, input, weight, std::nullopt);
  check_floating(op, "grad_output", grad_output);
  check_like(op, "grad_output", grad_output, "weight", weight);
  auto expected = input.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op, ": grad_output must have shape ",
              at::IntArrayRef(expected), " (input's shape with out_features last), got ",
              describe(grad_output));
  if (activation != Activation::none) {
    TORCH_CHECK(pre_activation.has_value() && pre_activation->numel() == grad_output.numel() &&
                    pre_activation->sizes() == grad_output.sizes(),
                op, ": activation '", activation_name(activation),
                "' needs pre_activation of shape ", grad_output.sizes(), ", got ",
                pre_activation.has_value() ? describe(*pre_activation) : std::string("None"));
    check_like(op, "pre_activation", *pre_activation, "weight", weight);
  }
}

void check_gradient_buffers(const char* op, const at::Tensor& weight,
                            const at::Tensor& grad_weight,
                            const std::optional<at::Tensor>& grad_bias) {
  check_floating(op, "grad_weight", grad_weight);
  TORCH_CHECK(grad_weight.sizes() == weight.sizes(), op, ": grad_weight must have weight's shape ",
              weight.sizes(), ", got ", describe(grad_weight));
  TORCH_CHECK(grad_weight.scalar_type() == weight.scalar_type(), op,
              ": grad_weight must have weight's dtype ", dtype_name(weight.scalar_type()), ", got ",
              describe(grad_weight));
  TORCH_CHECK(grad_weight.is_contiguous(), op, ": grad_weight must be contiguous, got strides ",
              grad_weight.strides());
  TORCH_CHECK(grad_weight.device() == weight.device(), op,
              ": grad_weight must be on weight's device ", weight.device(), ", got ",
              describe(grad_weight));
  if (grad_bias.has_value()) {
    check_floating(op, "grad_bias", *grad_bias);
    TORCH_CHECK(grad_bias->dim() == 1 && grad_bias->size(0) == weight.size(0), op,
                ": grad_bias must be 1-D of size out_features (", weight.size(0), "), got ",
                describe(*grad_bias));
    TORCH_CHECK(grad_bias->scalar_type() == weight.scalar_type(), op,
                ": grad_bias must have weight's dtype ", dtype_name(weight.scalar_type()), ", got ",
                describe(*grad_bias));
    TORCH_CHECK(grad_bias->is_contiguous(), op, ": grad_bias must be contiguous, got strides ",
                grad_bias->strides());
    TORCH_CHECK(grad_bias->device() == weight.device(), op,
                ": grad_bias must be on weight's device ", weight.device(), ", got ",
                describe(*grad_bias));
  }
}

void check_adam(const char* op, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                at::TensorList master_params, bool amsgrad,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  auto check_length = [&](const char* name, at::TensorList list) {
    TORCH_CHECK(list.size() == n, op, ": ", name, " must have one tensor per param (", n,
                "), got ", list.size());
  };
  check_length("grads", grads);
  check_length("exp_avgs", exp_avgs);
  check_length("exp_avg_sqs", exp_avg_sqs);
  check_length("state_steps", state_steps);
  if (amsgrad) {
    check_length("max_exp_avg_sqs", max_exp_avg_sqs);
  }
  TORCH_CHECK(master_params.empty() || master_params.size() == n, op,
              ": master_params must be empty or have one tensor per param (", n, "), got ",
              master_params.size());
  // Per tensor, only comparisons run: the messages (and their index "[i]") are formatted when a
  // check fails, so a step over 1000 tensors spends no time building strings.
  const bool master = !master_params.empty();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_floating_point(), op, ": params[", i,
                "] must be a floating-point tensor (float64, float32, bfloat16 or float16), got ",
                describe(p));
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i,
                "] must be a dense (strided) tensor, got ", p.layout(), " layout");
    TORCH_CHECK(p.device() == params[0].device(), op, ": all params must be on one device, got params[",
                i, "] on ", p.device(), " and params[0] on ", params[0].device());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous, got strides ",
                p.strides());
    // States are float32 for float32/bfloat16/float16 params and float64 for float64 params.
    const at::ScalarType state_type = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto check_state = [&](const char* name, const at::Tensor& t, at::ScalarType dtype) {
      TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] must have params[", i,
                  "]'s shape ", p.sizes(), ", got ", describe(t));
      TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] must be on params[", i,
                  "]'s device ", p.device(), ", got ", describe(t));
      TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous, got strides ",
                  t.strides());
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ", dtype_name(dtype),
                  " for a ", dtype_name(p.scalar_type()), " param, got ", describe(t));
    };
    check_state("grads", grads[i], p.scalar_type());
    check_state("exp_avgs", exp_avgs[i], state_type);
    check_state("exp_avg_sqs", exp_avg_sqs[i], state_type);
    if (amsgrad) check_state("max_exp_avg_sqs", max_exp_avg_sqs[i], state_type);
    if (master) {
      TORCH_CHECK(p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf, op,
                  ": master_params are kept only for bfloat16/float16 params, got params[", i,
                  "] of dtype ", dtype_name(p.scalar_type()));
      check_state("master_params", master_params[i], at::kFloat);
    }
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat, op, ": state_steps[", i,
                "] must be a float32 tensor with one element, got ", describe(step));
    TORCH_CHECK(step.device() == p.device(), op, ": state_steps[", i, "] must be on params[",
                i, "]'s device ", p.device(), ", got ", describe(step));
  }
  auto check_scalar = [&](const char* name, const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 tensor with one element, got ", describe(*t));
    TORCH_CHECK(n == 0 || t->device() == params[0].device(), op, ": ", name,
                " must be on the params' device ", params[0].device(), ", got ", describe(*t));
  };
  check_scalar("grad_scale", grad_scale);
  check_scalar("found_inf", found_inf);
}

void check_adam_lr(const char* op, at::TensorList params, const at::Tensor& lr) {
  TORCH_CHECK(lr.numel() == 1 && lr.is_floating_point(), op,
              ": lr must be a float or a floating-point tensor with one element, got ",
              describe(lr));
  TORCH_CHECK(params.empty() || lr.device() == params[0].device(), op,
              ": a tensor lr must be on the params' device ", params[0].device(), ", got ",
              describe(lr));
}

}  // namespace chainrule
