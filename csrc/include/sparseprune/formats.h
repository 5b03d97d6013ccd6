// Torch-free views of the packed sparse formats. Python owns the memory; kernels only read it.
#pragma once
#include <cstdint>

#include "sparseprune/epilogue.h"

namespace sparseprune {

// Block-sparse row (BSR) matrix W of logical shape rows x cols, blocks of r x c.
// CSR is the r = c = 1 case. Block b lives at values + b * r * c and is stored column-major
// (values[b*r*c + j*r + i] = W[m0 + i, k0 + j]): one column of a block is r contiguous output
// features, which the broadcast kernels load as vectors. Edge blocks are zero-padded; kernels
// never read X past `cols` nor write Y past `rows`.
struct BsrView {
  int64_t rows = 0;            // M (output features)
  int64_t cols = 0;            // K (input features)
  int32_t r = 1, c = 1;        // block shape
  int64_t block_rows = 0;      // ceil(M / r)
  const int32_t* row_ptr = nullptr;  // block_rows + 1 entries, monotone, row_ptr[0] == 0
  const void* col_idx = nullptr;     // nnzb block-column indices (uint16 when idx16, else int32)
  bool idx16 = false;
  const float* values = nullptr;     // nnzb * r * c
  int32_t act = kActNone;            // activation fused into the store, after the bias (epilogue.h)
  int32_t split = 0;                 // threads split 0: by heuristic, 1: rows of X, 2: block rows
  int32_t pack = 0;                  // X panels 0: by heuristic, 1: always, 2: never (broadcast family)
  // conv and the float32 spmm: a residual added in the store, before the activation. It has the output's
  // strides and lies res_bytes from it (the same element of the addend for every output element, whatever
  // the tiling).
  bool has_res = false;
  int64_t res_bytes = 0;

  int64_t nnzb() const { return row_ptr ? row_ptr[block_rows] : 0; }
  int64_t block_col(int64_t b) const {
    return idx16 ? static_cast<const uint16_t*>(col_idx)[b] : static_cast<const int32_t*>(col_idx)[b];
  }
};

// The residual element that goes with output element y: res_bytes on from it (BsrView / QBsrView::res_bytes).
inline const float* residual_at(const float* y, int64_t res_bytes) {
  return reinterpret_cast<const float*>(reinterpret_cast<const char*>(y) + res_bytes);
}

}  // namespace sparseprune
