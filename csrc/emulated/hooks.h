// Test hooks of the emulated_cuda backend (chainrule._C._emu_*, _adam_plan_*, _linear_plan_*):
// they run the planners shared with the CUDA launchers (csrc/cuda/adam_plan.h, linear_plan.h) on
// machines without a GPU.
#pragma once

#include <pybind11/pybind11.h>

namespace chainrule::emulated {

// While set, the emulated Adam launcher plans as if its stream were capturing a CUDA graph.
void set_simulated_capture(bool capturing);

void add_python_hooks(pybind11::module_& m);

}  // namespace chainrule::emulated
