// The quantized BSR kernels over NCHW channel planes: a convolution whose output is its input's size over the
// stride (1x1; 3x3 with padding 1; QPlanes) on NCHW images, as PyTorch lays them out by default (strided
// inputs split into their stride phases by the caller). Rows of the product are pixels. The row kernels (qspmm_simd.h) need pixel rows: NCHW inputs were transposed to NHWC
// and their outputs back, two passes over memory that cost more than the sparse product itself on
// ResNet-50's 56x56 maps (a 256x3136 output plane set: ~0.15 ms).
//
// Here the register tile is turned around: one vector holds 16 pixels (one k-group word each, the panel
// layout of the row kernels with 16-row panels), the weights are the broadcast operand, and each of the 16
// accumulators of a tile is one output channel over 16 pixels: stored straight into its plane. The panel
// is filled from the planes without a transpose: a k-group word of 16 pixels is 4 (int8) or 2 (bf16)
// plane vectors, packed and interleaved in registers. A tap of a larger kernel is the planes of its stride
// phase read at a shifted position (a phase has the output's size, so the shift of a tap is one offset in the
// flattened plane), its lanes outside the image masked to zero, as the NHWC im2col's padding. The results are
// bit-identical to the row kernels for int8: the same per-pixel quantization parameters, rounding,
// saturation and epilogue operations (bf16: the row kernels' tail tiles sum in another order).
//
// Include inside `namespace sparseprune { namespace <isa> {` after qspmm_simd.h. AVX-512 BW: 16-pixel panels
// (q_planes, 16-row blocks); AVX2: 8-pixel panels (q_planes8, any block height), the X^T tiles' orientation.
#pragma once
#if defined(__AVX2__)
// Per tap its phase's shift (dy, dx); per column k its offset from an output pixel's position in the image's
// phase planes, and its tap (computed without divisions per column: four of them cost ~60 us of a 3x3 512 @7
// call).
struct PlanesTable {
  std::vector<int64_t> dy, dx, off;
  std::vector<int32_t> tap;
};

// Threads for a planes convolution: by the work (int8 ~4 MACs per fp32 MAC's time), at most one per panel.
inline int planes_threads(const QBsrView& w, int64_t n_img, int64_t hw, int64_t panels, bool s8, int num_threads) {
  const int64_t work = n_img * hw * (w.nnzb() * w.r * w.c / (s8 ? 4 : 2) + w.rows + w.cols);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_for(work, num_threads), panels)));
}

// A thread's scratch for one group of `group` panels of pw pixels (kg words each), then sx, inv and zp per pixel.
inline uint32_t* planes_scratch(int64_t kg, int pw, int group, float** sx, float** inv, int32_t** zp) {
  uint32_t* xp = q_scratch(static_cast<size_t>(group * kg * pw + 3 * pw * group));
  *sx = reinterpret_cast<float*>(xp + group * kg * pw);
  *inv = *sx + pw * group;
  *zp = reinterpret_cast<int32_t*>(*inv + pw * group);
  return xp;
}

// The epilogue operands of the block row whose first output is m0.
inline QEpi planes_epi(const QBsrView& w, const float* bias, int64_t m0, bool s8) {
  QEpi e;
  if (s8) {
    e.comp = w.comp + m0;
    e.ws = w.wscale + m0;
  }
  e.bias = bias ? bias + m0 : nullptr;
  e.act = w.act;
  e.res = w.has_res;
  e.res_bytes = w.res_bytes;
  return e;
}

inline void planes_table(const QPlanes& g, int64_t K, int64_t hw, PlanesTable& t) {
  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  t.dy.assign(static_cast<size_t>(taps), 0);
  t.dx.assign(static_cast<size_t>(taps), 0);
  t.off.assign(static_cast<size_t>(K), 0);
  t.tap.assign(static_cast<size_t>(K), 0);
  auto split = [](int64_t i, int64_t s, int64_t& d, int64_t& ph) {  // i = s * d + ph, 0 <= ph < s
    ph = ((i % s) + s) % s;
    d = (i - ph) / s;
  };
  for (int64_t a = 0, k = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t tp = a * g.kw + b;
      int64_t py, px;
      split(a * g.dh - g.pt, g.sh, t.dy[tp], py);
      split(b * g.dw - g.pl, g.sw, t.dx[tp], px);
      const int64_t base = (py * g.sw + px) * g.ch * hw + t.dy[tp] * g.w + t.dx[tp];
      for (int64_t c = 0; c < g.ch; ++c, ++k) {
        t.off[k] = base + c * hw;
        t.tap[k] = static_cast<int32_t>(tp);
      }
    }
}
#endif

#if defined(__AVX512BW__)

constexpr int kPlanesGroup = 8;  // panels of 16 pixels packed together (their ranges in 16 registers)

