// pybind11 membrane for the CPU kernels: converts arguments, checks the cheap invariants,
// releases the GIL, calls the kernel. Tensors arrive as raw addresses (ops.py validates them
// and keeps them alive for the duration of the call).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "sparseprune/kernels.h"

namespace py = pybind11;
using namespace sparseprune;

namespace {

template <class T>
T* ptr(uintptr_t a) { return reinterpret_cast<T*>(a); }

BsrView make_view(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx,
                  bool idx16, uintptr_t values) {
  if (rows < 0 || cols < 0 || r < 1 || c < 1) throw std::invalid_argument("bad sparse matrix shape");
  if (!row_ptr) throw std::invalid_argument("row_ptr is null");
  BsrView w;
  w.rows = rows;
  w.cols = cols;
  w.r = r;
  w.c = c;
  w.block_rows = (rows + r - 1) / r;
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = ptr<const void>(col_idx);
  w.idx16 = idx16;
  w.values = ptr<const float>(values);
  return w;
}

void spmm(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
          uintptr_t values, uintptr_t x, int64_t n, int64_t ldx, uintptr_t bias, uintptr_t y,
          int64_t ldy, int num_threads) {
  BsrView w = make_view(rows, cols, r, c, row_ptr, col_idx, idx16, values);
  if (n < 0 || ldx < cols || ldy < rows) throw std::invalid_argument("bad dense operand shape");
  if (n == 0) return;
  if (!x || !y) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().spmm(w, ptr<const float>(x), n, ldx, ptr<const float>(bias), ptr<float>(y), ldy, num_threads);
}

void spmm_t(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
            uintptr_t values, uintptr_t dy, int64_t n, int64_t lddy, uintptr_t dx, int64_t lddx,
            int num_threads) {
  BsrView w = make_view(rows, cols, r, c, row_ptr, col_idx, idx16, values);
  if (n < 0 || lddy < rows || lddx < cols) throw std::invalid_argument("bad dense operand shape");
  if (n == 0) return;
  if (!dy || !dx) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().spmm_t(w, ptr<const float>(dy), n, lddy, ptr<float>(dx), lddx, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseprune CPU kernels (torch-free)";
#ifdef SPARSEPRUNE_VERSION
  m.attr("__version__") = SPARSEPRUNE_VERSION;
#endif
  m.def("spmm", &spmm, "Y = X W^T + b with W block-sparse (CSR is the 1x1 block case)");
  m.def("spmm_t", &spmm_t, "dX = dY W with W block-sparse");
  m.def("paths", [] {
    py::list out;
    for (const auto& p : all_paths()) {
      py::dict d;
      d["isa"] = p.isa;
      d["kernels"] = p.spmm_name;
      d["supported"] = p.supported();
      out.append(d);
    }
    return out;
  });
  m.def("active_isa", [] { return std::string(active_path().isa); });
  m.def("set_isa", [](const std::string& isa) {
    if (!set_isa(isa)) throw std::invalid_argument("ISA path '" + isa + "' is unknown or not supported by this CPU");
  });
  m.def("cpu_features", &cpu_features);
  m.def("omp_max_threads", [] { return omp_get_max_threads(); });
}
