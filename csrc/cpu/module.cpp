// The fastmodels._C extension: C++ CPU kernels bound with pybind11.
//
// Kernels take raw pointers (tensor.data_ptr()) and sizes, so the extension builds without torch.
// Each op's translation unit provides a `register_<op>(pybind11::module_&)` function declared in
// csrc/include/fastmodels_cpu.h; this file calls them all.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_simd.h"
#include "fastmodels_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastmodels C++ CPU kernels";
    m.def("openmp_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    }, "Threads OpenMP would use (1 if built without OpenMP).");
    m.def("simd_target", &fastmodels::simd_target,
          "The code the per-ISA (x86-64-v4 / v3 / baseline) hot loops run on this CPU.");
    fastmodels::register_all(m);
}