// Where the columns of a panel group come from: column k is channel k % ch of tap k / ch, read at off[k] floats
// from the group's first pixel (the channel's plane in the tap's stride phase, at the tap's shift), with the
// tap's lane masks mask[tap * kPlanesGroup + v].
struct PlanesCols {
  const int64_t* off = nullptr;   // per column k < K
  const int32_t* tap = nullptr;   // per column k < K
  const __mmask16* mask = nullptr;  // per tap and panel of the group
};

// The lane masks of the group (cnt pixels from q0 in an h x w output) for every tap (dy, dx: the tap's shift
// in its phase, QPlanes).
inline void planes_masks(const QPlanes& g, const int64_t* dy, const int64_t* dx, int64_t q0, int64_t cnt,
                         __mmask16* mask) {
  int32_t ohs[16 * kPlanesGroup], ows[16 * kPlanesGroup];  // each pixel's row and column (one division per group)
  for (int64_t i = 0, oh = q0 / g.w, ow = q0 % g.w; i < cnt; ++i) {
    ohs[i] = static_cast<int32_t>(oh);
    ows[i] = static_cast<int32_t>(ow);
    if (++ow == g.w) ow = 0, ++oh;
  }
  for (int64_t t = 0; t < static_cast<int64_t>(g.kh) * g.kw; ++t) {
    __mmask16* m = mask + t * kPlanesGroup;
    for (int v = 0; v < kPlanesGroup; ++v) {
      uint32_t bits = 0;
      for (int j = 0; j < 16 && 16 * v + j < cnt; ++j) {
        const int64_t oh = ohs[16 * v + j] + dy[t], ow = ows[16 * v + j] + dx[t];
        bits |= static_cast<uint32_t>(oh >= 0 && oh < g.h && ow >= 0 && ow < g.w) << j;
      }
      m[v] = static_cast<__mmask16>(bits);
    }
  }
}

// x + off floats, for a lane mask: masked-out lanes (outside the image) are never read, though the
// address of the vector may start before the planes (a tap's negative shift at the image's first pixels)
SQ_INLINE __m512 planes_load(const float* x, int64_t off, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, reinterpret_cast<const void*>(reinterpret_cast<intptr_t>(x) + off * 4));
}

