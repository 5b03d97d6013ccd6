// Quantized BSR path: AVX2 + FMA: int8 through vpmaddubsw + vpmaddwd, bf16 widened to fp32 (ymm).
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
namespace q_avx2 {
#include "qspmm_pack.h"
#include "qspmm_simd.h"
#include "qspmm_planes.h"
}  // namespace q_avx2

#define QARGS const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y, \
              int64_t ldy, int num_threads
#define QCALL w, x, xt, n, ldx, bias, y, ldy, num_threads
void s8_bsr_spmm__avx2(QARGS) { q_avx2::q_spmm<q_avx2::S8Maddubs8>(QCALL); }
void bf16_bsr_spmm__avx2(QARGS) { q_avx2::q_spmm<q_avx2::BF16Widen8>(QCALL); }
#define PARGS const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y, int num_threads
#define PCALL w, g, x, n_img, bias, y, num_threads
void s8_bsr_planes__avx2(PARGS) { q_avx2::q_planes8<q_avx2::S8Maddubs8>(PCALL); }
void bf16_bsr_planes__avx2(PARGS) { q_avx2::q_planes8<q_avx2::BF16Widen8>(PCALL); }

}  // namespace sparseprune
