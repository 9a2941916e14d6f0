// Python hooks of the CPU kernels (bound into chainrule._C by module.cpp): the run-time ISA and
// GEMM-path switches that tests use to run every path on one machine, the path a call would take,
// chainrule.functional.linear's first step (a layer that runs as torch's own ops), the vector
// activations (held against float64 by tests/test_cpu_isa.py), and the raw GEMM and GEMV that
// tests and benchmarks run alone.
#include <cstring>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "backend.h"
#include "dispatch.h"

#include "chainrule/activation.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm_path.h"
#include "cpu/isa.h"

namespace chainrule::cpu {

namespace {

CpuIsa isa_from_name(const std::string& name) {
  CpuIsa isa;
  TORCH_CHECK(parse_isa(name, &isa), "chainrule: unknown CPU ISA '", name,
              "'; expected 'avx512', 'avx2' or 'fallback'");
  return isa;
}

at::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(name == "float64", "chainrule: unknown dtype '", name,
              "'; expected float32, bfloat16, float16 or float64");
  return at::kDouble;
}

// C = A · B for 2-D row-major float32 / bfloat16 tensors, on our GEMM with the active ISA.
at::Tensor gemm_for_python(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "chainrule._C._cpu_gemm: expected (m, k) and (k, n) matrices, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type(),
              "chainrule._C._cpu_gemm: expected two CPU tensors of one dtype");
  const CpuIsa isa = active_isa();
  gemm::ElementType type = a.scalar_type() == at::kBFloat16 ? gemm::ElementType::bfloat16
                                                            : gemm::ElementType::float32;
  TORCH_CHECK((a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
                  gemm::supports(isa, type),
              "chainrule._C._cpu_gemm: no kernel for ", a.scalar_type(), " with CPU ISA ",
              isa_name(isa));
  at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  if (c.numel() == 0) return c;
  if (a.size(1) == 0) return c.zero_();
  gemm::Problem p;
  p.type = type;
  p.m = a.size(0); p.n = b.size(1); p.k = a.size(1);
  p.a = a_c.const_data_ptr(); p.a_row_stride = p.k; p.a_col_stride = 1;
  p.b = b_c.const_data_ptr(); p.b_row_stride = p.n; p.b_col_stride = 1;
  p.c = c.mutable_data_ptr(); p.ldc = p.n;
  gemm::run(p, isa);
  return c;
}

// acc = X · Wᵀ in float32 for float32 / bfloat16 X (m x k, m <= 8) and W (n x k), on our GEMV
// with the active ISA: the kernel alone, for tests on any CPU (the rule decides where it runs).
at::Tensor gemv_for_python(const at::Tensor& x, const at::Tensor& w,
                           std::optional<bool> bf16_dot) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) > 0 &&
                  x.size(0) >= 1 && x.size(0) <= gemm::kGemvMaxRows && w.size(0) > 0,
              "chainrule._C._cpu_gemv: expected (m, k) and (n, k) matrices with 1 <= m <= ",
              gemm::kGemvMaxRows, " and k, n > 0, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "chainrule._C._cpu_gemv: expected two float32 or bfloat16 CPU tensors of one dtype");
  const CpuIsa isa = active_isa();
  TORCH_CHECK(gemm::gemv_supports(isa), "chainrule._C._cpu_gemv: no GEMV for CPU ISA ",
              isa_name(isa));
  const bool dot = bf16_dot.value_or(uses_bf16_dot_gemv(isa));
  TORCH_CHECK(!dot || gemm::gemv_bf16_dot_supports(isa),
              "chainrule._C._cpu_gemv: bf16_dot=True needs ISA avx512 on a CPU with AVX512_BF16, "
              "got ISA ", isa_name(isa), ", AVX512_BF16 ", cpu_has_avx512_bf16() ? "yes" : "no");
  at::Tensor x_c = x.contiguous(), w_c = w.contiguous();
  at::Tensor acc = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  gemm::gemv(x.scalar_type() == at::kFloat ? gemm::ElementType::float32
                                           : gemm::ElementType::bfloat16,
             isa, x_c.const_data_ptr(), x.size(0), x.size(1), w_c.const_data_ptr(), w.size(0),
             acc.mutable_data_ptr<float>(), dot);
  return acc;
}

