// Direct sparse convolution in the q-domain (see sparseprune/conv.h), shared by the AVX2 and
// AVX-512 translation units. Include inside `namespace sparseprune { namespace <isa> {` after
// vec_x86.h, with the TU defining
//   V          - vector traits (pixels along lanes)
//   nbv_max(R) - constexpr: vectors of pixels per register tile for R output channels
//   RMAX       - the tallest register tile (8 or 4 output channels)
//
// Micro-kernel f32_conv2d_q_<R>x<NBV*W>: an R (output channels) x NBV*W (q positions) tile of
// accumulators in registers. Per stored entry (one input channel x one tap, R weights): NBV
// contiguous input vectors are loaded once at the entry's precomputed offset and reused by the R
// broadcast weights. Entries of a block row are shared by all R-groups and all pixel tiles.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "sparseprune/conv.h"
#include "sparseprune/parallel.h"
#include "epilogue_simd.h"

#define SPC_INLINE inline __attribute__((always_inline))

// ReLU as the epilogue's act_v computes it (NaN kept: max's second operand), inline in a register tile
SPC_INLINE __m256 relu_max(__m256 a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
#ifdef __AVX512F__
SPC_INLINE __m512 relu_max(__m512 a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
#endif

// Where the lanes of one q vector go in an NCHW output row: lanes of `m` to dst + off + lane.
struct QSeg {
  typename V::M m;
  int64_t off;
  bool full;  // all W lanes, in order: a plain store (AVX2's masked store costs several times more)
};
constexpr int kMaxSeg = V::W + 1;

// Segments of the vectors of a tile starting at q (wq-wide q rows, wo valid columns, row stride ys2).
inline void q_segments(int64_t q, int nv, int64_t wq, int64_t wo, int64_t ys2, QSeg* segs, int* nseg) {
  constexpr int W = V::W;
  int64_t oh = q / wq, ow = q % wq;
  for (int v = 0; v < nv; ++v) {
    int n = 0, l = 0;
    while (l < W) {
      const int run = static_cast<int>(std::min<int64_t>(W - l, wq - ow));
      const int valid = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(run, wo - ow)));
      if (valid > 0) segs[v * kMaxSeg + n++] = QSeg{V::mrange(l, l + valid), oh * ys2 + ow - l, valid == W};
      l += run;
      ow += run;
      if (ow == wq) {
        ow = 0;
        ++oh;
      }
    }
    nseg[v] = n;
  }
}

// The store of a q tile (residual, activation, NCHW segments): the accumulators come through `acc` (R x NBV
// vectors, row i's vector v at acc + (i * NBV + v) * W).
template <int R, int NBV, bool MASK, int MODE>
SPC_INLINE void q_store_rows(const float* __restrict acc, int act, int rows, int tail, float* __restrict dst,
                             int64_t ldd, const QSeg* segs, const int* nseg, const float* __restrict rdst) {
  using T = typename V::T;
  constexpr int W = V::W;
  for (int i = 0; i < R; ++i) {
    if (i >= rows) break;
    for (int v = 0; v < NBV; ++v) {
      T a = V::load(acc + (i * NBV + v) * W);
      if (rdst) {  // the residual, laid out as dst: the same lanes and offsets
        if constexpr (MODE == 1) {
          for (int k = 0; k < nseg[v]; ++k) {
            const QSeg& sg = segs[v * kMaxSeg + k];
            const float* rp = rdst + i * ldd + sg.off;
            a = V::add(a, sg.full ? V::load(rp) : V::load_m(rp, sg.m));
          }
        } else {
          const float* rp = rdst + i * ldd + v * W;
          a = V::add(a, (MASK && v == NBV - 1) ? V::loadn(rp, tail) : V::load(rp));
        }
      }
      if (act) a = act_v(a, act);
      if constexpr (MODE == 1) {
        for (int k = 0; k < nseg[v]; ++k) {
          const QSeg& sg = segs[v * kMaxSeg + k];
          if (sg.full) V::store(dst + i * ldd + sg.off, a);
          else V::store_m(dst + i * ldd + sg.off, a, sg.m);
        }
      } else {
        if (MASK && v == NBV - 1) V::storen(dst + i * ldd + v * W, a, tail);
        else V::store(dst + i * ldd + v * W, a);
      }
    }
  }
}