// int8: the quantization parameters of up to 8 x 16 pixels (cnt of them; x at the group's first pixel)
// over all K columns, as q_row_params(q_row_range(row)) gives them per pixel row: sx (scale, NaN for a row
// with a NaN or infinity), inv, zp. Lanes past cnt get s = 1, zp = 0.
inline void q_planes_params(const float* x, const QPlanes& g, const PlanesCols& pc, int64_t cnt, float* sx,
                            float* inv, int32_t* zp) {
  __m512 lo[kPlanesGroup], hi[kPlanesGroup];
  __mmask16 nan[kPlanesGroup];
  const __m512 zero = _mm512_setzero_ps();
  for (int v = 0; v < kPlanesGroup; ++v) {
    lo[v] = hi[v] = zero;
    nan[v] = 0;
  }
  const int64_t hw = g.h * g.w, taps = static_cast<int64_t>(g.kh) * g.kw;
  for (int64_t t = 0; t < taps; ++t) {
    const __mmask16* m = pc.mask + t * kPlanesGroup;
    const int64_t shift = pc.off[t * g.ch];  // column (t, 0): plane 0 at the tap's shift
    for (int64_t c = 0; c < g.ch; ++c) {
      const int64_t o = c * hw + shift;
#pragma GCC unroll 8
      for (int v = 0; v < kPlanesGroup; ++v) {
        // x first: minps / maxps return the second operand (the running range) for a NaN, as q_row_range
        const __m512 xv = planes_load(x, o + 16 * v, m[v]);
        lo[v] = _mm512_min_ps(xv, lo[v]);
        hi[v] = _mm512_max_ps(xv, hi[v]);
        nan[v] |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
      }
    }
  }
  // q_row_params, 16 lanes at a time (IEEE division and round-to-nearest: the same values as the scalar code)
  const __m512 qmax = _mm512_set1_ps(kQMax), one = _mm512_set1_ps(1.0f), inf = _mm512_set1_ps(INFINITY);
  const __m512 tiny = _mm512_set1_ps(1e-30f), qnan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  for (int v = 0; v < kPlanesGroup; ++v) {
    if (16 * v >= cnt) break;
    const __m512 l = _mm512_min_ps(lo[v], zero), h = _mm512_max_ps(hi[v], zero);
    __m512 s = _mm512_div_ps(_mm512_sub_ps(h, l), qmax);
    // a finite range wider than float32 (h - l overflows) scaled part by part, as q_row_params
    const __mmask16 wide = _mm512_cmp_ps_mask(s, inf, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(_mm512_abs_ps(h), inf, _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(_mm512_abs_ps(l), inf, _CMP_LT_OQ);
    s = _mm512_mask_blend_ps(wide, s, _mm512_sub_ps(_mm512_div_ps(h, qmax), _mm512_div_ps(l, qmax)));
    const __mmask16 ok = _mm512_cmp_ps_mask(s, tiny, _CMP_GE_OQ) & _mm512_cmp_ps_mask(s, inf, _CMP_LT_OQ);
    s = _mm512_mask_blend_ps(ok, one, s);
    const __m512 vinv = _mm512_div_ps(one, s);
    __m512 z = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(zero, l), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    z = _mm512_min_ps(_mm512_max_ps(z, zero), qmax);  // max(NaN, 0) = 0, as the scalar clamp
    // a NaN or an infinity in the pixel's row: its scale is NaN (the output row NaN, as a float matmul's)
    const __mmask16 bad = nan[v] | _mm512_cmp_ps_mask(_mm512_abs_ps(l), inf, _CMP_EQ_OQ) |
                          _mm512_cmp_ps_mask(_mm512_abs_ps(h), inf, _CMP_EQ_OQ);
    _mm512_storeu_ps(sx + 16 * v, _mm512_mask_blend_ps(bad, s, qnan));
    _mm512_storeu_ps(inv + 16 * v, vinv);
    _mm512_storeu_si512(zp + 16 * v, _mm512_cvttps_epi32(z));
  }
}

// int8: k-group words of up to 8 x 16 pixels into panels (panel v at xp + v * kg * 16, word g of pixel j at
// [g * 16 + j]); columns >= K are 0 bytes, k-groups past K zero words. q_quant64's operations: vcvtps2dq,
// saturating packs with the zero point added in 16 bits, min 127. A padded tap's lanes read 0.0 (byte zp).
inline void q_planes_quantize(const float* x, int64_t K, int64_t ch, int64_t hw, const PlanesCols& pc, int64_t cnt,
                              int64_t kg, const float* inv, const int32_t* zp, uint32_t* xp) {
  const __m512i qmax = _mm512_set1_epi8(static_cast<char>(kQMax)), nil = _mm512_set1_epi32(INT32_MIN);
  // packus leaves, per 128-bit lane (pixels 4l..4l+3), column j's 4 bytes at 4j..4j+3: gather each pixel's
  const __m512i order = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
  for (int v = 0; v < kPlanesGroup && 16 * v < cnt; ++v) {
    const __m512 vinv = _mm512_loadu_ps(inv + 16 * v);
    const __m512i z32 = _mm512_loadu_si512(zp + 16 * v);
    const __m512i z16 = _mm512_packs_epi32(z32, z32);  // lane l: the zero points of pixels 4l..4l+3, twice
    uint32_t* dst = xp + v * kg * 16;
    const float* xs = x + 16 * v;
    const __mmask16* m = pc.mask + v;
    auto col = [&](int64_t k) {  // column k of the 16 pixels, rounded to int32 (nil past K: byte 0)
      return k < K ? _mm512_cvtps_epi32(_mm512_mul_ps(planes_load(xs, pc.off[k], m[pc.tap[k] * kPlanesGroup]), vinv))
                   : nil;
    };
    auto store = [&](int64_t g, __m512i a0, __m512i a1, __m512i a2, __m512i a3) {  // four columns' bytes, word g
      const __m512i b = _mm512_packus_epi16(_mm512_adds_epi16(_mm512_packs_epi32(a0, a1), z16),
                                            _mm512_adds_epi16(_mm512_packs_epi32(a2, a3), z16));
      _mm512_storeu_si512(dst + g * 16, _mm512_shuffle_epi8(_mm512_min_epu8(b, qmax), order));
    };
    int64_t g = 0;
    if (ch % 4 == 0) {  // no word straddles two taps: a tap at a time, its shift and mask in registers
      for (int64_t t = 0; t < K / ch; ++t) {
        const __mmask16 mt = m[t * kPlanesGroup];
        const int64_t shift = pc.off[t * ch];
        for (int64_t c = 0; c < ch; c += 4, ++g) {
          __m512i a[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) a[j] = _mm512_cvtps_epi32(_mm512_mul_ps(planes_load(xs, shift + (c + j) * hw, mt), vinv));
          store(g, a[0], a[1], a[2], a[3]);
        }
      }
    }
    for (; g < kg; ++g) store(g, col(4 * g), col(4 * g + 1), col(4 * g + 2), col(4 * g + 3));
  }
}

// bf16: k-group words (two columns, the lower in the low half) of up to 8 x 16 pixels into panels, as
// q_planes_quantize lays them out; bf16_bits' rounding (to nearest even), columns >= K are 0.
inline void bf16_planes_round(const float* x, int64_t K, int64_t ch, int64_t hw, const PlanesCols& pc, int64_t cnt,
                              int64_t kg, uint32_t* xp) {
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (int v = 0; v < kPlanesGroup && 16 * v < cnt; ++v) {
    uint32_t* dst = xp + v * kg * 16;
    const float* xs = x + 16 * v;
    const __mmask16* m = pc.mask + v;
    auto round = [&](__m512 f) {  // bf16 bits in the low halves
      const __m512i u = _mm512_castps_si512(f);
      return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    };
    auto col = [&](int64_t k) {  // bf16 bits of column k (0 past K)
      return k < K ? round(planes_load(xs, pc.off[k], m[pc.tap[k] * kPlanesGroup])) : _mm512_setzero_si512();
    };
    int64_t g = 0;
    if (ch % 2 == 0) {  // no word straddles two taps: a tap at a time, its shift and mask in registers
      for (int64_t t = 0; t < K / ch; ++t) {
        const __mmask16 mt = m[t * kPlanesGroup];
        const int64_t shift = pc.off[t * ch];
        for (int64_t c = 0; c < ch; c += 2, ++g)
          _mm512_storeu_si512(dst + g * 16, _mm512_or_si512(round(planes_load(xs, shift + c * hw, mt)),
                                                            _mm512_slli_epi32(round(planes_load(xs, shift + (c + 1) * hw, mt)), 16)));
      }
    }
    for (; g < kg; ++g)
      _mm512_storeu_si512(dst + g * 16, _mm512_or_si512(col(2 * g), _mm512_slli_epi32(col(2 * g + 1), 16)));
  }
}

// One 16-pixel panel (mask: its valid pixels) x one block row of 16 outputs (rows of them valid): acc[o]
// over the row's blocks, then the epilogue of the row kernels per output plane (y: the block row's first
// plane at the panel's first pixel; planes hw apart).
template <class Op, int GPB, class Idx>
SQ_INLINE void q_planes_tile(const uint32_t* __restrict xp, int gpb_rt, const uint32_t* __restrict vals,
                             const Idx* __restrict cols, int64_t b0, int64_t b1, int rows, __mmask16 mask,
                             const QEpi& e, __m512 vsx, __m512i vzp, float* __restrict y, int64_t hw) {
  using T = typename Op::T;
  const int gpb = GPB ? GPB : gpb_rt;
  T acc[16];
#pragma GCC unroll 16
  for (int o = 0; o < 16; ++o) acc[o] = Op::zero();
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* xb = xp + static_cast<int64_t>(cols[b]) * gpb * 16;
    const uint32_t* wb = vals + b * gpb * 16;
    for (int g = 0; g < gpb; ++g) {
      const __m512i xv = _mm512_loadu_si512(xb + g * 16);
#pragma GCC unroll 16
      for (int o = 0; o < 16; ++o) acc[o] = Op::dot_bw(acc[o], xv, wb + g * 16 + o);
    }
  }
  for (int o = 0; o < rows; ++o) {
    __m512 v;
    if constexpr (Op::S8) {
      const __m512i a = _mm512_sub_epi32(acc[o], _mm512_mullo_epi32(_mm512_set1_epi32(e.comp[o]), vzp));
      v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(vsx, _mm512_set1_ps(e.ws[o])));
    } else {
      v = acc[o];
    }
    float* yo = y + o * hw;
    if (e.bias) v = _mm512_add_ps(v, _mm512_set1_ps(e.bias[o]));
    if (e.res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, residual_at(yo, e.res_bytes)));
    if (e.act) v = act_v(v, e.act);
    _mm512_mask_storeu_ps(yo, mask, v);
  }
}

