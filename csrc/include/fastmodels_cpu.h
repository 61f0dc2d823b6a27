// Registration hooks of the C++ CPU kernels (one per op translation unit in csrc/cpu/).
#pragma once
#include <pybind11/pybind11.h>

namespace fastmodels {

// Add a `void register_<op>(pybind11::module_& m);` declaration here and a call to it in
// register_all below when an op brings a C++ CPU kernel.
void register_attachment(pybind11::module_& m);
void register_efield(pybind11::module_& m);
void register_pushdown(pybind11::module_& m);

inline void register_all(pybind11::module_& m) {
    register_attachment(m);
    register_efield(m);
    register_pushdown(m);
}

}  // namespace fastmodels
