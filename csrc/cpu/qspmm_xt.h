// Quantized X^T tiles for thin blocks (r < 8 outputs a block: 1 x 4, 2 x 4, 4 x 4, 1 x 8, ...), int8 and bf16.
// Included at the end of qspmm_simd.h (inside the ISA namespace, after every Op).
//
// The row tiles (q_tile) vectorise along a block's r outputs: a 1 x 4 block fills one lane in eight (AVX2),
// one in sixteen (AVX-512), and int8 1 x 4 ran slower than fp32 CSR. Here the tile is turned around, as the
// fp32 xt family (spmm_simd.h) turns it: one 8-lane vector holds one k-group word of 8 rows of X -- the
// row kernels' panels already lay X out that way, word g of row j at panel[g * ps + j] -- and the weight
// word is the broadcast operand, one per block output and k-group, shared by the panel's 24 rows (3
// vectors). Each accumulator is one output over 8 rows: a group of 8 outputs (8 / r block rows) is
// written to a small buffer, turned by 8 x 8 transposes, and stored through the row kernels' epilogue
// (QStore, the same operations in the same order), so int8 results are bit-identical to the row kernels
// and to the reference; bf16 sums the two k of a word in the row kernels' order.
//
// Op's X^T members (the QXtS8 / QXtBF16 bases in qspmm_simd.h): XT (accumulator, 8 lanes), XW (a prepared weight
// word), xprep(word), xdot(acc, x, w), xbits / xfrom, XStore (the 8-wide epilogue). Taken for every r < 8
// (q_xt_use); blocks of 8 or more rows only when forced (SPARSEPRUNE_QXT=1), 8 outputs of a block row a group.
#pragma once
#if defined(__AVX2__)

// Outputs [i0, i0 + RK) of every block of one block row (r outputs a block, gpb k-groups) over NV vectors of
// 8 panel rows: sums into out[i][v * 8 ..] (int32 or fp32 bits). PS, R: the panel stride (24) and the block's
// r when known at compile time (0: run time); with run-time strides GCC kept them in stack slots, reloaded
// every block (18 instructions a 1 x 4 block for 9 multiply-adds).
template <class Op, int RK, int NV, bool G1, int PS, int R, class Idx>
__attribute__((noinline)) void q_xt_outputs(const uint32_t* __restrict xp, int64_t ps_rt, int r_rt, int gpb, int i0,
                            const uint32_t* __restrict vals, const Idx* __restrict cols, int64_t b0, int64_t b1,
                            uint32_t* __restrict out, int64_t ld_out) {
  using T = typename Op::XT;
  const int64_t ps = PS ? PS : ps_rt;
  const int r = R ? R : r_rt;
  T acc[RK][NV];
#pragma GCC unroll 2
  for (int i = 0; i < RK; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = Op::xzero();
  const int gb = G1 ? 1 : gpb;
  const int64_t bw = static_cast<int64_t>(gb) * r;  // words per block
  const int64_t xs = gb * ps;                       // panel words per block column
  const uint32_t* wb = vals + b0 * bw + i0;
  for (int64_t b = b0; b < b1; ++b, wb += bw) {
    const uint32_t* xb = xp + static_cast<int64_t>(cols[b]) * xs;
    for (int g = 0; g < gb; ++g) {
      __m256i xv[NV];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v)
        xv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + g * ps + 8 * v));
#pragma GCC unroll 2
      for (int i = 0; i < RK; ++i) {
        const typename Op::XW wv = Op::xprep(wb[g * r + i]);
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[i][v] = Op::xdot(acc[i][v], xv[v], wv);
      }
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < RK; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + i * ld_out + 8 * v), Op::xbits(acc[i][v]));
}

// The group of outputs [m0, m0 + outs) summed in tmp (row i: output m0 + i over the panel's rows), transposed
// 8 x 8 and stored into Y (rows [0, nv) of the panel, its first row `row`) through the epilogue.
template <class Op, int NV>
SQ_INLINE void q_xt_store(const uint32_t (&tmp)[8][24], int nv, int outs, int64_t m0, const QBsrView& w,
                          const float* bias, QEpi& e, int row, float* y, int64_t ldy) {
  using Store = typename Op::XStore;
  if (Op::S8) {
    e.comp = w.comp + m0;
    e.ws = w.wscale + m0;
  }
  e.bias = bias ? bias + m0 : nullptr;
#pragma GCC unroll 1
  for (int v = 0; v < NV; ++v) {
    const int rows = std::min(8, nv - 8 * v);
    if (rows <= 0) break;
    __m256i t[8];
    for (int j = 0; j < 8; ++j) t[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[j] + 8 * v));
    transpose8x8_epi32(t);  // t[j]: row 8v + j of X, outputs m0 .. m0 + 8
    typename Op::XT s[8][1];
    for (int j = 0; j < 8; ++j) s[j][0] = Op::xfrom(t[j]);
    float* yy = y + static_cast<int64_t>(8 * v) * ldy + m0;
    if (rows == 8 && outs == 8) {
      Store::rows(yy, ldy, s, 0, e, row + 8 * v);
    } else {
      for (int j = 0; j < rows; ++j) {
        if constexpr (Op::S8) Store::s8(yy + j * ldy, s[j][0], outs, e, row + 8 * v + j);
        else Store::f(yy + j * ldy, s[j][0], outs, e, row + 8 * v + j);
      }
    }
  }
}