// The same, out of line. Inlined into the AVX-512 tile, the activation's calls made GCC keep about 10 of the
// 24 accumulators of the 8 x 48 tile on the stack for the whole entry loop (a load, fma and store per entry
// for each; objdump showed 27 stack operands in the 24-FMA loop, none now).
template <int R, int NBV, bool MASK, int MODE>
__attribute__((noinline)) void q_tile_store(const float* __restrict acc, int act, int rows, int tail,
                                            float* __restrict dst, int64_t ldd, const QSeg* segs, const int* nseg,
                                            const float* __restrict rdst) {
  q_store_rows<R, NBV, MASK, MODE>(acc, act, rows, tail, dst, ldd, segs, nseg, rdst);
}

// MODE 0: row i of the tile is stored at dst + i*ldd (contiguous q == output positions, or a scratch
// tile). MODE 1: NCHW rows through the segments (dst = first output channel's plane, ldd = ys1).
template <int R, int NBV, bool MASK, int MODE, class Idx>
SPC_INLINE void q_tile(const float* __restrict xq, const int32_t* __restrict kofs, const Idx* __restrict cols,
                       const float* __restrict vals, int rk, int64_t e0, int64_t e1, const float* bias,
                       int act, int rows, int tail, float* __restrict dst, int64_t ldd, const QSeg* segs,
                       const int* nseg, const float* __restrict rdst) {
  using T = typename V::T;
  constexpr int W = V::W;
  T acc[R][NBV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const T bv = V::set1(bias && i < rows ? bias[i] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NBV; ++v) acc[i][v] = bv;
  }
  for (int64_t e = e0; e < e1; ++e) {
    const float* xp = xq + kofs[cols[e]];
    const float* we = vals + e * rk;
    T xv[NBV];
#pragma GCC unroll 8
    for (int v = 0; v < NBV; ++v)
      xv[v] = (MASK && v == NBV - 1) ? V::loadn(xp + v * W, tail) : V::load(xp + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const T wv = V::set1(we[i]);
#pragma GCC unroll 8
      for (int v = 0; v < NBV; ++v) acc[i][v] = V::fma(wv, xv[v], acc[i][v]);
    }
  }
  if constexpr (MODE == 0) {
    // plain rows (no residual, no activation or ReLU): straight from the registers. On AVX2 the accumulators
    // otherwise went through the stack buffer below (12 stores and 12 loads more per 4 x 24 tile)
    if ((!act || act == kActRelu) && !rdst && rows == R) {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NBV; ++v) {
          const T a = act ? relu_max(acc[i][v]) : acc[i][v];
          if (MASK && v == NBV - 1) V::storen(dst + i * ldd + v * W, a, tail);
          else V::store(dst + i * ldd + v * W, a);
        }
      return;
    }
  }
  alignas(64) float out[R * NBV * W];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NBV; ++v) V::store(out + (i * NBV + v) * W, acc[i][v]);
  // AVX2 (16 registers, 4 x 24 tiles): inline, the buffer folds away and nothing spilled in the entry loop;
  // out of line its tiles ran 0-8% slower (Zen 5 with the AVX2 path forced)
  if constexpr (W >= 16) q_tile_store<R, NBV, MASK, MODE>(out, act, rows, tail, dst, ldd, segs, nseg, rdst);
  else q_store_rows<R, NBV, MASK, MODE>(out, act, rows, tail, dst, ldd, segs, nseg, rdst);
}

