// Quantized BSR path: AVX-512F/BW without VNNI/BF16: int8 through vpmaddwd, bf16 widened to fp32 (zmm).
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
namespace q_avx512 {
#include "qspmm_pack.h"
#include "qspmm_simd.h"
#include "qspmm_planes.h"
}  // namespace q_avx512

#define QARGS const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y, \
              int64_t ldy, int num_threads
#define QCALL w, x, xt, n, ldx, bias, y, ldy, num_threads
void s8_bsr_spmm__avx512(QARGS) { q_avx512::q_spmm<q_avx512::S8Madd16>(QCALL); }
void bf16_bsr_spmm__avx512(QARGS) { q_avx512::q_spmm<q_avx512::BF16Widen16>(QCALL); }
#define PARGS const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y, int num_threads
#define PCALL w, g, x, n_img, bias, y, num_threads
void s8_bsr_planes__avx512(PARGS) { q_avx512::q_planes8<q_avx512::S8Madd16>(PCALL); }
void bf16_bsr_planes__avx512(PARGS) { q_avx512::q_planes8<q_avx512::BF16Widen16>(PCALL); }

}  // namespace sparseprune
