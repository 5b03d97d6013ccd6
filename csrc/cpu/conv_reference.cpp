// Sparse Conv2d: the q-domain helpers shared by every ISA path (input packing, column offsets) and
// the scalar reference kernels (forward and input gradient), which read the input through its
// strides with explicit bounds checks and share nothing with the fast path but the packed weight.
#include <algorithm>
#include <cstring>
#include <vector>

#include "sparseprune/conv.h"
#include "sparseprune/parallel.h"

namespace sparseprune {

ConvQLayout conv_q_layout(const ConvGeom& g) {
  ConvQLayout q;
  // rows / columns of the padded input that any output reads
  const int64_t hp = (g.ho - 1) * g.sh + static_cast<int64_t>(g.dh) * (g.kh - 1) + 1;
  const int64_t wp = (g.wo - 1) * g.sw + static_cast<int64_t>(g.dw) * (g.kw - 1) + 1;
  q.direct = g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && hp <= g.h && wp <= g.w &&
             g.xs[3] == 1 && g.xs[2] == g.w && g.xs[1] >= g.h * g.w;
  if (q.direct) {
    q.hq = g.h;
    q.wq = g.w;
    q.plane = g.xs[1];
    q.ws_floats = 0;
  } else {
    q.hq = (hp + g.sh - 1) / g.sh;
    q.wq = (wp + g.sw - 1) / g.sw;
    q.plane = static_cast<int64_t>(g.sh) * g.sw * q.hq * q.wq;
    q.ws_floats = g.n * g.c_in * q.plane;
  }
  q.lq = (g.ho - 1) * q.wq + g.wo;
  return q;
}

namespace {
// Columns s of a phase row with iw = s*sw + px - pl inside [0, w): [lo, hi).
void phase_cols(const ConvGeom& g, const ConvQLayout& q, int px, int64_t* lo, int64_t* hi) {
  const int64_t a = g.pl - px;  // iw >= 0  <=>  s >= ceil(a / sw)
  const int64_t s_lo = a <= 0 ? 0 : (a + g.sw - 1) / g.sw;
  const int64_t b = g.w - 1 + g.pl - px;  // iw <= w-1  <=>  s <= floor(b / sw)
  const int64_t s_last = b >= 0 ? b / g.sw : -1;
  *lo = std::min<int64_t>(q.wq, s_lo);
  *hi = std::max<int64_t>(*lo, std::min<int64_t>(q.wq, s_last + 1));
}
}  // namespace

// Phase rows [r0, r0 + q.hq) of one channel (xc: its first element) into dst (q.plane floats).
static void pack_channel(const ConvGeom& g, const ConvQLayout& q, const float* xc, float* dst, int64_t r0,
                         const int64_t* lo, const int64_t* hi, bool interior) {
  const int64_t phase_sz = q.hq * q.wq;
  for (int py = 0; py < g.sh; ++py)
    for (int px = 0; px < g.sw; ++px) {
      // phases no tap reads are left alone (a 1x1 stride-2 conv reads one phase of four)
      bool used_y = false, used_x = false;
      for (int i = 0; i < g.kh && !used_y; ++i) used_y = (i * g.dh) % g.sh == py;
      for (int j = 0; j < g.kw && !used_x; ++j) used_x = (j * g.dw) % g.sw == px;
      if (!used_y || !used_x) continue;
      float* ph = dst + (static_cast<int64_t>(py) * g.sw + px) * phase_sz;
      int64_t s_lo, s_hi;
      if (px < 8) s_lo = lo[px], s_hi = hi[px];
      else phase_cols(g, q, px, &s_lo, &s_hi);
      for (int64_t r = 0; r < q.hq; ++r) {
        float* row = ph + r * q.wq;
        const int64_t ih = (r0 + r) * g.sh + py - g.pt;
        if (ih < 0 || ih >= g.h) {
          for (int64_t s = 0; s < q.wq; ++s) row[s] = 0.0f;
          continue;
        }
        for (int64_t s = 0; s < s_lo; ++s) row[s] = 0.0f;
        for (int64_t s = s_hi; s < q.wq; ++s) row[s] = 0.0f;
        if (!interior) continue;
        const float* xr = xc + ih * g.xs[2];
        const float* src = xr + (px - g.pl) * g.xs[3];
        if (g.sw == 1 && g.xs[3] == 1) {
          for (int64_t s = s_lo; s < s_hi; ++s) row[s] = src[s];
        } else if (g.sw == 2 && g.xs[3] == 1) {  // constant stride: the compiler deinterleaves
          for (int64_t s = s_lo; s < s_hi; ++s) row[s] = src[2 * s];
        } else {
          for (int64_t s = s_lo; s < s_hi; ++s) row[s] = xr[(s * g.sw + px - g.pl) * g.xs[3]];
        }
      }
    }
}

// channels_last input: one input row's pixels of stride phase px, columns [lo, hi) of the phase row, into the
// phase row drow of channel 0 (channel c at drow + c * q.plane): the channels of a pixel are contiguous, so
// 8 pixels x 8 channels go through one 8x8 transpose t8 (whole 32-byte pieces of 8 channel rows written per
// transpose, where one float per channel row per pixel took ~10x the NCHW packing, 3x3 256@14); without t8,
// or for what is left, one pixel at a time.
// Its channels are taken 8 at a time; `used` (or null: all) skips the groups of 8 that no weight reads.
static bool used8(const uint8_t* used, int64_t c) {
  uint64_t u;
  std::memcpy(&u, used + c, 8);
  return u != 0;
}

static void pack_row_cl(const ConvGeom& g, const ConvQLayout& q, const float* xrow, float* drow, int px, int64_t lo,
                        int64_t hi, Transpose8x8Fn t8, const uint8_t* used) {
  const int64_t lds = g.sw * g.xs[3];  // from one pixel of this phase row to the next
  auto pixel = [&](int64_t s) { return xrow + (s * g.sw + px - g.pl) * g.xs[3]; };
  int64_t s = lo;
  if (t8) {
    const int64_t c8 = g.c_in / 8 * 8;
    auto block = [&](int64_t s0) {
      const float* src = pixel(s0);
      float* d = drow + s0;
      for (int64_t c = 0; c < c8; c += 8)
        if (!used || used8(used, c)) t8(src + c, lds, d + c * q.plane, q.plane);
      for (int64_t c = c8; c < g.c_in; ++c)
        for (int k = 0; k < 8; ++k) d[c * q.plane + k] = src[k * lds + c];
    };
    for (; s + 8 <= hi; s += 8) block(s);
    if (s < hi && hi - lo >= 8) {  // the last 8 pixels again, overlapping (same values)
      block(hi - 8);
      s = hi;
    } else if (s < hi && s + 8 <= q.wq) {
      // fewer than 8 pixels in the row (7x7 maps): the pixels through an 8x8 buffer whose other rows
      // are zero, transposed into the plane as 8 columns: the ones past hi are padding, zero anyway
      const int k = static_cast<int>(hi - s);
      const float* src = pixel(s);
      float* d = drow + s;
      alignas(32) float a[64] = {};
      for (int64_t c = 0; c < c8; c += 8) {
        if (used && !used8(used, c)) continue;
        for (int i = 0; i < k; ++i) std::memcpy(a + 8 * i, src + i * lds + c, 32);
        t8(a, 8, d + c * q.plane, q.plane);
      }
      for (int64_t c = c8; c < g.c_in; ++c)
        for (int i = 0; i < k; ++i) d[c * q.plane + i] = src[i * lds + c];
      s = hi;
    }
  }
  for (; s < hi; ++s) {
    const float* src = pixel(s);
    float* d = drow + s;
    for (int64_t c = 0; c < g.c_in; ++c) d[c * q.plane] = src[c];
  }
}

void conv_pack_rows(const ConvGeom& g, const ConvQLayout& qt, const float* x_img, float* dst, int64_t r0,
                    Transpose8x8Fn t8, const uint8_t* used) {
  int64_t lo[8], hi[8];
  for (int px = 0; px < g.sw && px < 8; ++px) phase_cols(g, qt, px, &lo[px], &hi[px]);
  const bool cl = t8 && g.xs[1] == 1 && g.c_in > 1 && g.sw <= 8;
  // channels_last: the zero padding per channel first, then the pixels row by row through transposes
  for (int64_t c = 0; c < g.c_in; ++c)
    if (!used || used[c]) pack_channel(g, qt, x_img + c * g.xs[1], dst + c * qt.plane, r0, lo, hi, !cl);
  if (!cl) return;
  const int64_t phase_sz = qt.hq * qt.wq;
  for (int py = 0; py < g.sh; ++py)
    for (int64_t r = 0; r < qt.hq; ++r) {
      const int64_t ih = (r0 + r) * g.sh + py - g.pt;
      if (ih < 0 || ih >= g.h) continue;
      for (int px = 0; px < g.sw; ++px)
        pack_row_cl(g, qt, x_img + ih * g.xs[2], dst + (py * g.sw + px) * phase_sz + r * qt.wq, px, lo[px], hi[px], t8,
                    used);
    }
}

void conv_pack_input(const ConvGeom& g, const ConvQLayout& q, const float* x, float* ws, Transpose8x8Fn t8,
                     const uint8_t* used) {
  if (q.direct) return;
  const int64_t nc = g.n * g.c_in;
  const int64_t phase_sz = q.hq * q.wq;
  int64_t lo[8], hi[8];  // strides above 8 take the generic bounds per row
  for (int px = 0; px < g.sw && px < 8; ++px) phase_cols(g, q, px, &lo[px], &hi[px]);
  // channels_last input: the channels of one pixel are contiguous, so walk pixels and spread the
  // channels (reads stay sequential); NCHW: walk each channel's rows.
  const bool cl = g.xs[1] == 1 && g.c_in > 1 && g.sw <= 8;
  {
#pragma omp for schedule(dynamic, 8)
    for (int64_t u = 0; u < nc; ++u) {
      const int64_t n = u / g.c_in, c = u % g.c_in;
      if (used && !used[c]) continue;
      pack_channel(g, q, x + n * g.xs[0] + c * g.xs[1], ws + u * q.plane, 0, lo, hi, !cl);
    }
    if (cl) {
      const int64_t rows = g.n * g.sh * q.hq;
#pragma omp for schedule(dynamic, 4)
      for (int64_t u = 0; u < rows; ++u) {
        const int64_t n = u / (g.sh * q.hq), py = (u / q.hq) % g.sh, r = u % q.hq;
        const int64_t ih = r * g.sh + py - g.pt;
        if (ih < 0 || ih >= g.h) continue;
        const float* xrow = x + n * g.xs[0] + ih * g.xs[2];
        float* drow0 = ws + n * g.c_in * q.plane + r * q.wq;
        for (int px = 0; px < g.sw; ++px)
          pack_row_cl(g, q, xrow, drow0 + (py * g.sw + px) * phase_sz, px, lo[px], hi[px], t8, used);
      }
    }
  }
}

void conv_column_offsets(const ConvGeom& g, const ConvQLayout& q, int32_t* kofs) {
  const int64_t T = g.taps();
  std::vector<int64_t> toff(static_cast<size_t>(T));  // divisions once per tap, not per column
  for (int i = 0; i < g.kh; ++i)
    for (int j = 0; j < g.kw; ++j) {
      const int64_t ri = static_cast<int64_t>(i) * g.dh, rj = static_cast<int64_t>(j) * g.dw;
      const int64_t phase = (ri % g.sh) * g.sw + (rj % g.sw);
      toff[i * g.kw + j] = phase * q.hq * q.wq + (ri / g.sh) * q.wq + rj / g.sw;
    }
  for (int64_t ci = 0; ci < g.cin_g(); ++ci)
    for (int64_t t = 0; t < T; ++t) kofs[ci * T + t] = static_cast<int32_t>(ci * q.plane + toff[t]);
}

namespace {
struct Tap {
  int64_t ci;
  int i, j;
};
std::vector<Tap> column_taps(const ConvGeom& g) {
  const int64_t T = g.taps();
  std::vector<Tap> t(static_cast<size_t>(g.cin_g() * T));
  for (int64_t k = 0; k < g.cin_g() * T; ++k)
    t[k] = Tap{k / T, static_cast<int>((k % T) / g.kw), static_cast<int>(k % g.kw)};
  return t;
}
}  // namespace

void f32_conv2d_direct__scalar(const ConvGeom& g, const BsrView& w, const float* x, const float* bias,
                               float* y, float* /*workspace*/, int num_threads) {
  const auto taps = column_taps(g);
  const int rk = w.r;
  const int64_t work = g.n * g.ho * g.wo * (w.nnzb() * rk + g.c_out);
  const int nt = threads_for(work, num_threads);
#pragma omp parallel for num_threads(fork_safe_threads(nt)) schedule(dynamic, 1) collapse(2)
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t br = 0; br < w.block_rows; ++br) {
      const int64_t co0 = br * rk;
      const int rows = static_cast<int>(std::min<int64_t>(rk, g.c_out - co0));
      const int64_t cbase = (co0 / g.cout_g()) * g.cin_g();
      const float* xn = x + n * g.xs[0];
      for (int ii = 0; ii < rows; ++ii) {
        float* yc = y + n * g.ys[0] + (co0 + ii) * g.ys[1];
        for (int64_t oh = 0; oh < g.ho; ++oh)
          for (int64_t ow = 0; ow < g.wo; ++ow) {
            float acc = bias ? bias[co0 + ii] : 0.0f;
            for (int64_t e = w.row_ptr[br]; e < w.row_ptr[br + 1]; ++e) {
              const Tap& t = taps[w.block_col(e)];
              const int64_t ih = oh * g.sh - g.pt + static_cast<int64_t>(t.i) * g.dh;
              const int64_t iw = ow * g.sw - g.pl + static_cast<int64_t>(t.j) * g.dw;
              if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
              acc += w.values[e * rk + ii] * xn[(cbase + t.ci) * g.xs[1] + ih * g.xs[2] + iw * g.xs[3]];
            }
            float* yp = yc + oh * g.ys[2] + ow * g.ys[3];
            if (w.has_res)  // the residual element at the same place relative to its own base
              acc += *residual_at(yp, w.res_bytes);
            *yp = act_scalar(acc, w.act);
          }
      }
    }
}

