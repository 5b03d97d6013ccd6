// AVX-512 path of the sparse Conv2d (this file alone is compiled with -mavx512f/vl/bw/dq).
// 32 zmm registers: an 8-channel x 48-pixel tile (24 accumulators) for blocks of >= 8 rows,
// up to 128 pixels x 1 channel for CSR.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/conv.h"
#include "sparseprune/parallel.h"

namespace sparseprune {
namespace conv_avx512 {
#include "vec_x86.h"
using V = V16;
constexpr int RMAX = 8;
constexpr int nbv_max(int R) { return R >= 8 ? 3 : R >= 4 ? 6 : R >= 2 ? 8 : 8; }
#include "conv_simd.h"
}  // namespace conv_avx512

void f32_conv2d_q__avx512(const ConvGeom& g, const BsrView& w, const float* x, const float* bias, float* y,
                          float* ws, int num_threads) {
  conv_avx512::conv_entry(g, w, x, bias, y, ws, num_threads);
}

}  // namespace sparseprune
