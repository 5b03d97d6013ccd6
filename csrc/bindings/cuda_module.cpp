// pybind11 membrane for the CUDA kernels: raw device addresses and the caller's stream.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "sparseprune/cuda_kernels.h"

namespace py = pybind11;
using namespace sparseprune::cuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "sparseprune CUDA kernels (torch-free)";
  m.def("spmm", [](int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx,
                   bool idx16, uintptr_t values, uintptr_t x, int64_t n, int64_t ldx, uintptr_t bias,
                   uintptr_t y, int64_t ldy, uintptr_t stream) {
    BsrArgs a{rows, cols, r, c, reinterpret_cast<const int32_t*>(row_ptr),
              reinterpret_cast<const void*>(col_idx), idx16, reinterpret_cast<const float*>(values),
              reinterpret_cast<const float*>(x), n, ldx, reinterpret_cast<const float*>(bias),
              reinterpret_cast<float*>(y), ldy};
    int err;
    {
      py::gil_scoped_release nogil;
      err = f32_bsr_spmm_naive(a, reinterpret_cast<cudaStream_t>(stream));
    }
    if (err) throw std::runtime_error("sparseprune CUDA spmm launch failed (cudaError " + std::to_string(err) + ")");
  });
}
