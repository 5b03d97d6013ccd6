// Scalar reference kernels: the obviously-correct twins every fast path is tested against,
// and the fallback on CPUs without a vector path.
#include <algorithm>
#include <cstring>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

namespace sparseprune {

void f32_bsr_spmm__scalar(const BsrView& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                          float* y, int64_t ldy, int num_threads) {
  const int r = w.r, c = w.c;
  const int nt = threads_for(n * (w.nnzb() * r * c + w.rows), num_threads);
#pragma omp parallel for num_threads(fork_safe_threads(nt)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * ldx;
    float* yi = y + i * ldy;
    for (int64_t br = 0; br < w.block_rows; ++br) {
      const int64_t m0 = br * r;
      const int rr = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
      for (int ii = 0; ii < rr; ++ii) yi[m0 + ii] = bias ? bias[m0 + ii] : 0.0f;
      for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
        const int64_t k0 = w.block_col(b) * c;
        const int cc = static_cast<int>(std::min<int64_t>(c, w.cols - k0));
        const float* vb = w.values + b * r * c;
        for (int j = 0; j < cc; ++j)
          for (int ii = 0; ii < rr; ++ii) yi[m0 + ii] += vb[j * r + ii] * xi[k0 + j];
      }
      if (w.has_res)
        for (int ii = 0; ii < rr; ++ii) yi[m0 + ii] += *residual_at(yi + m0 + ii, w.res_bytes);
      if (w.act)
        for (int ii = 0; ii < rr; ++ii) yi[m0 + ii] = act_scalar(yi[m0 + ii], w.act);
    }
  }
}

// The input gradient is a scatter along K; rows of dY are independent, so threads split N.
// All ISA paths share this one (training is not the speed target).
void f32_bsr_spmm_t__scalar(const BsrView& w, const float* dy, int64_t n, int64_t lddy, float* dx,
                            int64_t lddx, int num_threads) {
  const int r = w.r, c = w.c;
  const int nt = threads_for(n * (w.nnzb() * r * c + w.cols), num_threads);
#pragma omp parallel for num_threads(fork_safe_threads(nt)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* dyi = dy + i * lddy;
    float* dxi = dx + i * lddx;
    std::fill(dxi, dxi + w.cols, 0.0f);
    for (int64_t br = 0; br < w.block_rows; ++br) {
      const int64_t m0 = br * r;
      const int rr = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
      for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
        const int64_t k0 = w.block_col(b) * c;
        const int cc = static_cast<int>(std::min<int64_t>(c, w.cols - k0));
        const float* vb = w.values + b * r * c;
        for (int j = 0; j < cc; ++j) {
          float acc = 0.0f;
          for (int ii = 0; ii < rr; ++ii) acc += vb[j * r + ii] * dyi[m0 + ii];
          dxi[k0 + j] += acc;
        }
      }
    }
  }
}

void f32_transpose__scalar(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                           float* dst, int64_t ldd, int64_t bsd, int num_threads) {
  const int nt = threads_for(batch * rows * cols, num_threads);
#pragma omp parallel for collapse(2) num_threads(fork_safe_threads(nt)) schedule(static)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) dst[b * bsd + c * ldd + r] = src[b * bss + r * lds + c];
}

}  // namespace sparseprune