CpuTraits::Vendor vendor_from_name(const std::string& name) {
  return name == "intel" ? CpuTraits::Vendor::intel
         : name == "amd" ? CpuTraits::Vendor::amd : CpuTraits::Vendor::other;
}

bool is_cpu_strided(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided;
}

// The activation as chainrule.functional.linear takes it (None, "relu", "gelu", "gelu_tanh",
// "silu"), or nullopt for anything else, the string "none" included (the Python side then raises
// the error that names it).
std::optional<Activation> activation_from_python(pybind11::handle activation) {
  if (activation.is_none()) return Activation::none;
  if (!PyUnicode_Check(activation.ptr())) return std::nullopt;
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(activation.ptr(), &size);
  if (text == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  Activation parsed = Activation::none;
  // A name with an embedded NUL ("gelu\0") would parse as its prefix: not a name Python takes.
  if (std::strlen(text) != static_cast<size_t>(size) || !parse_activation(text, &parsed) ||
      parsed == Activation::none) {
    return std::nullopt;
  }
  return parsed;
}

// What chainrule.functional.linear's first step does with a call: nothing (the Python side goes
// on to the op or the autograd.Function), run it as torch's own F.linear + activation
// (prefers_torch_ops), or compute it with the CPU kernel of chainrule.linear_forward called
// directly (calls_forward_kernel: a layer that needs no gradient).
enum class FirstStep { none, torch_ops, forward_kernel };

// Only for a valid CPU layer of plain tensors (not subclasses such as DTensor or FakeTensor).
FirstStep first_step(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b,
                     bool accumulate) {
  if (!is_cpu_strided(x) || !is_cpu_strided(w) || w.dim() != 2 || x.dim() == 0) {
    return FirstStep::none;
  }
  const at::ScalarType dtype = x.scalar_type();
  const int64_t in_features = w.size(1), out_features = w.size(0);
  if (x.size(-1) != in_features || w.scalar_type() != dtype) return FirstStep::none;
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf &&
      dtype != at::kDouble) {
    return FirstStep::none;
  }
  if (b && (!is_cpu_strided(*b) || b->dim() != 1 || b->size(0) != out_features ||
            b->scalar_type() != dtype)) {
    return FirstStep::none;
  }
  if (chainrule::host_backend() != chainrule::HostBackend::cpu) return FirstStep::none;
  const int64_t rows = in_features != 0 ? x.numel() / in_features : 0;
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || w.requires_grad() || (b && b->requires_grad()));
  if (prefers_torch_ops(dtype, rows, out_features, in_features, accumulate, needs_grad)) {
    return FirstStep::torch_ops;
  }
  // A TorchDispatchMode (FlopCounterMode, a recorder) must see the op.
  if (calls_forward_kernel(needs_grad) && !c10::impl::dispatch_mode_enabled()) {
    return FirstStep::forward_kernel;
  }
  return FirstStep::none;
}

