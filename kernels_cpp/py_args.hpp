// Argument checks shared by the MoE bindings (moe_layer.cpp, moe_bindings.cpp, moe_testing.cpp): a failed check
// raises std::invalid_argument, which Python sees as kt_kernels.KernelArgumentError (a ValueError).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace kt {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

inline std::string shape_str(const pybind11::array& a) {
  std::string s = "(";
  for (pybind11::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

inline bool is_f32(const pybind11::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 4; }

}  // namespace kt
