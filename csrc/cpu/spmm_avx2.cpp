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

}  // namespace sparseprune