// A tile of nv (<= NBV) vectors, the last one holding `tail` lanes.
template <int R, int NBV, int MODE, class Idx>
SPC_INLINE void q_tile_n(int nv, int tail, const float* xq, const int32_t* kofs, const Idx* cols,
                         const float* vals, int rk, int64_t e0, int64_t e1, const float* bias, int act,
                         int rows, float* dst, int64_t ldd, const QSeg* segs, const int* nseg,
                         const float* rdst) {
  if constexpr (NBV > 1) {
    if (nv < NBV) {
      q_tile_n<R, NBV - 1, MODE, Idx>(nv, tail, xq, kofs, cols, vals, rk, e0, e1, bias, act, rows, dst, ldd, segs, nseg,
                                      rdst);
      return;
    }
  }
  if (tail == V::W)
    q_tile<R, NBV, false, MODE, Idx>(xq, kofs, cols, vals, rk, e0, e1, bias, act, rows, tail, dst, ldd, segs, nseg, rdst);
  else
    q_tile<R, NBV, true, MODE, Idx>(xq, kofs, cols, vals, rk, e0, e1, bias, act, rows, tail, dst, ldd, segs, nseg, rdst);
}

// The residual element that goes with output element p (BsrView::res_bytes), or null without one.
inline const float* res_of(const BsrView& w, const float* p) {
  return w.has_res ? residual_at(p, w.res_bytes) : nullptr;
}

struct QCall {
  const ConvGeom* g;
  const ConvQLayout* q;
  const BsrView* w;
  const int32_t* kofs;
  const float* x;       // q-domain input of image 0
  int64_t x_img;        // its image stride
  const float* bias;
  float* y;
  int mode;             // 0: q positions are output positions (wq == wo, NCHW); 1: NCHW rows; 2: other
  bool prefilled;       // the empty block rows' output planes were written before (conv_q's fill pass)
};

// Mode 2 (output not NCHW, e.g. channels_last): copy tile rows [0, rows) x q positions [q, q + cnt)
// from tmp (row stride NB) to y pixel by pixel, dropping the columns ow >= wo; with a residual, tmp holds
// the sums before the activation, and the residual and the activation are applied here.
inline void scatter_tile(const QCall& c, float* yimg, int64_t co0, int rows, int64_t q, int cnt,
                         const float* tmp, int nb) {
  const BsrView& w = *c.w;
  const ConvGeom& g = *c.g;
  const int64_t wq = c.q->wq;
  int64_t oh = q / wq, ow = q % wq;
  // channels_last (a pixel's channels contiguous): 8 q positions x 8 channels by one transpose where the 8
  // are valid columns of one output row, one 32-byte store per pixel instead of 8 scalar ones
  // (and 4 channels, the AVX2 tile's height: 16-byte stores)
  const bool t8 = g.ys[1] == 1 && (rows == 8 || rows == 4);
  for (int p = 0; p < cnt; ++p) {
    if (t8 && p + 8 <= cnt && ow + 8 <= g.wo) {
      float* yp = yimg + co0 + oh * g.ys[2] + ow * g.ys[3];
      const int64_t ps = g.ys[3];
      if (rows == 4) {
        // 4 x 8 -> 8 pixels x 4 channels: u[j] holds pixel j (low half) and pixel 4 + j (high half)
        const __m256 r0 = _mm256_loadu_ps(tmp + p), r1 = _mm256_loadu_ps(tmp + nb + p);
        const __m256 r2 = _mm256_loadu_ps(tmp + 2 * nb + p), r3 = _mm256_loadu_ps(tmp + 3 * nb + p);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
        for (int j = 0; j < 4; ++j) {
          float* lo = yp + j * ps;
          float* hi = yp + (4 + j) * ps;
          __m256 v = u[j];
          if (w.has_res)
            v = act_v(_mm256_add_ps(v, _mm256_set_m128(_mm_loadu_ps(res_of(w, hi)), _mm_loadu_ps(res_of(w, lo)))), w.act);
          _mm_storeu_ps(lo, _mm256_castps256_ps128(v));
          _mm_storeu_ps(hi, _mm256_extractf128_ps(v, 1));
        }
      } else if (!w.has_res) {
        transpose8x8(tmp + p, nb, yp, ps);
      } else {
        alignas(32) float b[64];
        transpose8x8(tmp + p, nb, b, 8);
        for (int k = 0; k < 8; ++k) {
          float* yk = yp + k * ps;
          _mm256_storeu_ps(yk, act_v(_mm256_add_ps(_mm256_load_ps(b + 8 * k), _mm256_loadu_ps(res_of(w, yk))), w.act));
        }
      }
      p += 7;  // and the loop's ++p
      ow += 8;
      if (ow == wq) {
        ow = 0;
        ++oh;
      }
      continue;
    }
    if (ow < g.wo) {
      float* yp = yimg + co0 * g.ys[1] + oh * g.ys[2] + ow * g.ys[3];
      if (w.has_res) {
        const float* rp = res_of(w, yp);
        for (int i = 0; i < rows; ++i) yp[i * g.ys[1]] = act_scalar(tmp[i * nb + p] + rp[i * g.ys[1]], w.act);
      } else {
        for (int i = 0; i < rows; ++i) yp[i * g.ys[1]] = tmp[i * nb + p];
      }
    }
    if (++ow == wq) {
      ow = 0;
      ++oh;
    }
  }
}