// Y planes = act(W X + b (+ residual)) over the convolution g (w.r == 16): the panels split evenly between
// the threads, each packing its own (groups of up to 8 panels of one image) and running every block row
// over them. Everything else as q_spmm_run.
template <class Op, class Idx>
void q_planes_run(const QBsrView& w, const Idx* cols, const QPlanes& g, const float* x, int64_t n_img,
                  const float* bias, float* y, int num_threads) {
  constexpr int G = Op::G;
  const int gpb = w.c / G;
  const int64_t K = w.cols, M = w.rows, kg = w.block_cols * gpb, hw = g.h * g.w;
  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  const int64_t per_img = (hw + 15) / 16, panels = n_img * per_img;
  const int nt = planes_threads(w, n_img, hw, panels, Op::S8, num_threads);
  const int64_t img_floats = static_cast<int64_t>(g.sh) * g.sw * g.ch * hw;
  PlanesTable tb;
  planes_table(g, K, hw, tb);
  parallel_team(nt, [&] {
    const int th = omp_get_thread_num();
    if (th >= nt) return;
    const int64_t p0 = panels * th / nt, p1 = panels * (th + 1) / nt;
    float *sx, *inv;
    int32_t* zp;
    uint32_t* xp = planes_scratch(kg, 16, kPlanesGroup, &sx, &inv, &zp);
    thread_local std::vector<__mmask16> masks;
    masks.resize(static_cast<size_t>(taps * kPlanesGroup));
    const PlanesCols pc{tb.off.data(), tb.tap.data(), masks.data()};
    for (int64_t p = p0; p < p1;) {
      const int64_t img = p / per_img, first = p % per_img;
      const int64_t np = std::min<int64_t>({kPlanesGroup, p1 - p, per_img - first});
      const int64_t q0 = first * 16, cnt = std::min<int64_t>(hw - q0, np * 16);
      const float* xi = x + img * img_floats + q0;
      planes_masks(g, tb.dy.data(), tb.dx.data(), q0, cnt, masks.data());
      if constexpr (Op::S8) {
        q_planes_params(xi, g, pc, cnt, sx, inv, zp);
        q_planes_quantize(xi, K, g.ch, hw, pc, cnt, kg, inv, zp, xp);
      } else {
        bf16_planes_round(xi, K, g.ch, hw, pc, cnt, kg, xp);
      }
      for (int64_t v = 0; v < np; ++v) {
        const int64_t left = cnt - 16 * v;
        const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
        __m512 vsx = _mm512_setzero_ps();
        __m512i vzp = _mm512_setzero_si512();
        if constexpr (Op::S8) {
          vsx = _mm512_loadu_ps(sx + 16 * v);
          vzp = _mm512_loadu_si512(zp + 16 * v);
        }
        const uint32_t* xpv = xp + v * kg * 16;
        float* yv = y + img * M * hw + q0 + 16 * v;
        for (int64_t br = 0; br < w.block_rows; ++br) {
          const int64_t m0 = br * 16;
          const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
          const QEpi e = planes_epi(w, bias, m0, Op::S8);
          const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
          if (gpb * G == 16)
            q_planes_tile<Op, 16 / G>(xpv, gpb, w.values, cols, b0, b1, rows, mask, e, vsx, vzp, yv + m0 * hw, hw);
          else
            q_planes_tile<Op, 0>(xpv, gpb, w.values, cols, b0, b1, rows, mask, e, vsx, vzp, yv + m0 * hw, hw);
        }
      }
      p += np;
    }
  });
}

