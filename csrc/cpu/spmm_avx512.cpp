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

}  // namespace sparseprune
