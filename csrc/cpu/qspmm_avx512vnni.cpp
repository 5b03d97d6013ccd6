// Quantized BSR path: AVX512-VNNI: int8 with vpdpbusd on zmm (16 outputs x 4 k per instruction).
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
namespace q_avx512vnni {
#include "qspmm_pack.h"
#include "qspmm_simd.h"
#include "qspmm_planes.h"
}  // namespace q_avx512vnni

#define QARGS const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y, \
              int64_t ldy, int num_threads
#define QCALL w, x, xt, n, ldx, bias, y, ldy, num_threads
void s8_bsr_spmm__avx512vnni(QARGS) { q_avx512vnni::q_spmm<q_avx512vnni::S8Vnni16>(QCALL); }
void s8_bsr_planes__avx512vnni(const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y,
                               int num_threads) {
  q_avx512vnni::q_planes<q_avx512vnni::S8Vnni16>(w, g, x, n_img, bias, y, num_threads);
}

}  // namespace sparseprune