#endif  // __AVX512BW__


#if defined(__AVX2__)
// ---------------------------------------------------------------------------------------------
// 8-pixel panels (AVX2, and every int8 / bf16 path for blocks other than 16 rows): q_planes' scheme with ymm
// vectors and vector lane masks. A tile is 8 pixels x up to 8 outputs of one block row (8 accumulators, the X
// word vector and the broadcast weight word in 16 registers), each output's accumulator stored into its plane
// through the epilogue; taller blocks take several tiles over the same panel. int8 results are bit-identical
// to the row kernels' (the same per-pixel quantization, rounding, saturation and epilogue operations).

constexpr int kP8Group = 4;  // panels of 8 pixels packed together (their ranges in 12 registers)

// The lane masks (all ones: inside the image) of the group's panels for every tap: mask[tap * kP8Group + v].
inline void planes8_masks(const QPlanes& g, const int64_t* dy, const int64_t* dx, int64_t q0, int64_t cnt,
                          __m256i* mask) {
  int32_t ohs[8 * kP8Group], ows[8 * kP8Group];
  for (int64_t i = 0, oh = q0 / g.w, ow = q0 % g.w; i < cnt; ++i) {
    ohs[i] = static_cast<int32_t>(oh);
    ows[i] = static_cast<int32_t>(ow);
    if (++ow == g.w) ow = 0, ++oh;
  }
  for (int64_t t = 0; t < static_cast<int64_t>(g.kh) * g.kw; ++t) {
    for (int v = 0; v < kP8Group; ++v) {
      alignas(32) int32_t m[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t i = 8 * v + j;
        const int64_t oh = ohs[i < cnt ? i : 0] + dy[t], ow = ows[i < cnt ? i : 0] + dx[t];
        m[j] = i < cnt && oh >= 0 && oh < g.h && ow >= 0 && ow < g.w ? -1 : 0;
      }
      mask[t * kP8Group + v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
    }
  }
}

// x + off floats under a lane mask: masked-out lanes are never read (vmaskmovps does not fault on them), though
// the vector may start before the planes (a tap's negative shift at the image's first pixels)
SQ_INLINE __m256 planes8_load(const float* x, int64_t off, __m256i m) {
  return _mm256_maskload_ps(reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(x) + off * 4), m);
}

SQ_INLINE __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