// chainrule.functional.linear's first step on every call, as first_step says: the layer
// computed with the very ops F.linear and F.relu / F.gelu / F.silu call (at::linear and the
// activation, through the dispatcher, so autograd records them as it would from Python; not
// linear.cpp's torch_activation, whose fixed out= blocks autograd cannot differentiate), or with
// chainrule.linear_forward's CPU kernel behind the op's own checks, without the dispatcher; None
// otherwise, and the Python side goes on: under autocast or a TorchFunctionMode (which must see
// F.linear), with an activation name it does not know, and for inputs the op must check, whose
// errors name what is wrong. One call from Python, arguments read in place: the same questions
// asked in Python cost ~2 µs a call, more than a tiny layer's GEMM.
pybind11::object linear_first_step(pybind11::handle input, pybind11::handle weight,
                                   pybind11::handle bias, pybind11::handle activation,
                                   bool accumulate) {
  const pybind11::object none = pybind11::none();
  if (!THPVariable_CheckExact(input.ptr()) || !THPVariable_CheckExact(weight.ptr())) return none;
  if (!bias.is_none() && !THPVariable_CheckExact(bias.ptr())) return none;
  if (at::autocast::is_autocast_enabled(at::kCPU) || at::impl::torch_function_mode_enabled()) {
    return none;
  }
  const std::optional<Activation> act = activation_from_python(activation);
  if (!act) return none;
  const at::Tensor& x = THPVariable_Unpack(input.ptr());
  const at::Tensor& w = THPVariable_Unpack(weight.ptr());
  const at::Tensor* b = bias.is_none() ? nullptr : &THPVariable_Unpack(bias.ptr());
  const FirstStep step = first_step(x, w, b, accumulate);
  if (step == FirstStep::none) return none;
  const std::optional<at::Tensor> b_opt = b ? std::optional<at::Tensor>(*b) : std::nullopt;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    if (step == FirstStep::forward_kernel) {
      y = std::get<0>(checked_linear_forward<&cpu::linear_forward>(x, w, b_opt,
                                                                   activation_name(*act), false));
    } else {
      const at::Tensor z = at::linear(x, w, b_opt);
      switch (*act) {
        case Activation::none: y = z; break;
        case Activation::relu: y = at::relu(z); break;
        case Activation::gelu: y = at::gelu(z); break;
        case Activation::gelu_tanh: y = at::gelu(z, "tanh"); break;
        case Activation::silu: y = at::silu(z); break;
      }
    }
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(y)));
}

}  // namespace

