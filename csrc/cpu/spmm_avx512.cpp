// AVX-512 path (this file alone is compiled with -mavx512f/vl/bw/dq). 32 vector registers allow
// taller register tiles; blocks whose height fits 8 lanes better use the ymm kernels.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

namespace sparseprune {
namespace avx512 {
#include "vec_x86.h"
using VB = V16;
using VN = V8;
using VX = V16;
constexpr int MRB1 = 24, MRB2 = 12;  // 24x16 and 12x32 tiles: 24 accumulators of 32 zmm
constexpr int MRN1 = 24, MRN2 = 12;
constexpr int XT_MAX_ACC = 24;
#include "spmm_simd.h"
}  // namespace avx512

void f32_bsr_spmm__avx512(const BsrView& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                          float* y, int64_t ldy, int num_threads) {
  avx512::spmm(w, x, n, ldx, bias, y, ldy, num_threads);
}

namespace avx512 {
// Rows [0, nr) x columns [0, nc) of src (nr, nc <= 16) into dst transposed: dst row j (stride ldd) gets column j.
// Whole 64-byte pieces of 16 dst rows per call (the AVX2 path's 8x8 blocks wrote 32-byte halves, and with a dst
// stride of 4 KB its 32 dst rows of a tile shared two L1 sets: 1024x196 took 6x a copy of the same bytes).
static inline void transpose16(const float* src, int64_t lds, int nr, int nc, float* dst, int64_t ldd) {
  const __mmask16 cm = static_cast<__mmask16>(nc >= 16 ? 0xFFFFu : (1u << nc) - 1u);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, src + i * lds) : _mm512_setzero_ps();
  for (int k = 0; k < 8; ++k) {  // pairs of rows, interleaved within 128-bit lanes
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int m = 0; m < 4; ++m) {  // u[4m + c], lane L: column 4L + c, rows 4m .. 4m + 3
    const __m512d a = _mm512_castps_pd(t[4 * m]), b = _mm512_castps_pd(t[4 * m + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * m + 2]), d = _mm512_castps_pd(t[4 * m + 3]);
    r[4 * m] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * m + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * m + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * m + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  const __mmask16 rm = static_cast<__mmask16>(nr >= 16 ? 0xFFFFu : (1u << nr) - 1u);
  for (int c = 0; c < 4; ++c) {  // a 4x4 transpose of 128-bit lanes: column 4L + c gathers lane L of each m
    const __m512 x0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 x3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    const __m512 o[4] = {_mm512_shuffle_f32x4(x0, x2, 0x88), _mm512_shuffle_f32x4(x1, x3, 0x88),
                         _mm512_shuffle_f32x4(x0, x2, 0xdd), _mm512_shuffle_f32x4(x1, x3, 0xdd)};
    for (int L = 0; L < 4; ++L)
      if (4 * L + c < nc) _mm512_mask_storeu_ps(dst + (4 * L + c) * ldd, rm, o[L]);
  }
}
}  // namespace avx512

void f32_transpose__avx512(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                           float* dst, int64_t ldd, int64_t bsd, int num_threads) {
  // strips of 32 source columns (32 destination rows written front to back) in chunks of 64 source rows: in one
  // process against the AVX2 path's 32x32 tiles of 8x8 blocks (a 16 MB write between calls, 80 rounds; µs):
  // 1024x196 34 / 69, 512x784 40 / 67, 784x512 37 / 45, 3136x64 12 / 18, 3136x256 157 / 151, 256x3136 112 / 119
  // (16-column strips: 20 on 1024x196, 172 on 3136x256; 64: worse on most)
  constexpr int64_t RB = 64, SW = 32;
  const int64_t strips = (cols + SW - 1) / SW, chunks = (rows + RB - 1) / RB;
  const int nt = threads_for(batch * rows * cols, num_threads);
#pragma omp parallel for collapse(3) num_threads(fork_safe_threads(nt)) schedule(static)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < strips; ++j)
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t r1 = std::min(rows, (i + 1) * RB), c1 = std::min(cols, (j + 1) * SW);
        for (int64_t r0 = i * RB; r0 < r1; r0 += 16)
          for (int64_t c0 = j * SW; c0 < c1; c0 += 16)
            avx512::transpose16(src + b * bss + r0 * lds + c0, lds, static_cast<int>(std::min<int64_t>(16, r1 - r0)),
                                static_cast<int>(std::min<int64_t>(16, c1 - c0)), dst + b * bsd + c0 * ldd + r0, ldd);
      }
}

}  // namespace sparseprune
