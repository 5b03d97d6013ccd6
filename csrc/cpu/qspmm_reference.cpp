// Scalar reference for the quantized BSR kernels: the obviously-correct twins (same packed layout,
// same quantization of X, same epilogue) and the fallback on CPUs without a vector path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"
#include "sparseprune/qkernels.h"

namespace sparseprune {
namespace q_scalar {
#include "qspmm_pack.h"

int64_t block_col(const QBsrView& w, int64_t b) {
  return w.idx16 ? static_cast<const uint16_t*>(w.col_idx)[b] : static_cast<const int32_t*>(w.col_idx)[b];
}

}  // namespace q_scalar

void s8_bsr_spmm__scalar(const QBsrView& w, const void* xv, XType, int64_t n, int64_t ldx, const float* bias,
                         float* y, int64_t ldy, int num_threads) {
  const int r = w.r, gpb = w.c / 4;
  const int64_t kg = w.block_cols * gpb;
  const int nt = threads_for(n * (w.nnzb() * r * w.c + w.rows), num_threads);
  const float* x = static_cast<const float*>(xv);
#pragma omp parallel num_threads(fork_safe_threads(nt))
  {
    std::vector<uint32_t> words(static_cast<size_t>(kg));
    std::vector<int32_t> acc(static_cast<size_t>(r));
    std::vector<float> gbuf(w.im2col ? static_cast<size_t>(w.cols) : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = w.im2col ? im2col_row(*w.im2col, x, i, gbuf.data()) : x + i * ldx;
      const q_scalar::QRowParams p = q_scalar::q_row_words(xi, w.cols, kg, words.data());
      for (int64_t br = 0; br < w.block_rows; ++br) {
        const int64_t m0 = br * r;
        const int rr = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
          const int64_t g0 = q_scalar::block_col(w, b) * gpb;
          for (int g = 0; g < gpb; ++g) {
            const uint32_t xw = words[g0 + g];
            for (int ii = 0; ii < rr; ++ii) {
              const uint32_t ww = w.values[(b * gpb + g) * r + ii];
              int32_t s = 0;
              for (int j = 0; j < 4; ++j)
                s += static_cast<int32_t>((xw >> (8 * j)) & 0xFF) * static_cast<int32_t>(static_cast<int8_t>(ww >> (8 * j)));
              acc[ii] += s;
            }
          }
        }
        for (int ii = 0; ii < rr; ++ii) {
          const int64_t m = m0 + ii;
          float v = static_cast<float>(acc[ii] - p.zp * w.comp[m]) * (p.s * w.wscale[m]);
          if (bias) v = v + bias[m];
          if (w.has_res) v = v + *residual_at(y + i * ldy + m, w.res_bytes);
          y[i * ldy + m] = act_scalar(v, w.act);
        }
      }
    }
  }
}

void bf16_bsr_spmm__scalar(const QBsrView& w, const void* xv, XType xt, int64_t n, int64_t ldx, const float* bias,
                           float* y, int64_t ldy, int num_threads) {
  const int r = w.r, gpb = w.c / 2;
  const int64_t kg = w.block_cols * gpb;
  const int nt = threads_for(n * (w.nnzb() * r * w.c + w.rows), num_threads);
  auto f32 = [](uint32_t bits16) {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
#pragma omp parallel num_threads(fork_safe_threads(nt))
  {
    std::vector<uint32_t> words(static_cast<size_t>(kg));
    std::vector<float> acc(static_cast<size_t>(r));
    std::vector<float> gbuf(w.im2col ? static_cast<size_t>(w.cols) : 0);
    std::vector<uint16_t> gbuf16(w.im2col ? static_cast<size_t>(w.cols) : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* xf = nullptr;
      const uint16_t* xb = nullptr;
      if (xt == XType::bf16) {
        xb = static_cast<const uint16_t*>(xv);
        xb = w.im2col ? im2col_row(*w.im2col, xb, i, gbuf16.data()) : xb + i * ldx;
      } else {
        xf = static_cast<const float*>(xv);
        xf = w.im2col ? im2col_row(*w.im2col, xf, i, gbuf.data()) : xf + i * ldx;
      }
      q_scalar::bf16_row_words(xf, xb, w.cols, kg, words.data());
      for (int64_t br = 0; br < w.block_rows; ++br) {
        const int64_t m0 = br * r;
        const int rr = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
          const int64_t g0 = q_scalar::block_col(w, b) * gpb;
          for (int g = 0; g < gpb; ++g) {
            const uint32_t xw = words[g0 + g];
            for (int ii = 0; ii < rr; ++ii) {
              const uint32_t ww = w.values[(b * gpb + g) * r + ii];
              // odd k first: the order vdpbf16ps adds its two (exact) products in
              acc[ii] = acc[ii] + f32(xw >> 16) * f32(ww >> 16);
              acc[ii] = acc[ii] + f32(xw & 0xFFFF) * f32(ww & 0xFFFF);
            }
          }
        }
        for (int ii = 0; ii < rr; ++ii) {
          float v = bias ? acc[ii] + bias[m0 + ii] : acc[ii];
          if (w.has_res) v = v + *residual_at(y + i * ldy + m0 + ii, w.res_bytes);
          y[i * ldy + m0 + ii] = act_scalar(v, w.act);
        }
      }
    }
  }
}

}  // namespace sparseprune
