// CUDA kernel entry points: raw device pointers and a stream; they never allocate.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace sparseprune {
namespace cuda {

struct BsrArgs {
  int64_t rows, cols;
  int r, c;
  const int32_t* row_ptr;
  const void* col_idx;
  bool idx16;
  const float* values;
  const float* x;
  int64_t n, ldx;
  const float* bias;
  float* y;
  int64_t ldy;
};

// Returns a cudaError_t value (0 on success).
int f32_bsr_spmm_naive(const BsrArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparseprune
