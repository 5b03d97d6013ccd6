// AVX2 + FMA path (this file alone is compiled with -mavx2 -mfma).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

namespace sparseprune {
namespace avx2 {
#include "vec_x86.h"
using VB = V8;
using VN = V8;
using VX = V8;
constexpr int MRB1 = 12, MRB2 = 6;  // 12x8 and 6x16 register tiles: 12 accumulators of 16 ymm
constexpr int MRN1 = MRB1, MRN2 = MRB2;
constexpr int XT_MAX_ACC = 12;
#include "spmm_simd.h"
}  // namespace avx2

void f32_bsr_spmm__avx2(const BsrView& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                        float* y, int64_t ldy, int num_threads) {
  avx2::spmm(w, x, n, ldx, bias, y, ldy, num_threads);
}

// 32x32 tiles of 8x8 register transposes (one tile: 4 KiB in, 4 KiB out, both in L1), edges scalar.
void f32_transpose__avx2(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                         float* dst, int64_t ldd, int64_t bsd, int num_threads) {
  constexpr int64_t T = 32;
  const int64_t tr = (rows + T - 1) / T, tc = (cols + T - 1) / T;
  const int nt = threads_for(batch * rows * cols, num_threads);
#pragma omp parallel for collapse(3) num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < tr; ++i)
      for (int64_t j = 0; j < tc; ++j) {
        const float* s = src + b * bss;
        float* d = dst + b * bsd;
        const int64_t r0 = i * T, r1 = std::min(rows, r0 + T), c0 = j * T, c1 = std::min(cols, c0 + T);
        const int64_t r8 = r0 + (r1 - r0) / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
        for (int64_t r = r0; r < r8; r += 8)
          for (int64_t c = c0; c < c8; c += 8) avx2::transpose8x8(s + r * lds + c, lds, d + c * ldd + r, ldd);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = (r < r8 ? c8 : c0); c < c1; ++c) d[c * ldd + r] = s[r * lds + c];
      }
}

}  // namespace sparseprune