// dx[n, c, ih, iw] = sum over (co, tap) with ih = oh*sh - pt + i*dh ... of W * dy. Each thread owns
// a range of (image, input channel) pairs and scans every entry, so no two threads write one dx.
// All ISA paths share this one (training is not the speed target).
void f32_conv2d_input_grad__scalar(const ConvGeom& g, const BsrView& w, const float* dy, float* dx,
                                   int num_threads) {
  const auto taps = column_taps(g);
  const int rk = w.r;
  const int64_t units = g.n * g.c_in;
  const int64_t work = g.n * g.ho * g.wo * (w.nnzb() * rk + g.c_in);
  const int nt = static_cast<int>(std::min<int64_t>(threads_for(work, num_threads), std::max<int64_t>(units, 1)));
#pragma omp parallel num_threads(fork_safe_threads(nt))
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t u0 = units * tid / nth, u1 = units * (tid + 1) / nth;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / g.c_in, c = u % g.c_in;
      float* dxc = dx + n * g.xs[0] + c * g.xs[1];
      for (int64_t ih = 0; ih < g.h; ++ih)
        for (int64_t iw = 0; iw < g.w; ++iw) dxc[ih * g.xs[2] + iw * g.xs[3]] = 0.0f;
    }
    for (int64_t br = 0; br < w.block_rows; ++br) {
      const int64_t co0 = br * rk;
      const int rows = static_cast<int>(std::min<int64_t>(rk, g.c_out - co0));
      const int64_t cbase = (co0 / g.cout_g()) * g.cin_g();
      for (int64_t e = w.row_ptr[br]; e < w.row_ptr[br + 1]; ++e) {
        const Tap& t = taps[w.block_col(e)];
        const int64_t c = cbase + t.ci;
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t u = n * g.c_in + c;
          if (u < u0 || u >= u1) continue;
          float* dxc = dx + n * g.xs[0] + c * g.xs[1];
          for (int ii = 0; ii < rows; ++ii) {
            const float wv = w.values[e * rk + ii];
            const float* dyc = dy + n * g.ys[0] + (co0 + ii) * g.ys[1];
            for (int64_t oh = 0; oh < g.ho; ++oh) {
              const int64_t ih = oh * g.sh - g.pt + static_cast<int64_t>(t.i) * g.dh;
              if (ih < 0 || ih >= g.h) continue;
              for (int64_t ow = 0; ow < g.wo; ++ow) {
                const int64_t iw = ow * g.sw - g.pl + static_cast<int64_t>(t.j) * g.dw;
                if (iw < 0 || iw >= g.w) continue;
                dxc[ih * g.xs[2] + iw * g.xs[3]] += wv * dyc[oh * g.ys[2] + ow * g.ys[3]];
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace sparseprune