void add_python_hooks(pybind11::module_& m) {
  m.def("_cpu_isa", [] { return std::string(isa_name(active_isa())); },
        "The SIMD path the CPU kernels use now: 'avx512', 'avx2' or 'fallback'");
  m.def("_cpu_isa_detected", [] { return std::string(isa_name(detected_isa())); },
        "The best SIMD path this CPU supports");
  m.def("_cpu_has_avx512_bf16", [] { return cpu_has_avx512_bf16(); });
  m.def("_set_cpu_isa",
        [](std::optional<std::string> name) {
          set_isa_override(name ? std::optional<CpuIsa>(isa_from_name(*name)) : std::nullopt);
        },
        pybind11::arg("name").none(true),
        "Forces the CPU SIMD path (None returns to CHAINRULE_CPU_ISA / detection)");
  m.def("_cpu_simd_activation",
        [](const at::Tensor& z, const std::string& activation, bool derivative,
           const std::string& isa) {
          Activation act;
          TORCH_CHECK(parse_activation(activation.c_str(), &act), "unknown activation ", activation);
          TORCH_CHECK(z.scalar_type() == at::kFloat && z.device().is_cpu(), "expected a float32 CPU tensor");
          at::Tensor in = z.contiguous();
          at::Tensor out = at::empty_like(in);
          gemm::activation_map(isa_from_name(isa), act, derivative, in.const_data_ptr<float>(),
                               out.mutable_data_ptr<float>(), in.numel());
          return out;
        },
        "act(z) or act'(z) with the vector activations of the given ISA's kernels");
  m.def("_set_cpu_gemm",
        [](std::optional<std::string> name) {
          std::optional<GemmPathMode> mode;
          if (name) {
            GemmPathMode parsed;
            TORCH_CHECK(parse_gemm_path_mode(*name, &parsed),
                        "chainrule: unknown CPU GEMM mode '", *name,
                        "'; expected 'auto', 'ours' or 'aten'");
            mode = parsed;
          }
          set_gemm_path_mode(mode);
        },
        pybind11::arg("name").none(true),
        "Forces the CPU GEMM path mode (None returns to CHAINRULE_CPU_GEMM, default auto)");
  m.def("_cpu_gemm_mode", [] { return std::string(gemm_path_mode_name(gemm_path_mode())); });
  m.def("_cpu_gemm_path",
        [](const std::string& dtype, bool backward, int64_t m, int64_t n, int64_t k) {
          const at::ScalarType type = dtype_from_name(dtype);
          const bool ours = our_gemm_type(type, active_isa()).has_value();
          const LinearPass pass = backward ? LinearPass::backward : LinearPass::forward;
          if (!backward && uses_gemv(type, m, n, k)) return std::string("gemv");
          return std::string(gemm_path_name(gemm_path(type, ours, pass, m, n, k)));
        },
        pybind11::arg("dtype"), pybind11::arg("backward"), pybind11::arg("m"),
        pybind11::arg("n"), pybind11::arg("k"),
        "'ours', 'aten' or 'gemv' (forward): the GEMM a CPU linear call with m rows, n = out_features and "
        "k = in_features takes now");
  m.def("_choose_cpu_gemm_path",
        [](const std::string& vendor, bool avx512_bf16, bool amx_bf16, bool ours_available,
           const std::string& dtype, bool backward, int64_t m, int64_t n, int64_t k) {
          CpuTraits cpu;
          cpu.vendor = vendor_from_name(vendor);
          cpu.avx512_bf16 = avx512_bf16;
          cpu.amx_bf16 = amx_bf16;
          const at::ScalarType type = dtype_from_name(dtype);
          const LinearPass pass = backward ? LinearPass::backward : LinearPass::forward;
          return pybind11::make_tuple(
              std::string(gemm_path_name(
                  choose_gemm_path(cpu, ours_available, type, pass, m, n, k))),
              aten_multiplies_low_precision(cpu, type));
        },
        "The path rule for a described CPU: ('ours' | 'aten', whether ATen's path multiplies "
        "bf16/fp16 as they are)");
  m.def("_cpu_gemv", &gemv_for_python, pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bf16_dot").none(true) = pybind11::none(),
        "X · Wᵀ (float32 sums) on our GEMV, active ISA; bf16_dot (None: the rule) picks the bf16 "
        "kernel off the AMX tiles, vdpbf16ps or the widened one");
  m.def("_cpu_gemv_kernel",
        [](const std::string& dtype, int64_t m, int64_t k) {
          const CpuIsa isa = active_isa();
          TORCH_CHECK(gemm::gemv_supports(isa),
                      "chainrule._C._cpu_gemv_kernel: no GEMV for CPU ISA ", isa_name(isa));
          const bool bf16 = dtype_from_name(dtype) == at::kBFloat16;
          if (bf16 && gemm::uses_amx_gemv(isa, m, k)) return std::string("amx");
          if (bf16 && uses_bf16_dot_gemv(isa)) return std::string("avx512_bf16");
          return std::string(isa_name(isa));
        },
        pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("k"),
        "The kernel our GEMV runs for m rows of this dtype and in_features with the active ISA: "
        "'amx' (bf16 on AMX tiles), 'avx512_bf16' (bf16 on vdpbf16ps), 'avx512' or 'avx2'");
  m.def("_choose_cpu_gemv",
        [](const std::string& vendor, const std::string& isa, const std::string& dtype,
           int64_t m, int64_t n, int64_t k, bool amx_bf16, bool avx512_bf16) {
          CpuTraits cpu;
          cpu.vendor = vendor_from_name(vendor);
          cpu.amx_bf16 = amx_bf16;
          cpu.avx512_bf16 = avx512_bf16;
          return choose_gemv(cpu, isa_from_name(isa), dtype_from_name(dtype), m, n, k);
        },
        pybind11::arg("vendor"), pybind11::arg("isa"), pybind11::arg("dtype"), pybind11::arg("m"),
        pybind11::arg("n"), pybind11::arg("k"), pybind11::arg("amx_bf16") = false,
        pybind11::arg("avx512_bf16") = false,
        "The GEMV rule for a described CPU and ISA: whether a forward of m rows takes it");
  m.def("_cpu_prefers_torch_ops",
        [](const std::string& dtype, int64_t m, int64_t n, int64_t k, bool accumulate,
           bool needs_grad) {
          return prefers_torch_ops(dtype_from_name(dtype), m, n, k, accumulate, needs_grad);
        },
        pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
        pybind11::arg("accumulate"), pybind11::arg("needs_grad") = true,
        "Whether chainrule.functional.linear runs this CPU layer as torch's own F.linear + "
        "activation (csrc/cpu/gemm_path.h)");
  m.def("_linear_first_step", &linear_first_step, pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias").none(true),
        pybind11::arg("activation").none(true), pybind11::arg("accumulate"),
        "chainrule.functional.linear's first step: the layer as torch's own ops where those are "
        "at least as fast on this CPU, on the forward kernel called directly where it needs no "
        "gradient, else None");
  m.def("_set_cpu_small_layers_to_torch", &set_small_layers_to_torch,
        "Whether tiny CPU layers run as torch's own ops in auto mode (default True)");
  m.def("_cpu_traits", [] {
    const CpuTraits& t = cpu_traits();
    pybind11::dict d;
    d["vendor"] = vendor_name(t.vendor);
    d["family"] = t.family;
    d["model"] = t.model;
    d["avx512_bf16"] = t.avx512_bf16;
    d["amx_bf16"] = t.amx_bf16;
    return d;
  }, "What the CPU GEMM path rule reads of this CPU");
  m.def("_cpu_gemm_blocking",
        [](const std::string& dtype, std::optional<int> threads) -> pybind11::object {
          const std::optional<gemm::ElementType> type =
              our_gemm_type(dtype_from_name(dtype), active_isa());
          const int n_threads =
              threads ? *threads : static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
          gemm::Blocking bl;
          if (!type || !gemm::blocking_for(active_isa(), *type, cpu_caches(), n_threads, &bl)) {
            return pybind11::none();
          }
          pybind11::dict d;
          d["mr"] = bl.mr;
          d["nr"] = bl.nr;
          d["kc"] = bl.kc;
          d["mc"] = bl.mc;
          d["nc"] = bl.nc;
          d["a_block_bytes"] = bl.a_block_bytes;
          return d;
        },
        pybind11::arg("dtype"), pybind11::arg("threads").none(true) = pybind11::none(),
        "The cache blocking of our GEMM's kernel for dtype with the active ISA, fitted to the "
        "caches (cpuid's or _set_cpu_caches') and the threads (default torch's); None where "
        "there is no kernel");
  m.def("_set_cpu_caches",
        [](std::optional<int64_t> l2, std::optional<int64_t> l3, std::optional<int> l3_shared_by,
           bool reset) {
          if (reset) {
            set_cpu_caches_override(std::nullopt);
            return;
          }
          CpuCaches caches = cpu_caches();
          if (l2) caches.l2 = *l2;
          if (l3) caches.l3 = *l3;
          if (l3_shared_by) caches.l3_shared_by = *l3_shared_by;
          TORCH_CHECK(caches.l2 >= 0 && caches.l3 >= 0 && caches.l3_shared_by >= 0,
                      "chainrule._C._set_cpu_caches: sizes must be >= 0 (0: not reported), got "
                      "l2=", caches.l2, ", l3=", caches.l3, ", l3_shared_by=", caches.l3_shared_by);
          set_cpu_caches_override(caches);
        },
        pybind11::arg("l2").none(true) = pybind11::none(),
        pybind11::arg("l3").none(true) = pybind11::none(),
        pybind11::arg("l3_shared_by").none(true) = pybind11::none(),
        pybind11::arg("reset") = false,
        "Describes other caches (bytes) to our GEMM's blocking, the rest as they are now; "
        "reset=True returns to cpuid's");
  m.def("_cpu_gemm", &gemm_for_python,
        "C = A @ B (2-D float32/bfloat16, row-major) on chainrule's CPU GEMM with the active ISA");
}

}  // namespace chainrule::cpu
