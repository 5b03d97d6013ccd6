// Sparse 2-D convolution: torch-free geometry, packed-weight convention and kernel entry points.
//
// The weight of a Conv2d (Cout, Cin/groups, kh, kw) is packed as a BSR matrix over its
// (Cout, Cin/groups * kh * kw) view with blocks of (rk x 1): one stored "entry" is one (input
// channel, tap) column of rk output channels. An r x c x kh x kw pruning block becomes c*kh*kw
// entries sharing the block row; CSR (unstructured) is rk = 1. With groups > 1, rk divides
// Cout/groups so that a block row never straddles two groups.
//
// The fast kernels work in a "q-domain": the (zero-padded) input of every channel is split into
// stride phases of hq x wq, so that every tap of every output pixel is X[channel offset + tap
// offset + q] with q = oh * wq + ow (the direct sparse convolution of Park et al.: each non-zero is
// an offset, the inner loop is a SpMM over contiguous pixels). Columns ow >= wo are computed and
// dropped.
#pragma once
#include <cstdint>

#include "sparseprune/formats.h"

namespace sparseprune {

struct ConvGeom {
  int64_t n = 0, c_in = 0, h = 0, w = 0;   // input
  int64_t c_out = 0, ho = 0, wo = 0;       // output
  int kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pl = 0, dh = 1, dw = 1, groups = 1;
  int64_t xs[4] = {0, 0, 0, 0};            // input strides in elements (n, c, h, w)
  int64_t ys[4] = {0, 0, 0, 0};            // output strides in elements (n, c, h, w)
  int64_t taps() const { return static_cast<int64_t>(kh) * kw; }
  int64_t cin_g() const { return c_in / groups; }
  int64_t cout_g() const { return c_out / groups; }
};

// The q-domain of one call. `direct`: the input can be read in place (stride 1, no padding read,
// NCHW planes), no workspace. Otherwise the input is packed into `workspace` (n * c_in * plane).
struct ConvQLayout {
  bool direct = false;
  int64_t hq = 0, wq = 0;   // one stride phase
  int64_t plane = 0;        // floats per channel (all phases)
  int64_t lq = 0;           // q-domain length: (ho - 1) * wq + wo
  int64_t ws_floats = 0;    // workspace the caller must provide
};
ConvQLayout conv_q_layout(const ConvGeom& g);
// Pack x (any strides) into the phase-split, zero-padded q-domain buffer. Its loops are orphaned
// `omp for`s: called inside a parallel region they share the work (and end with a barrier), called
// outside one they run on the calling thread.
// t8 (optional): the ISA path's 8x8 float transpose, src rows (stride lds) -> dst columns (stride ldd),
// which moves a channels_last input's pixels into channel planes eight by eight.
using Transpose8x8Fn = void (*)(const float* src, int64_t lds, float* dst, int64_t ldd);
// used (optional): one flag per input channel, zero where no weight reads the channel: its plane is left as it
// was (never read).
void conv_pack_input(const ConvGeom& g, const ConvQLayout& q, const float* x, float* ws, Transpose8x8Fn t8 = nullptr,
                     const uint8_t* used = nullptr);
// Serial: phase rows [r0, r0 + qt.hq) of every channel of one image into dst (c_in * qt.plane floats),
// for a layout `qt` that covers a band of output rows (see conv_simd.h).
void conv_pack_rows(const ConvGeom& g, const ConvQLayout& qt, const float* x_img, float* dst, int64_t r0,
                    Transpose8x8Fn t8 = nullptr, const uint8_t* used = nullptr);
// Input offset (q-domain, relative to the group's first channel) of every packed column k = ci*T+t.
void conv_column_offsets(const ConvGeom& g, const ConvQLayout& q, int32_t* kofs);

// y = conv2d(x, W) + bias. `w` is the (rk x 1)-block BSR over (Cout, Cin/groups*kh*kw).
using ConvFn = void (*)(const ConvGeom& g, const BsrView& w, const float* x, const float* bias, float* y,
                        float* workspace, int num_threads);
// dx = conv2d_input_grad(dy, W). g.xs are dx's strides, g.ys dy's strides.
using ConvBwdFn = void (*)(const ConvGeom& g, const BsrView& w, const float* dy, float* dx, int num_threads);

void f32_conv2d_direct__scalar(const ConvGeom&, const BsrView&, const float*, const float*, float*, float*, int);
void f32_conv2d_input_grad__scalar(const ConvGeom&, const BsrView&, const float*, float*, int);
#if defined(SPARSEPRUNE_X86)
void f32_conv2d_q__avx2(const ConvGeom&, const BsrView&, const float*, const float*, float*, float*, int);
void f32_conv2d_q__avx512(const ConvGeom&, const BsrView&, const float*, const float*, float*, float*, int);
#endif

}  // namespace sparseprune