// int8: q_planes_params over up to kP8Group x 8 pixels (cnt of them): sx (NaN for a pixel whose row holds a NaN
// or an infinity), inv, zp per pixel; lanes past cnt get s = 1, zp = 0.
inline void q_planes8_params(const float* x, const QPlanes& g, const int64_t* off, const __m256i* mask, int64_t cnt,
                             float* sx, float* inv, int32_t* zp) {
  __m256 lo[kP8Group], hi[kP8Group], nan[kP8Group];
  const __m256 zero = _mm256_setzero_ps();
  for (int v = 0; v < kP8Group; ++v) lo[v] = hi[v] = nan[v] = zero;
  const int64_t hw = g.h * g.w, taps = static_cast<int64_t>(g.kh) * g.kw;
  for (int64_t t = 0; t < taps; ++t) {
    const __m256i* m = mask + t * kP8Group;
    const int64_t shift = off[t * g.ch];  // column (t, 0): plane 0 at the tap's shift
    for (int64_t c = 0; c < g.ch; ++c) {
      const int64_t o = c * hw + shift;
#pragma GCC unroll 4
      for (int v = 0; v < kP8Group; ++v) {
        // x first: minps / maxps return the second operand (the running range) for a NaN, as q_row_range
        const __m256 xv = planes8_load(x, o + 8 * v, m[v]);
        lo[v] = _mm256_min_ps(xv, lo[v]);
        hi[v] = _mm256_max_ps(xv, hi[v]);
        nan[v] = _mm256_or_ps(nan[v], _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
      }
    }
  }
  // q_row_params, 8 lanes at a time (IEEE division and round-to-nearest: the same values as the scalar code)
  const __m256 qmax = _mm256_set1_ps(kQMax), one = _mm256_set1_ps(1.0f), inf = _mm256_set1_ps(INFINITY);
  const __m256 tiny = _mm256_set1_ps(1e-30f), qnan = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN());
  for (int v = 0; v < kP8Group; ++v) {
    if (8 * v >= cnt) break;
    const __m256 l = _mm256_min_ps(lo[v], zero), h = _mm256_max_ps(hi[v], zero);
    __m256 s = _mm256_div_ps(_mm256_sub_ps(h, l), qmax);
    // a finite range wider than float32 (h - l overflows) scaled part by part, as q_row_params
    const __m256 wide = _mm256_and_ps(_mm256_cmp_ps(s, inf, _CMP_EQ_OQ),
                                      _mm256_and_ps(_mm256_cmp_ps(abs8(h), inf, _CMP_LT_OQ),
                                                    _mm256_cmp_ps(abs8(l), inf, _CMP_LT_OQ)));
    s = _mm256_blendv_ps(s, _mm256_sub_ps(_mm256_div_ps(h, qmax), _mm256_div_ps(l, qmax)), wide);
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(s, tiny, _CMP_GE_OQ), _mm256_cmp_ps(s, inf, _CMP_LT_OQ));
    s = _mm256_blendv_ps(one, s, ok);
    const __m256 vinv = _mm256_div_ps(one, s);
    __m256 z = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(zero, l), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    z = _mm256_min_ps(_mm256_max_ps(z, zero), qmax);  // max(NaN, 0) = 0, as the scalar clamp
    const __m256 bad = _mm256_or_ps(nan[v], _mm256_or_ps(_mm256_cmp_ps(abs8(l), inf, _CMP_EQ_OQ),
                                                         _mm256_cmp_ps(abs8(h), inf, _CMP_EQ_OQ)));
    _mm256_storeu_ps(sx + 8 * v, _mm256_blendv_ps(s, qnan, bad));
    _mm256_storeu_ps(inv + 8 * v, vinv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(zp + 8 * v), _mm256_cvttps_epi32(z));
  }
}

// int8: k-group words of up to kP8Group x 8 pixels into panels (panel v at xp + v * kg * 8, word g of pixel j
// at [g * 8 + j]); q_planes_quantize's operations on 8 lanes.
inline void q_planes8_quantize(const float* x, int64_t K, int64_t ch, int64_t hw, const int64_t* off,
                               const int32_t* tap, const __m256i* mask, int64_t cnt, int64_t kg, const float* inv,
                               const int32_t* zp, uint32_t* xp) {
  const __m256i qmax = _mm256_set1_epi8(static_cast<char>(kQMax)), nil = _mm256_set1_epi32(INT32_MIN);
  // packus leaves, per 128-bit lane (pixels 4l..4l+3), column j's 4 bytes at 4j..4j+3: gather each pixel's
  const __m256i order = _mm256_setr_epi32(0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703,
                                          0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703);
  for (int v = 0; v < kP8Group && 8 * v < cnt; ++v) {
    const __m256 vinv = _mm256_loadu_ps(inv + 8 * v);
    const __m256i z32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp + 8 * v));
    const __m256i z16 = _mm256_packs_epi32(z32, z32);  // lane l: the zero points of pixels 4l..4l+3, twice
    uint32_t* dst = xp + v * kg * 8;
    const float* xs = x + 8 * v;
    const __m256i* m = mask + v;
    auto col = [&](int64_t k) {  // column k of the 8 pixels, rounded to int32 (nil past K: byte 0)
      return k < K ? _mm256_cvtps_epi32(_mm256_mul_ps(planes8_load(xs, off[k], m[tap[k] * kP8Group]), vinv)) : nil;
    };
    auto store = [&](int64_t g, __m256i a0, __m256i a1, __m256i a2, __m256i a3) {  // four columns' bytes, word g
      const __m256i b = _mm256_packus_epi16(_mm256_adds_epi16(_mm256_packs_epi32(a0, a1), z16),
                                            _mm256_adds_epi16(_mm256_packs_epi32(a2, a3), z16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 8), _mm256_shuffle_epi8(_mm256_min_epu8(b, qmax), order));
    };
    int64_t g = 0;
    if (ch % 4 == 0) {  // no word straddles two taps: a tap at a time, its shift and mask in registers
      for (int64_t t = 0; t < K / ch; ++t) {
        const __m256i mt = m[t * kP8Group];
        const int64_t shift = off[t * ch];
        for (int64_t c = 0; c < ch; c += 4, ++g) {
          __m256i a[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
            a[j] = _mm256_cvtps_epi32(_mm256_mul_ps(planes8_load(xs, shift + (c + j) * hw, mt), vinv));
          store(g, a[0], a[1], a[2], a[3]);
        }
      }
    }
    for (; g < kg; ++g) store(g, col(4 * g), col(4 * g + 1), col(4 * g + 2), col(4 * g + 3));
  }
}