// Rows [0, nv) of one panel (ps words a k-group) times block rows [br0, br1), in groups of at most 8 outputs:
// 8 / r whole block rows (r < 8), or 8 outputs of one block row (r >= 8).
template <class Op, int NV, bool G1, int PS, int R, class Idx>
SQ_INLINE void q_xt_groups(const uint32_t* xp, int64_t ps, int nv, const QBsrView& w, const Idx* cols, int64_t br0,
                           int64_t br1, const int32_t* zp, const float* sx, const float* bias, int row, float* y,
                           int64_t ldy) {
  const int r = R ? R : w.r, gpb = w.c / Op::G;
  alignas(32) uint32_t tmp[8][24] = {};  // rows past a short group stay zero (transposed, never stored)
  QEpi e = q_epi(w, zp, sx);
  // outputs [i0, i1) of block row br into tmp from row o
  auto sums = [&](int64_t br, int i0, int i1, int o) {
    const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
    int i = i0;
    for (; i + 2 <= i1; i += 2)
      q_xt_outputs<Op, 2, NV, G1, PS, R>(xp, ps, r, gpb, i, w.values, cols, b0, b1, tmp[o + i - i0], 24);
    if (i < i1) q_xt_outputs<Op, 1, NV, G1, PS, R>(xp, ps, r, gpb, i, w.values, cols, b0, b1, tmp[o + i - i0], 24);
  };
  if (r < 8) {
    const int gb = 8 / r;  // block rows per group
    for (int64_t br = br0; br < br1; br += gb) {
      const int ng = static_cast<int>(std::min<int64_t>(gb, br1 - br));
      for (int q = 0; q < ng; ++q) sums(br + q, 0, r, q * r);
      const int64_t m0 = br * r;
      const int outs = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(ng) * r, w.rows - m0));
      q_xt_store<Op, NV>(tmp, nv, outs, m0, w, bias, e, row, y, ldy);
    }
  } else {
    for (int64_t br = br0; br < br1; ++br) {
      for (int i0 = 0; i0 < r; i0 += 8) {
        const int i1 = std::min(r, i0 + 8);
        sums(br, i0, i1, 0);
        const int64_t m0 = br * r + i0;
        const int outs = static_cast<int>(std::min<int64_t>(i1 - i0, w.rows - m0));
        if (outs > 0) q_xt_store<Op, NV>(tmp, nv, outs, m0, w, bias, e, row, y, ldy);
      }
    }
  }
}

// Y's rows of one panel for block rows [br0, br1): the tile height and the strides as constants where they can be.
template <class Op, int NV, int PS, class Idx>
SQ_INLINE void q_xt_pick(const uint32_t* xp, int64_t ps, int nv, const QBsrView& w, const Idx* cols, int64_t br0,
                         int64_t br1, const int32_t* zp, const float* sx, const float* bias, int row, float* y,
                         int64_t ldy) {
  const bool g1 = w.c == Op::G;  // one k-group a block (1 x 4 int8, 1 x 2 bf16)
#define SQ_XT(G1, R) q_xt_groups<Op, NV, G1, PS, R>(xp, ps, nv, w, cols, br0, br1, zp, sx, bias, row, y, ldy)
  if (g1) {
    if (w.r == 1) SQ_XT(true, 1); else if (w.r == 2) SQ_XT(true, 2); else if (w.r == 4) SQ_XT(true, 4);
    else SQ_XT(true, 0);
  } else {
    if (w.r == 1) SQ_XT(false, 1); else if (w.r == 2) SQ_XT(false, 2); else if (w.r == 4) SQ_XT(false, 4);
    else SQ_XT(false, 0);
  }
#undef SQ_XT
}

template <class Op, class Idx>
__attribute__((noinline)) void q_xt_panel(const uint32_t* xp, int64_t ps, int nv, const QBsrView& w, const Idx* cols,
                                          int64_t br0, int64_t br1, const int32_t* zp, const float* sx,
                                          const float* bias, int row, float* y, int64_t ldy) {
  if (nv > 16) {
    if (ps == QPW) q_xt_pick<Op, 3, QPW>(xp, ps, nv, w, cols, br0, br1, zp, sx, bias, row, y, ldy);
    else q_xt_pick<Op, 3, 0>(xp, ps, nv, w, cols, br0, br1, zp, sx, bias, row, y, ldy);
  } else if (nv > 8) {
    q_xt_pick<Op, 2, 0>(xp, ps, nv, w, cols, br0, br1, zp, sx, bias, row, y, ldy);
  } else {
    q_xt_pick<Op, 1, 0>(xp, ps, nv, w, cols, br0, br1, zp, sx, bias, row, y, ldy);
  }
}

#endif  // __AVX2__