// One output channel plane of n floats whose block row has no entries: act(bias [+ the residual]), one store
// per vector. The tile path spent ~3 memory operations and a call per vector on these (accumulators to a buffer,
// the out-of-line store), most of a 90%-sparse 1x1 conv's tiles.
inline void fill_plane(float* y, int64_t n, float bias, int act, const BsrView* res) {
  using T = typename V::T;
  constexpr int W = V::W;
  const T b = V::set1(bias);
  if (!res) {
    const T v = act_v(b, act);
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
      V::store(y + j, v);
      V::store(y + j + W, v);
      V::store(y + j + 2 * W, v);
      V::store(y + j + 3 * W, v);
    }
    for (; j + W <= n; j += W) V::store(y + j, v);
    if (j < n) {  // the tail by scalar stores: AVX2's masked store took ~70% of a small plane's fill (Zen 4)
      alignas(64) float t[W];
      V::store(t, v);
      for (int64_t i = 0; j + i < n; ++i) y[j + i] = t[i];
    }
  } else {
    const float* rr = residual_at(y, res->res_bytes);
    int64_t j = 0;
    for (; j + W <= n; j += W) V::store(y + j, act_v(V::add(b, V::load(rr + j)), act));
    if (j < n) {
      alignas(64) float t[W] = {};
      for (int64_t i = 0; j + i < n; ++i) t[i] = rr[j + i];
      V::store(t, act_v(V::add(b, V::load(t)), act));
      for (int64_t i = 0; j + i < n; ++i) y[j + i] = t[i];
    }
  }
}

template <int R, class Idx>
void q_rows(const QCall& c, const Idx* cols, const float* xg, float* yimg, int64_t br, int64_t co0, int i0,
            int rows, int64_t qa, int64_t qb) {
  constexpr int W = V::W;
  constexpr int NBV = nbv_max(R);
  constexpr int NB = NBV * W;
  const BsrView& w = *c.w;
  const int64_t e0 = w.row_ptr[br], e1 = w.row_ptr[br + 1];
  const float* vals = w.values + i0;
  const float* bias = c.bias ? c.bias + co0 + i0 : nullptr;
  alignas(64) float tmp[R * NB];
  QSeg segs[NBV * kMaxSeg];
  int nseg[NBV];
  float* yc = yimg + (co0 + i0) * c.g->ys[1];
  if (e0 == e1 && c.prefilled) return;  // written by conv_q's fill pass
  for (int64_t q = qa; q < qb; q += NB) {
    const int cnt = static_cast<int>(std::min<int64_t>(NB, qb - q));
    const int nv = (cnt + W - 1) / W;
    const int tail = cnt - (nv - 1) * W;
    if (c.mode == 0) {
      q_tile_n<R, NBV, 0, Idx>(nv, tail, xg + q, c.kofs, cols, vals, w.r, e0, e1, bias, w.act, rows, yc + q, c.g->ys[1],
                               nullptr, nullptr, res_of(w, yc + q));
    } else if (c.mode == 1) {
      q_segments(q, nv, c.q->wq, c.g->wo, c.g->ys[2], segs, nseg);
      if (tail != W) {  // lanes past qb belong to the next thread's range (or past the end)
        const typename V::M keep = V::mrange(0, tail);
        for (int k = 0; k < nseg[nv - 1]; ++k) {
          segs[(nv - 1) * kMaxSeg + k].m &= keep;
          segs[(nv - 1) * kMaxSeg + k].full = false;  // lanes dropped: the masked store
        }
      }
      q_tile_n<R, NBV, 1, Idx>(nv, tail, xg + q, c.kofs, cols, vals, w.r, e0, e1, bias, w.act, rows, yc, c.g->ys[1],
                               segs, nseg, res_of(w, yc));
    } else {  // the residual and activation, if any, in scatter_tile
      q_tile_n<R, NBV, 0, Idx>(nv, tail, xg + q, c.kofs, cols, vals, w.r, e0, e1, bias, w.has_res ? 0 : w.act, rows,
                               tmp, NB, nullptr, nullptr, nullptr);
      scatter_tile(c, yimg, co0 + i0, rows, q, cnt, tmp, NB);
    }
  }
}

