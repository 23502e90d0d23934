#include <pybind11/pybind11.h>

namespace kt {
void bind_moe(pybind11::module_& m) { (void)m; }
}  // namespace kt
