// Quantized block-sparse kernels (issue #14): int8 (u8 activations x s8 weights, int32 accumulation)
// and bf16 (fp32 accumulation). Torch-free: Python allocates and packs, C++ reads and fills.
//
// Packed layout (written by python/sparseprune/quant.py). A block of r x c weights is stored as
// c / G groups of G consecutive k, each group r 32-bit words (one per output feature):
//   int8: G = 4, word = W[m, k..k+3] as 4 x s8   (one vpdpbusd lane: 4 products, one output)
//   bf16: G = 2, word = W[m, k..k+1] as 2 x bf16 (one vdpbf16ps lane)
// values[((b * (c / G) + g) * r + i) * 4 bytes] = W[m0 + i, k0 + g * G .. + G). Edge blocks are
// zero-padded. X is quantized (int8) or rounded (bf16) once per call and packed into panels of
// the same 32-bit words, k-group-major, so a register tile broadcasts one word per row of X.
//
// int8 numerics (those of torch's dynamic quantization, per row of X):
//   lo = min(0, min_k x), hi = max(0, max_k x), s = (hi - lo) / 127 (hi / 127 - lo / 127 where hi - lo overflows;
//   1 when hi == lo),
//   zp = clamp(nearbyint(-lo / s), 0, 127), q = clamp(nearbyint(x * (1 / s)) + zp, 0, 127)
//   y[n, m] = float(sum_k q * w - zp * comp[m]) * (s * wscale[m]) + bias[m],  comp[m] = sum_k w[m, k]
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "sparseprune/epilogue.h"
#include <vector>

namespace sparseprune {

// The rows of X gathered from an image instead of read from a matrix: the im2col matrix of a
// convolution, never materialised. x is a contiguous NHWC image of n_img x h x w x ch floats, zero
// padding implied (pt rows on top, pl columns on the left, as many as ho / wo need on the other
// sides); row i is output pixel (img, oh, ow) = (i / (ho * wo), i / wo % ho, i % wo) and its
// cols = kh * kw * ch columns, in (kh, kw, ch) order, are pixel (oh * sh - pt + a * dh, ow * sw - pl + b * dw).
struct QIm2col {
  int64_t h = 0, w = 0, ch = 0;                 // the image, unpadded
  int32_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1, pt = 0, pl = 0;
  int64_t ho = 0, wo = 0;                       // output size
};

// Row i of an implicit im2col matrix, copied into buf (cols elements; padding taps are zeros). T: float, or
// uint16_t for bf16 images.
template <class T>
inline const T* im2col_row(const QIm2col& g, const T* x, int64_t i, T* buf) {
  const int64_t img = i / (g.ho * g.wo), oh = i / g.wo % g.ho, ow = i % g.wo;
  const size_t bytes = static_cast<size_t>(g.ch) * sizeof(T);
  const T* im = x + img * g.h * g.w * g.ch;
  T* d = buf;
  for (int a = 0; a < g.kh; ++a) {
    const int64_t ih = oh * g.sh - g.pt + static_cast<int64_t>(a) * g.dh;
    for (int b = 0; b < g.kw; ++b, d += g.ch) {
      const int64_t iw = ow * g.sw - g.pl + static_cast<int64_t>(b) * g.dw;
      if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) std::memset(d, 0, bytes);
      else std::memcpy(d, im + (ih * g.w + iw) * g.ch, bytes);
    }
  }
  return buf;
}

struct QBsrView {
  int64_t rows = 0, cols = 0;       // M, K
  int32_t r = 1, c = 4;             // block shape; c % G == 0
  int64_t block_rows = 0;           // ceil(M / r)
  int64_t block_cols = 0;           // ceil(K / c)
  const int32_t* row_ptr = nullptr;
  const void* col_idx = nullptr;    // uint16 when idx16, else int32
  bool idx16 = false;
  const uint32_t* values = nullptr; // packed words, see above
  const float* wscale = nullptr;    // int8: M per-output-channel scales
  const int32_t* comp = nullptr;    // int8: M sums of the quantized weights of each output
  int32_t act = kActNone;           // activation fused into the store, after the bias (epilogue.h)
  const QIm2col* im2col = nullptr;  // set: X is the NHWC image of an implicit im2col (ldx unused)
  // a residual added in the store, after the bias and before the activation: it has Y's strides and lies
  // res_bytes from it (as BsrView's)
  bool has_res = false;
  int64_t res_bytes = 0;