// bf16: k-group words (two columns, the lower in the low half) of up to kP8Group x 8 pixels into panels
// (bf16_bits' rounding to nearest even; columns >= K are 0).
inline void bf16_planes8_round(const float* x, int64_t K, int64_t ch, int64_t hw, const int64_t* off,
                               const int32_t* tap, const __m256i* mask, int64_t cnt, int64_t kg, uint32_t* xp) {
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (int v = 0; v < kP8Group && 8 * v < cnt; ++v) {
    uint32_t* dst = xp + v * kg * 8;
    const float* xs = x + 8 * v;
    const __m256i* m = mask + v;
    auto round = [&](__m256 f) {  // bf16 bits in the low halves
      const __m256i u = _mm256_castps_si256(f);
      return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
    };
    auto col = [&](int64_t k) {  // bf16 bits of column k (0 past K)
      return k < K ? round(planes8_load(xs, off[k], m[tap[k] * kP8Group])) : _mm256_setzero_si256();
    };
    auto put = [&](int64_t g, __m256i lo, __m256i hi) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 8), _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)));
    };
    int64_t g = 0;
    if (ch % 2 == 0) {  // no word straddles two taps
      for (int64_t t = 0; t < K / ch; ++t) {
        const __m256i mt = m[t * kP8Group];
        const int64_t shift = off[t * ch];
        for (int64_t c = 0; c < ch; c += 2, ++g)
          put(g, round(planes8_load(xs, shift + c * hw, mt)), round(planes8_load(xs, shift + (c + 1) * hw, mt)));
      }
    }
    for (; g < kg; ++g) put(g, col(2 * g), col(2 * g + 1));
  }
}

// One 8-pixel panel (mask: its valid pixels; all: every lane valid) x outputs [o0, o0 + RO) of one block row of
// r outputs: acc[o] over the row's blocks, then the row kernels' epilogue per output plane (y: the block row's
// first plane at the panel's first pixel; planes hw apart).
template <class Op, int RO, class Idx>
__attribute__((noinline)) void q_planes8_tile(const uint32_t* __restrict xp, int gpb, int r, int o0,
                                              const uint32_t* __restrict vals, const Idx* __restrict cols, int64_t b0,
                                              int64_t b1, __m256i mask, bool all, const QEpi& e, __m256 vsx,
                                              __m256i vzp, float* __restrict y, int64_t hw) {
  using T = typename Op::XT;
  T acc[RO];
#pragma GCC unroll 8
  for (int o = 0; o < RO; ++o) acc[o] = Op::xzero();
  const int64_t bw = static_cast<int64_t>(gpb) * r;
  const uint32_t* wb = vals + b0 * bw + o0;
  for (int64_t b = b0; b < b1; ++b, wb += bw) {
    const uint32_t* xb = xp + static_cast<int64_t>(cols[b]) * gpb * 8;
    for (int g = 0; g < gpb; ++g) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + g * 8));
#pragma GCC unroll 8
      for (int o = 0; o < RO; ++o) acc[o] = Op::xdot(acc[o], xv, Op::xprep(wb[g * r + o]));
    }
  }
  for (int o = 0; o < RO; ++o) {
    __m256 v;
    if constexpr (Op::S8) {
      const __m256i a = _mm256_sub_epi32(acc[o], _mm256_mullo_epi32(_mm256_set1_epi32(e.comp[o0 + o]), vzp));
      v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(vsx, _mm256_set1_ps(e.ws[o0 + o])));
    } else {
      v = acc[o];
    }
    float* yo = y + (o0 + o) * hw;
    if (e.bias) v = _mm256_add_ps(v, _mm256_set1_ps(e.bias[o0 + o]));
    if (e.res) {
      const float* ro = residual_at(yo, e.res_bytes);
      v = _mm256_add_ps(v, all ? _mm256_loadu_ps(ro) : _mm256_maskload_ps(ro, mask));
    }
    if (e.act) v = act_v(v, e.act);
    if (all) _mm256_storeu_ps(yo, v); else _mm256_maskstore_ps(yo, mask, v);
  }
}