// One thread's share: images [n0, n1), block rows [br0, br1), q positions [qa, qb).
template <class Idx>
void q_range(const QCall& c, const Idx* cols, int64_t n0, int64_t n1, int64_t br0, int64_t br1, int64_t qa,
             int64_t qb) {
  const ConvGeom& g = *c.g;
  const BsrView& w = *c.w;
  // q positions per pass: keep the input rows they touch (all input channels) within ~256 KiB
  constexpr int NBQ = nbv_max(RMAX) * V::W;
  const int64_t halo = (static_cast<int64_t>(g.dh) * (g.kh - 1) / g.sh + 1) * c.q->wq;
  int64_t qblk = (int64_t(1) << 16) / std::max<int64_t>(1, g.cin_g()) - halo;
  qblk = std::max<int64_t>(2 * NBQ, qblk / NBQ * NBQ);
  for (int64_t n = n0; n < n1; ++n) {
    const float* ximg = c.x + n * c.x_img;
    float* yimg = c.y + n * g.ys[0];
    for (int64_t q0 = qa; q0 < qb; q0 += qblk) {
      const int64_t q1 = std::min(qb, q0 + qblk);
      for (int64_t br = br0; br < br1; ++br) {
        const int64_t co0 = br * w.r;
        const int rows = static_cast<int>(std::min<int64_t>(w.r, g.c_out - co0));
        const float* xg = ximg + (co0 / g.cout_g()) * g.cin_g() * c.q->plane;
        int i0 = 0;
        while (i0 < rows) {
          const int left = rows - i0;
          if (left >= RMAX) {
            q_rows<RMAX, Idx>(c, cols, xg, yimg, br, co0, i0, RMAX, q0, q1);
            i0 += RMAX;
          } else if (RMAX > 4 && left >= 4) {
            q_rows<4, Idx>(c, cols, xg, yimg, br, co0, i0, 4, q0, q1);
            i0 += 4;
          } else if (left >= 2) {
            q_rows<2, Idx>(c, cols, xg, yimg, br, co0, i0, std::min(left, 2), q0, q1);
            i0 += 2;
          } else {
            q_rows<1, Idx>(c, cols, xg, yimg, br, co0, i0, 1, q0, q1);
            i0 += 1;
          }
        }
      }
    }
  }
}

// conv_pack_input's transpose for channels_last inputs (vec_x86.h's, out of line: it is called through a pointer)
inline void conv_transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) { transpose8x8(src, lds, dst, ldd); }

