// AVX2 + FMA path of the sparse Conv2d (this file alone is compiled with -mavx2 -mfma).
// 16 ymm registers: a 4-channel x 24-pixel tile (12 accumulators) for blocks of >= 4 rows,
// up to 48 pixels x 1 channel for CSR.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/conv.h"
#include "sparseprune/parallel.h"

namespace sparseprune {
namespace conv_avx2 {
#include "vec_x86.h"
using V = V8;
constexpr int RMAX = 4;
constexpr int nbv_max(int R) { return R >= 4 ? 3 : R >= 2 ? 4 : 6; }
#include "conv_simd.h"
}  // namespace conv_avx2

void f32_conv2d_q__avx2(const ConvGeom& g, const BsrView& w, const float* x, const float* bias, float* y,
                        float* ws, int num_threads) {
  conv_avx2::conv_entry(g, w, x, bias, y, ws, num_threads);
}

}  // namespace sparseprune
