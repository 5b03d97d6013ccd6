// CUDA kernels. Placeholder until the CUDA issue lands: a scalar BSR SpMM (one thread per output)
// so that the module builds, links the static runtime and can be compile-checked without a GPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "sparseprune/cuda_kernels.h"

namespace sparseprune {
namespace cuda {

template <class Idx>
__global__ void bsr_spmm_naive(int64_t rows, int64_t cols, int r, int c, const int32_t* row_ptr,
                               const Idx* col_idx, const float* values, const float* x, int64_t n,
                               int64_t ldx, const float* bias, float* y, int64_t ldy) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t i = blockIdx.y;
  if (m >= rows || i >= n) return;
  const int64_t br = m / r, ii = m % r;
  float acc = bias ? bias[m] : 0.0f;
  for (int32_t b = row_ptr[br]; b < row_ptr[br + 1]; ++b) {
    const int64_t k0 = int64_t(col_idx[b]) * c;
    for (int j = 0; j < c && k0 + j < cols; ++j) acc += values[(int64_t)b * r * c + j * r + ii] * x[i * ldx + k0 + j];
  }
  y[i * ldy + m] = acc;
}

int f32_bsr_spmm_naive(const BsrArgs& a, cudaStream_t stream) {
  if (a.n == 0 || a.rows == 0) return 0;
  dim3 block(128), grid(static_cast<unsigned>((a.rows + 127) / 128), static_cast<unsigned>(a.n));
  if (a.idx16)
    bsr_spmm_naive<<<grid, block, 0, stream>>>(a.rows, a.cols, a.r, a.c, a.row_ptr,
        static_cast<const uint16_t*>(a.col_idx), a.values, a.x, a.n, a.ldx, a.bias, a.y, a.ldy);
  else
    bsr_spmm_naive<<<grid, block, 0, stream>>>(a.rows, a.cols, a.r, a.c, a.row_ptr,
        static_cast<const int32_t*>(a.col_idx), a.values, a.x, a.n, a.ldx, a.bias, a.y, a.ldy);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace sparseprune