// Y planes = act(W X + b (+ residual)) over the convolution g, any block height: q_planes_run's split and
// packing with 8-pixel panels.
template <class Op, class Idx>
void q_planes8_run(const QBsrView& w, const Idx* cols, const QPlanes& g, const float* x, int64_t n_img,
                   const float* bias, float* y, int num_threads) {
  constexpr int G = Op::G;
  const int gpb = w.c / G, r = w.r;
  const int64_t K = w.cols, M = w.rows, kg = w.block_cols * gpb, hw = g.h * g.w;
  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  const int64_t per_img = (hw + 7) / 8, panels = n_img * per_img;
  const int nt = planes_threads(w, n_img, hw, panels, Op::S8, num_threads);
  const int64_t img_floats = static_cast<int64_t>(g.sh) * g.sw * g.ch * hw;
  PlanesTable tb;
  planes_table(g, K, hw, tb);
  parallel_team(nt, [&] {
    const int th = omp_get_thread_num();
    if (th >= nt) return;
    const int64_t p0 = panels * th / nt, p1 = panels * (th + 1) / nt;
    float *sx, *inv;
    int32_t* zp;
    uint32_t* xp = planes_scratch(kg, 8, kP8Group, &sx, &inv, &zp);
    thread_local std::vector<__m256i> masks;
    masks.resize(static_cast<size_t>(taps * kP8Group));
    for (int64_t p = p0; p < p1;) {
      const int64_t img = p / per_img, first = p % per_img;
      const int64_t np = std::min<int64_t>({kP8Group, p1 - p, per_img - first});
      const int64_t q0 = first * 8, cnt = std::min<int64_t>(hw - q0, np * 8);
      const float* xi = x + img * img_floats + q0;
      planes8_masks(g, tb.dy.data(), tb.dx.data(), q0, cnt, masks.data());
      if constexpr (Op::S8) {
        q_planes8_params(xi, g, tb.off.data(), masks.data(), cnt, sx, inv, zp);
        q_planes8_quantize(xi, K, g.ch, hw, tb.off.data(), tb.tap.data(), masks.data(), cnt, kg, inv, zp, xp);
      } else {
        bf16_planes8_round(xi, K, g.ch, hw, tb.off.data(), tb.tap.data(), masks.data(), cnt, kg, xp);
      }
      for (int64_t v = 0; v < np; ++v) {
        const int64_t left = cnt - 8 * v;
        const bool all = left >= 8;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 vsx = _mm256_setzero_ps();
        __m256i vzp = _mm256_setzero_si256();
        if constexpr (Op::S8) {
          vsx = _mm256_loadu_ps(sx + 8 * v);
          vzp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp + 8 * v));
        }
        const uint32_t* xpv = xp + v * kg * 8;
        float* yv = y + img * M * hw + q0 + 8 * v;
        for (int64_t br = 0; br < w.block_rows; ++br) {
          const int64_t m0 = br * r;
          const int rows = static_cast<int>(std::min<int64_t>(r, M - m0));
          const QEpi e = planes_epi(w, bias, m0, Op::S8);
          const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
          float* yb = yv + m0 * hw;
          // outputs of the block row in tiles of 8, 4, 2, 1 (the last block row may have fewer than r)
          int o = 0;
          for (; o + 8 <= rows; o += 8)
            q_planes8_tile<Op, 8>(xpv, gpb, r, o, w.values, cols, b0, b1, mask, all, e, vsx, vzp, yb, hw);
          if (rows - o >= 4) {
            q_planes8_tile<Op, 4>(xpv, gpb, r, o, w.values, cols, b0, b1, mask, all, e, vsx, vzp, yb, hw);
            o += 4;
          }
          if (rows - o >= 2) {
            q_planes8_tile<Op, 2>(xpv, gpb, r, o, w.values, cols, b0, b1, mask, all, e, vsx, vzp, yb, hw);
            o += 2;
          }
          if (rows - o >= 1) q_planes8_tile<Op, 1>(xpv, gpb, r, o, w.values, cols, b0, b1, mask, all, e, vsx, vzp, yb, hw);
        }
      }
      p += np;
    }
  });
}

template <class Op>
void q_planes8(const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y,
               int num_threads) {
  if (n_img <= 0 || g.h * g.w <= 0 || w.rows <= 0) return;
  if (w.idx16)
    q_planes8_run<Op>(w, static_cast<const uint16_t*>(w.col_idx), g, x, n_img, bias, y, num_threads);
  else
    q_planes8_run<Op>(w, static_cast<const int32_t*>(w.col_idx), g, x, n_img, bias, y, num_threads);
}
#endif  // __AVX2__

#if defined(__AVX512BW__)
// 16-row blocks through the 16-pixel panels, any other block height through the 8-pixel ones.
template <class Op>
void q_planes(const QBsrView& w, const QPlanes& g, const float* x, int64_t n_img, const float* bias, float* y,
              int num_threads) {
  if (n_img <= 0 || g.h * g.w <= 0 || w.rows <= 0) return;
  if (w.r != 16) return q_planes8<Op>(w, g, x, n_img, bias, y, num_threads);
  if (w.idx16)
    q_planes_run<Op>(w, static_cast<const uint16_t*>(w.col_idx), g, x, n_img, bias, y, num_threads);
  else
    q_planes_run<Op>(w, static_cast<const int32_t*>(w.col_idx), g, x, n_img, bias, y, num_threads);
}
#endif
