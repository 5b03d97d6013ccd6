// Quantized BSR path: AVX-VNNI: int8 with the VEX vpdpbusd on ymm (Alder Lake / Sapphire Rapids without AVX-512 use).
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
namespace q_avxvnni {
#include "qspmm_pack.h"
#include "qspmm_simd.h"
#include "qspmm_planes.h"
}  // namespace q_avxvnni

#define QARGS const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y, \
              int64_t ldy, int num_threads
#define QCALL w, x, xt, n, ldx, bias, y, ldy, num_threads
void s8_bsr_spmm__avxvnni(QARGS) { q_avxvnni::q_spmm<q_avxvnni::S8Vnni8>(QCALL); }
#define PARGS const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y, int num_threads
#define PCALL w, g, x, n_img, bias, y, num_threads
void s8_bsr_planes__avxvnni(PARGS) { q_avxvnni::q_planes8<q_avxvnni::S8Vnni8>(PCALL); }

}  // namespace sparseprune
