// Quantized BSR path: AVX512-BF16: bf16 with vdpbf16ps on zmm (16 outputs x 2 k per instruction).
// This file alone carries its -m flags (CMakeLists.txt); dispatch.cpp calls it only where CPUID allows.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"
#include "sparseprune/qkernels.h"

namespace sparseprune {
namespace q_avx512bf16 {
#include "qspmm_pack.h"
#include "qspmm_simd.h"
#include "qspmm_planes.h"
}  // namespace q_avx512bf16

#define QARGS const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y, \
              int64_t ldy, int num_threads
#define QCALL w, x, xt, n, ldx, bias, y, ldy, num_threads
void bf16_bsr_spmm__avx512bf16(QARGS) { q_avx512bf16::q_spmm<q_avx512bf16::BF16Dp16>(QCALL); }
void bf16_bsr_planes__avx512bf16(const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y,
                                 int num_threads) {
  q_avx512bf16::q_planes<q_avx512bf16::BF16Dp16>(w, g, x, n_img, bias, y, num_threads);
}

}  // namespace sparseprune