template <class Idx>
void conv_q(const ConvGeom& g, const BsrView& w, const Idx* cols, const float* x, const float* bias, float* y,
            float* ws, int num_threads) {
  if (g.n == 0 || g.c_out == 0 || g.ho <= 0 || g.wo <= 0) return;
  const ConvQLayout q = conv_q_layout(g);
  const int nt = threads_for(g.n * q.lq * (w.nnzb() * w.r + g.c_out), num_threads);
  std::vector<int32_t> kofs(static_cast<size_t>(std::max<int64_t>(1, g.cin_g() * g.taps())));
  conv_column_offsets(g, q, kofs.data());
  const int mode = g.ys[3] != 1 ? 2 : (g.ys[2] == q.wq && q.wq == g.wo) ? 0 : 1;
  // The input channels some weight reads (groups == 1): the packing skips the rest. At 90% in 16x16 blocks a conv
  // with 8 block rows leaves ~40% of its input channels unread (0.9^8), 3x3/2 128->128 @56 for one.
  // Only where a channel's columns sit in at most 2 block rows on average (else few go unread: 3x3 512 @7 at 90%
  // has 3.2, 3%; the walk over its 15k entries cost more than it saved, 0.96x).
  std::vector<uint8_t> used_ch;
  if (!q.direct && g.groups == 1 && g.c_in >= 8 && g.c_in * g.taps() <= UINT32_MAX &&
      w.row_ptr[w.block_rows] <= 2 * g.c_in * g.taps()) {
    used_ch.assign(static_cast<size_t>(g.c_in), 0);
    const uint32_t T = static_cast<uint32_t>(g.taps());
    int64_t seen = 0;
    for (int64_t br = 0; br < w.block_rows && seen < g.c_in; ++br) {
      uint32_t start = 1, end = 0;  // the columns of the last channel met (a row's columns come channel by channel)
      for (int64_t e = w.row_ptr[br]; e < w.row_ptr[br + 1]; ++e) {
        const uint32_t k = static_cast<uint32_t>(cols[e]);
        if (k >= start && k < end) continue;
        const uint32_t ci = k / T;
        start = ci * T;
        end = start + T;
        seen += !used_ch[ci];
        used_ch[ci] = 1;
      }
    }
    if (seen == g.c_in) used_ch.clear();
  }
  const uint8_t* used = used_ch.empty() ? nullptr : used_ch.data();
  QCall c{&g, &q, &w, kofs.data(), q.direct ? x : ws, q.direct ? g.xs[0] : g.c_in * q.plane, bias, y, mode, false};
  // Work items for dynamic scheduling (a thread that the OS parks on a shared machine delays its
  // items, not the whole call): whole images when there are enough, else about 4 items per thread
  // over the larger of input (q ranges, aligned to full register tiles) and weight (block rows,
  // balanced by non-zeros).
  constexpr int NBQ = nbv_max(RMAX) * V::W;
  const int64_t xfloats = g.c_in * q.plane, wfloats = w.nnzb() * w.r;
  const int64_t qtiles = (q.lq + NBQ - 1) / NBQ;
  int64_t pi = 1, pn = 1, pm = 1;
  if (g.n >= nt) {
    pi = g.n;
  } else {
    const int64_t want = nt == 1 ? 1 : 4 * nt;
    if ((xfloats >= wfloats && qtiles >= want) || w.block_rows < nt) {
      pn = std::max<int64_t>(1, std::min<int64_t>(want, qtiles));
    } else {
      pm = std::max<int64_t>(1, std::min<int64_t>(want, w.block_rows));
      pn = std::max<int64_t>(1, std::min<int64_t>(want / pm, qtiles));
    }
    pi = g.n;
  }
  // Band mode (q split, NCHW-like input): each work item packs the input rows of a band of output
  // rows into its thread's slice of the workspace right before computing it, so the padded copy
  // stays in L2 instead of going out to memory and back.
  const int64_t ext = static_cast<int64_t>(g.dh) * (g.kh - 1) / g.sh;
  const int64_t per_row = g.c_in * g.sh * g.sw * q.wq;
  int64_t th = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, per_row) - ext);
  if (nt > 1) th = std::min<int64_t>(th, (g.ho + 2 * nt - 1) / (2 * nt));
  ConvQLayout qt = q;
  qt.hq = th + ext;
  qt.plane = static_cast<int64_t>(g.sh) * g.sw * qt.hq * q.wq;
  // (channels_last inputs too: their rows go in by 8x8 transposes, conv_pack_rows)
  const bool band = !q.direct && (!(g.xs[1] == 1 && g.c_in > 1) || g.sw <= 8) && pm == 1 && th < g.ho &&
                    nt * g.c_in * qt.plane <= q.ws_floats;
  // NCHW output with contiguous channel planes: the output channels of empty block rows (most of them in a
  // 90%-sparse conv with few block rows) are filled first, plane by plane, an even share of the planes per thread
  // (memset-like streams; in the tiles they were short row pieces, ~40% of a 1x1 64->256 @56 call at 90%).
  std::vector<int64_t> empty_ch;
  if (mode != 2 && g.ys[3] == 1 && g.ys[2] == g.wo && g.ys[1] == g.ho * g.wo) {
    for (int64_t br = 0; br < w.block_rows; ++br)
      if (w.row_ptr[br] == w.row_ptr[br + 1])
        for (int64_t co = br * w.r; co < std::min<int64_t>((br + 1) * w.r, g.c_out); ++co) empty_ch.push_back(co);
    c.prefilled = true;
  }
  const int64_t nfill = g.n * static_cast<int64_t>(empty_ch.size()), plane = g.ho * g.wo;
  auto prefill = [&] {  // inside the team: the tiles that follow do not touch these planes
    if (nfill == 0) return;
    // an even static share per thread, walked without a division per plane (two 64-bit divisions a plane were
    // most of a small conv's fixed cost: ~1 us of a 1x1 64->256 call on one pixel)
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = static_cast<int64_t>(empty_ch.size());
    const int64_t f0 = nfill * tid / nth, f1 = nfill * (tid + 1) / nth;
    int64_t n = f0 / per, k = f0 % per;
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t co = empty_ch[static_cast<size_t>(k)];
      fill_plane(y + n * g.ys[0] + co * g.ys[1], plane, bias ? bias[co] : 0.0f, w.act, w.has_res ? &w : nullptr);
      if (++k == per) {
        k = 0;
        ++n;
      }
    }
  };
  if (band) {
    std::vector<int32_t> kofs_t(kofs.size());
    conv_column_offsets(g, qt, kofs_t.data());
    const int64_t bands = (g.ho + th - 1) / th;
    parallel_team(nt, [&] {
      float* buf = ws + omp_get_thread_num() * g.c_in * qt.plane;
      prefill();
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < g.n * bands; ++it) {
        const int64_t n = it / bands, oh0 = (it % bands) * th;
        const int64_t rows = std::min(th, g.ho - oh0);
        conv_pack_rows(g, qt, x + n * g.xs[0], buf, oh0, conv_transpose8x8, used);
        QCall ct = c;
        ct.q = &qt;
        ct.kofs = kofs_t.data();
        ct.x = buf;
        ct.x_img = 0;
        ct.y = y + oh0 * g.ys[2];
        q_range<Idx>(ct, cols, n, n + 1, 0, w.block_rows, 0, (rows - 1) * q.wq + g.wo);
      }
    });
    return;
  }
  const int64_t items = pi * pn * pm;
  parallel_team(nt, [&] {
  conv_pack_input(g, q, x, ws, conv_transpose8x8, used);  // one fork/join for packing and compute
  prefill();
  // guided: each thread starts on a contiguous run of items (half of them for the first), smaller pieces only at
  // the end, so a parked thread still hands its tail over. dynamic,1 dealt the q ranges out alternately, and two
  // threads writing interleaved 392-pixel pieces of every output row ran 1x1 64->256 @56 at 80-90% 1.27x slower
  // (Zen 4, 2 threads; the same as static with one item per thread)
#pragma omp for schedule(guided)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t ii = it / (pn * pm), in = (it / pm) % pn, im = it % pm;
    const int64_t br0 = balanced_split(w.row_ptr, w.block_rows, static_cast<int>(pm), static_cast<int>(im));
    const int64_t br1 = balanced_split(w.row_ptr, w.block_rows, static_cast<int>(pm), static_cast<int>(im + 1));
    const int64_t qa = std::min(q.lq, qtiles * in / pn * NBQ), qb = std::min(q.lq, qtiles * (in + 1) / pn * NBQ);
    if (br0 < br1 && qa < qb) q_range<Idx>(c, cols, ii, ii + 1, br0, br1, qa, qb);
  }
  });
}

inline void conv_entry(const ConvGeom& g, const BsrView& w, const float* x, const float* bias, float* y,
                       float* ws, int num_threads) {
  if (w.idx16) conv_q(g, w, static_cast<const uint16_t*>(w.col_idx), x, bias, y, ws, num_threads);
  else conv_q(g, w, static_cast<const int32_t*>(w.col_idx), x, bias, y, ws, num_threads);
}