  int64_t nnzb() const { return row_ptr ? row_ptr[block_rows] : 0; }
};

enum class XType : int { f32 = 0, bf16 = 1 };

// Y[n, m] (fp32, ldy) = X W^T + b for X n x K (fp32, or bf16 for the bf16 kernels), leading dim ldx.
using QSpmmFn = void (*)(const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx,
                         const float* bias, float* y, int64_t ldy, int num_threads);

// A convolution on NCHW images whose output is h x w pixels, its input sh * h x sw * w (stride sh, sw; 1x1;
// 3x3 with padding 1; 3x3 / 2 with padding 1 on an even size; ...): kh x kw taps (dilation dh, dw), pt rows /
// pl columns of zero padding on top / left. The input is given as its sh * sw phases, (py, px) the pixels
// (sh * y + py, sw * x + px), each ch planes of h x w: image [phase py * sw + px][channel][h * w] (one phase,
// the image itself, at stride 1). Input row sh * oh + a * dh - pt of tap a is phase row oh + dy of phase
// py, with a * dh - pt = sh * dy + py (0 <= py < sh), columns likewise: tap (a, b) of output pixel q reads
// pixel q + dy * w + dx of its phase where that lies in it, zero elsewhere (the padding). Columns of the
// product are (kh, kw, ch) ordered, as the NHWC im2col's (QIm2col).
struct QPlanes {
  int64_t h = 0, w = 0, ch = 0;
  int32_t kh = 1, kw = 1, dh = 1, dw = 1, pt = 0, pl = 0, sh = 1, sw = 1;
};

// Y planes (n_img x M x h*w, contiguous) = W X + b over the convolution g of X phase planes (n_img x sh*sw x
// ch x h*w, float32): rows of the product are pixels (any block height; the residual, if any, laid out as Y).
using QPlanesFn = void (*)(const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias,
                           float* y, int num_threads);

// One quantized path: a SP_QPATH row of csrc/cpu/ukernels.inc.
struct QPath {
  const char* dtype;   // "int8" or "bf16"
  const char* isa;     // level name, see dispatch.cpp
  const char* names;   // micro-kernel names
  QSpmmFn fn;
  bool (*supported)();
  QPlanesFn planes;    // the NCHW-planes kernel, or null (the caller transposes to rows and back)
};

void s8_bsr_spmm__scalar(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void bf16_bsr_spmm__scalar(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
#if defined(SPARSEPRUNE_X86)
void s8_bsr_spmm__avx2(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void bf16_bsr_spmm__avx2(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void s8_bsr_spmm__avxvnni(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void s8_bsr_spmm__avx512(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void bf16_bsr_spmm__avx512(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void s8_bsr_spmm__avx512vnni(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void bf16_bsr_spmm__avx512bf16(const QBsrView&, const void*, XType, int64_t, int64_t, const float*, float*, int64_t, int);
void s8_bsr_planes__avx2(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void bf16_bsr_planes__avx2(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void s8_bsr_planes__avxvnni(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void s8_bsr_planes__avx512(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void bf16_bsr_planes__avx512(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void s8_bsr_planes__avx512vnni(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
void bf16_bsr_planes__avx512bf16(const QBsrView&, const QPlanes&, const float*, int64_t, const float*, float*, int);
#endif

const std::vector<QPath>& all_qpaths();
// The active path for "int8" / "bf16" under the current ISA level (SPARSEPRUNE_ISA / set_isa).
const QPath& active_qpath(const std::string& dtype);
const QPath& active_qpath(bool s8);  // int8 (true) or bf16

}  // namespace sparseprune
