// Quantized BSR micro-kernels shared by the x86 translation units (int8 and bf16, every ISA).
// Include inside `namespace sparseprune { namespace <isa> {` after defining one or more Op traits:
//   T, WP              accumulator vector; prepared weights of one k-group (W outputs)
//   W, MR, G, S8       lanes (outputs), tallest register tile, k per word, int8 (else bf16)
//   zero(), loadw(p), loadw_n(p, n), dot(acc, word, wp), add(a, b)
//   store(y, acc, n, Epi, row)  the epilogue: int8 rescale + compensation, or bias only
// Register tile: MR rows of X x W outputs of one block row. Per k-group: one weight vector, MR
// broadcasts of a 32-bit word of packed X, MR dot instructions; accumulators stay in registers
// over the whole block row. X is quantized / rounded once per call into panels of PW rows.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"
#include "sparseprune/qkernels.h"
#include "epilogue_simd.h"

#define SQ_INLINE inline __attribute__((always_inline))

constexpr int QPW = 24;  // rows of X per panel; every MR divides it
// The tiles whose block body is written in assembly (Op::kAsm): 24 / 16 / 8 rows of 24-row panels and
// 16 / 8 rows of 16-row panels (decode batches of 16), 16-wide blocks; every other tile is the intrinsics loop.
constexpr bool q_asm_tile(int mr, int ps) {
  return (ps == 24 && (mr == 24 || mr == 16 || mr == 8)) || (ps == 16 && (mr == 16 || mr == 8));
}

// Epilogue operands for one chunk of W outputs (pointers already offset to the chunk / panel).
struct QEpi {
  const int32_t* zp = nullptr;    // per row of X (int8)
  const float* sx = nullptr;      // per row of X (int8)
  const int32_t* comp = nullptr;  // per output (int8)
  const float* ws = nullptr;      // per output (int8)
  const float* bias = nullptr;    // per output, may be null
  int act = kActNone;             // fused activation, after the bias
  bool res = false;               // add the residual res_bytes on from each output element, before act
  int64_t res_bytes = 0;
};

// The operands shared by every tile of a product: X's per-row quantization, the activation, the residual.
inline QEpi q_epi(const QBsrView& w, const int32_t* zp, const float* sx) {
  QEpi e;
  e.zp = zp;
  e.sx = sx;
  e.act = w.act;
  e.res = w.has_res;
  e.res_bytes = w.res_bytes;
  return e;
}

inline uint32_t* q_scratch(size_t words) {
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < words + 16) buf.resize(words + 16);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint32_t*>((p + 63) & ~uintptr_t(63));
}

// PS, GPB: the panel height and k-groups per block when known at compile time (0: run time). With both
// known (full 24-row panels, 16-wide blocks) every X word of a block sits at a constant offset from one
// pointer; with run-time strides GCC kept a pointer per row and spilled accumulators.
// RV: weight vectors per row of the tile (RV * W outputs, RV > 1 only without TAIL). Two 8-wide vectors
// write a whole 64-byte line of Y per row: half lines at a stride of 4 * M bytes, the other half written
// a block row later, cost 2-5x a plain fill of Y (L1 set conflicts when 4 * M is a multiple of 4 KB).
template <class Op, int MR, bool TAIL, int A, int PS, int GPB, int RV, class Idx>
SQ_INLINE void q_tile(const uint32_t* __restrict xp, int64_t ps_rt, int r, int gpb_rt,
                      const uint32_t* __restrict vals, const Idx* __restrict cols, int64_t b0, int64_t b1, int tail,
                      const QEpi& e, int row, float* __restrict y, int64_t ldy) {
  using T = typename Op::T;
  static_assert(RV == 1 || !TAIL, "a tail chunk has one vector per row");
  const int64_t ps = PS ? PS : ps_rt;
  const int gpb = GPB ? GPB : gpb_rt;
  T acc[A][MR][RV];
#pragma GCC unroll 4
  for (int a = 0; a < A; ++a)
#pragma GCC unroll 24
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int v = 0; v < RV; ++v) acc[a][m][v] = Op::zero();
  const int64_t bw = static_cast<int64_t>(gpb) * r;  // words per block
  bool done = false;  // the block loop ran in assembly
#if defined(__AVX512F__)
  if constexpr (Op::kAsm && q_asm_tile(MR, PS) && A == 1 && RV == 1 && !TAIL && GPB * Op::G == 16) {
    // Fixed panels (24 or 16 rows) of 16 x 16 blocks: GCC 12 kept the 24 row offsets in stack slots and
    // copied and spilled the accumulators every k-group (0.6 dot instructions a cycle where the core
    // sustains 2); the block body is written out in assembly with the accumulators pinned in registers.
    if (r == Op::W) {
      for (int64_t b = b0; b < b1; ++b)
        Op::template block_asm<MR, PS>(acc[0], xp + static_cast<int64_t>(cols[b]) * GPB * PS, vals + b * bw);
      done = true;
    }
  }
#endif
  for (int64_t b = done ? b1 : b0; b < b1; ++b) {
    const uint32_t* xb = xp + static_cast<int64_t>(cols[b]) * gpb * ps;
    const uint32_t* wb = vals + b * bw;
    int g = 0;
    for (; g + A <= gpb; g += A) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) {
        typename Op::WP wv[RV];
#pragma GCC unroll 2
        for (int v = 0; v < RV; ++v)
          wv[v] = TAIL ? Op::loadw_n(wb + (g + a) * r, tail) : Op::loadw(wb + (g + a) * r + v * Op::W);
        const uint32_t* xg = xb + (g + a) * ps;
#pragma GCC unroll 24
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
          for (int v = 0; v < RV; ++v) acc[a][m][v] = Op::dot(acc[a][m][v], xg[m], wv[v]);
      }
    }
    for (; g < gpb; ++g) {
      typename Op::WP wv[RV];
#pragma GCC unroll 2
      for (int v = 0; v < RV; ++v)
        wv[v] = TAIL ? Op::loadw_n(wb + g * r, tail) : Op::loadw(wb + g * r + v * Op::W);
      const uint32_t* xg = xb + g * ps;
#pragma GCC unroll 24
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
        for (int v = 0; v < RV; ++v) acc[0][m][v] = Op::dot(acc[0][m][v], xg[m], wv[v]);
    }
  }
  QEpi ev[RV];
#pragma GCC unroll 2
  for (int v = 0; v < RV; ++v) {
    ev[v] = e;
    if (v) {
      if (e.comp) ev[v].comp += v * Op::W;
      if (e.ws) ev[v].ws += v * Op::W;
      if (e.bias) ev[v].bias += v * Op::W;
    }
  }
  T s[MR][RV];
#pragma GCC unroll 24
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 2
    for (int v = 0; v < RV; ++v) {
      s[m][v] = acc[0][m][v];
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) s[m][v] = Op::add(s[m][v], acc[a][m][v]);
    }
  }
#pragma GCC unroll 2
  for (int v = 0; v < RV; ++v) {
    if constexpr (TAIL) {
#pragma GCC unroll 24
      for (int m = 0; m < MR; ++m) Op::store(y + m * ldy, s[m][v], tail, ev[v], row + m);
    } else {
      Op::Store::rows(y + v * Op::W, ldy, s, v, ev[v], row);
    }
  }
}

template <class Op, int MR, bool TAIL, int PS, int GPB, int RV, class Idx>
SQ_INLINE void q_tile_a(const uint32_t* xp, int64_t ps, int r, int gpb, const uint32_t* vals, const Idx* cols,
                        int64_t b0, int64_t b1, int tail, const QEpi& e, int row, float* y, int64_t ldy) {
  // one or two rows of X (decode): independent accumulator chains hide the dot latency
  // (the same chains for any RV: a result does not depend on the tile width)
  constexpr int A = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  q_tile<Op, MR, TAIL, A, PS, GPB, RV>(xp, ps, r, gpb, vals, cols, b0, b1, tail, e, row, y, ldy);
}

// Rows [0, nv) of one panel for one chunk of RV * W outputs of one block row.
template <class Op, bool TAIL, int PS, int GPB, int RV, class Idx>
void q_rows(const uint32_t* xp, int64_t ps, int nv, int r, int gpb, const uint32_t* vals, const Idx* cols,
            int64_t b0, int64_t b1, int tail, const QEpi& e, int row0, float* y, int64_t ldy) {
  // two vectors per row: half the rows (the same accumulator count)
  constexpr int MR = RV == 1 ? Op::MR : Op::MR / RV;
  int i = 0;
  for (; i + MR <= nv; i += MR)
    q_tile_a<Op, MR, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
  if constexpr (MR > 16) {  // 16 rows (decode batches) in one pass over the weights, not two
    for (; i + 16 <= nv; i += 16)
      q_tile_a<Op, 16, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
  }
  if constexpr (MR > 8) {
    for (; i + 8 <= nv; i += 8)
      q_tile_a<Op, 8, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
  }
  if constexpr (MR > 4) {
    for (; i + 4 <= nv; i += 4)
      q_tile_a<Op, 4, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
  }
  const int rem = nv - i;
  if (rem & 2) {
    q_tile_a<Op, 2, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
    i += 2;
  }
  if (rem & 1) q_tile_a<Op, 1, TAIL, PS, GPB, RV>(xp + i, ps, r, gpb, vals, cols, b0, b1, tail, e, row0 + i, y + i * ldy, ldy);
}

#if defined(__AVX2__)
// 8 x 8 32-bit transpose in registers: r[j] lane i -> r[i] lane j.
SQ_INLINE void transpose8x8_epi32(__m256i (&r)[8]) {
  __m256i t[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    r[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
    r[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
    r[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
    r[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
  }
  // r[0..3]: rows 0-3 of lanes {0,4} {1,5} {2,6} {3,7}; r[4..7]: rows 4-7 likewise
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm256_permute2x128_si256(r[q], r[q + 4], 0x20);
    t[q + 4] = _mm256_permute2x128_si256(r[q], r[q + 4], 0x31);
  }
  for (int j = 0; j < 8; ++j) r[j] = t[j];
}
#endif

// words[j * ld + g] (8 rows j) -> dst[g * ps + j], for g in [0, 8 * (kg / 8)); returns that bound.
SQ_INLINE int64_t transpose8_words(const uint32_t* words, int64_t ld, int64_t kg, uint32_t* dst, int64_t ps) {
  int64_t g = 0;
#if defined(__AVX2__)
  for (; g + 8 <= kg; g += 8) {
    __m256i r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + j * ld + g));
    transpose8x8_epi32(r);  // r[q]: word g + q of rows 0-7
    for (int q = 0; q < 8; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (g + q) * ps), r[q]);
  }
#endif
  return g;
}

// Every block row of [br0, br1) for one panel of NV rows (QPW, or 16; X at xpp, its first row `row`, Y's rows at y)
// of 16-wide blocks in block rows of W outputs: the tiles inlined in one loop. Through q_rows each block row
// cost a call with 14 arguments and an epilogue struct built on the stack, next to a tile of ~5 blocks (90%,
// K = 768) at ~50 cycles a block.
template <class Op, int NV, class Idx>
__attribute__((noinline)) void q_panel(const uint32_t* __restrict xpp, const QBsrView& w, const Idx* cols, int64_t br0,
                                       int64_t br1, const int32_t* zp, const float* sx, const float* bias, int row,
                                       float* y, int64_t ldy) {
  constexpr int W = Op::W, G = Op::G, MR = NV < Op::MR ? NV : Op::MR;  // NV: the panel's rows (24, or 16)
  static_assert(NV % MR == 0, "register tiles must tile a panel");
  QEpi e = q_epi(w, zp, sx);
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t m0 = br * W;
    if (Op::S8) {
      e.comp = w.comp + m0;
      e.ws = w.wscale + m0;
    }
    e.bias = bias ? bias + m0 : nullptr;
    const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
#pragma GCC unroll 1
    for (int i = 0; i < NV; i += MR)
      q_tile_a<Op, MR, false, QPW, 16 / G, 1>(xpp + i, QPW, W, 16 / G, w.values, cols, b0, b1, W, e, row + i,
                                              y + m0 + i * ldy, ldy);
  }
}

// Whether a product takes the X^T tiles (qspmm_xt.h): blocks of fewer than 8 outputs, whose row tiles fill r of
// 8 or 16 lanes. AVX2, Zen 4, int8 against the row tiles: 1 x 4 6-11x (n = 13-196), 2.3-2.7x (n = 1); 4 x 4
// 2.0-3.4x (1.4x at n = 1); 8 x 8 and 16 x 16 through X^T tiles 0.8-1.07x: the row tiles stay there.
// SPARSEPRUNE_QXT=0 / 1 overrides (never / always), for experiments and tests; read once per process.
inline bool q_xt_use(int r) {
  static const char* force = std::getenv("SPARSEPRUNE_QXT");
  if (force) return force[0] == '1';
  return r < 8;
}

// The X^T tiles for thin blocks (qspmm_xt.h, included at the end of this file).
template <class Op, class Idx>
void q_xt_panel(const uint32_t* xp, int64_t ps, int nv, const QBsrView& w, const Idx* cols, int64_t br0, int64_t br1,
                const int32_t* zp, const float* sx, const float* bias, int row, float* y, int64_t ldy);

template <class Op, class Idx>
void q_spmm_run(const QBsrView& w, const Idx* cols, const void* x, XType xt, int64_t n, int64_t ldx,
                const float* bias, float* y, int64_t ldy, int num_threads) {
  constexpr int W = Op::W, G = Op::G;
  if (n <= 0 || w.rows <= 0) return;
  const int r = w.r, gpb = w.c / G;
  const int64_t kg = w.block_cols * gpb;  // k-groups of the zero-padded K
  const int64_t ps = n >= QPW ? QPW : n;  // rows per panel
  const int64_t units = (n + ps - 1) / ps;
  // int8 runs ~4 MACs per fp32 MAC's time: size the thread count by that work
  const int64_t work = n * (w.nnzb() * r * w.c / (Op::S8 ? 4 : 2) + w.rows + w.cols);
  const int nt = threads_for(work, num_threads);
  const bool fixed = ps == QPW && gpb * G == 16;  // the compile-time tiles: 24-row panels, 16-wide blocks
  const bool fixed16 = Op::kAsm && ps == 16 && gpb * G == 16;  // and 16-row panels (n = 16) in assembly
  const bool xt_tiles = q_xt_use(r);  // thin blocks: X^T tiles over the same panels
  // As for fp32 (spmm_simd.h, split_rows): split rows of X when each thread reading all of W costs less
  // than sharing quantized X panels across cores; each thread then packs only its own rows, no barrier.
  const int64_t w_words = w.nnzb() * r * gpb, x_words = n * kg;
  const bool by_rows = split_rows(w_words, x_words, units, nt, n >= QPW);
  const int pm = by_rows ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, w.block_rows)));
  const int pn = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt / pm, units)));
  // Split by rows, the threads take equal shares in whole chunks of 8 rows, not whole panels: 128 rows in
  // 24-row panels split 72 / 56 (the slower thread does 9/8 of the average). Each thread's panels then
  // start at its first row, in a region of its own from panel nn0 / ps + thread (pbase below): at most
  // one panel more per thread than the absolute layout.
  const int64_t chunks = (n + 7) / 8;  // rows are quantized and packed 8 at a time
  const int64_t panels = by_rows ? units + pn : units;
  uint32_t* xp = q_scratch(static_cast<size_t>(panels * kg * ps + 2 * n));
  int32_t* zp = reinterpret_cast<int32_t*>(xp + panels * kg * ps);
  float* sx = reinterpret_cast<float*>(zp + n);
  // One panel per pass, all of this thread's block rows inside it: consecutive tiles then write
  // neighbouring 64-byte pieces of the same rows of Y. (Block rows outside, panels inside wrote
  // columns of Y: every store a new page 4*M bytes on, L1-set and DTLB misses that cost more than
  // the whole sparse product at 90%.) The weights stream again per panel, from L2.
  const int64_t nc = ps;
  parallel_team(nt, [&] {
    // Rows are prepared 8 at a time (a chunk of 8 aligned rows never crosses a panel: ps is 24, or n
    // with one panel) and moved into the panel by 8x8 word transposes: one 32-byte store per 8 words,
    // where storing word by word (stride ps) cost as much as the whole product at 90%.
    thread_local std::vector<uint32_t> rowbuf;
    if (static_cast<int64_t>(rowbuf.size()) < 8 * kg + 8) rowbuf.resize(8 * kg + 8);
    // an implicit im2col (convolution) gathers each row into gbuf first: an L1-resident copy, where the
    // materialised im2col matrix (9x the image for 3x3) was written and read back through memory
    thread_local std::vector<float> gbuf;
    thread_local std::vector<uint16_t> gbuf16;
    if (w.im2col && xt == XType::f32 && static_cast<int64_t>(gbuf.size()) < w.cols) gbuf.resize(w.cols);
    if (w.im2col && xt == XType::bf16 && static_cast<int64_t>(gbuf16.size()) < w.cols) gbuf16.resize(w.cols);
    auto f32_row = [&](int64_t i) {
      return w.im2col ? im2col_row(*w.im2col, static_cast<const float*>(x), i, gbuf.data())
                      : static_cast<const float*>(x) + i * ldx;
    };
    auto bf16_row = [&](int64_t i) {
      return w.im2col ? im2col_row(*w.im2col, static_cast<const uint16_t*>(x), i, gbuf16.data())
                      : static_cast<const uint16_t*>(x) + i * ldx;
    };
    auto prep_row = [&](int64_t i, uint32_t* words) {
      if (Op::S8) {
        const QRowParams p = q_row_words(f32_row(i), w.cols, kg, words);
        zp[i] = p.zp;
        sx[i] = p.s;
      } else if (xt == XType::bf16) {
        bf16_row_words(nullptr, bf16_row(i), w.cols, kg, words);
      } else {
        bf16_row_words(f32_row(i), nullptr, w.cols, kg, words);
      }
    };
    // cnt rows of len words (row j at words + j * ld) into a panel at dst (word g of row j at dst[g * ps + j])
    auto to_panel = [&](const uint32_t* words, int64_t ld, int64_t len, int64_t cnt, uint32_t* dst) {
      int64_t g = 0;
      if (cnt == 8) g = transpose8_words(words, ld, len, dst, ps);
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t gg = g; gg < len; ++gg) dst[gg * ps + j] = words[j * ld + gg];
    };
    // rows [8c, min(8c + 8, n)) into the panels whose first row is row0, the first of them panel p0
    auto pack_chunk = [&](int64_t c, int64_t row0, int64_t p0) {
      const int64_t i0 = 8 * c, cnt = std::min<int64_t>(8, n - i0);
      uint32_t* words = rowbuf.data();
      uint32_t* dst = xp + (p0 + (i0 - row0) / ps) * kg * ps + (i0 - row0) % ps;
      // words [g0, kg) of every row (the zero padding included) through the row buffer: row_words(j, g0, out)
      // writes row j's, the 8-row paths below having put words [0, g0) straight into the panel
      auto rest = [&](int64_t g0, auto&& row_words) {
        if (g0 >= kg) return;
        for (int64_t j = 0; j < cnt; ++j) row_words(j, g0, words + j * (kg - g0));
        to_panel(words, kg - g0, kg - g0, cnt, dst + g0 * ps);
      };
      if (Op::S8 && !w.im2col) {
        // the ranges of all rows first: each row's reductions and divisions (~100 cycles of latency) then
        // overlap the next row's loads instead of stalling between its two passes
        QRowRange rr[8];
        for (int64_t j = 0; j < cnt; ++j) rr[j] = q_row_range(f32_row(i0 + j), w.cols);
        QRowParams pr[8];
        for (int64_t j = 0; j < cnt; ++j) {
          pr[j] = q_row_params(rr[j]);
          zp[i0 + j] = pr[j].zp;
          sx[i0 + j] = pr[j].s;
        }
        int64_t g0 = 0;
#if defined(__AVX512BW__)
        if (cnt == 8) {
          const float* rows[8];
          for (int j = 0; j < 8; ++j) rows[j] = f32_row(i0 + j);
          g0 = q_rows8_to_panel(rows, w.cols, pr, dst, ps);
        }
#endif
        rest(g0, [&](int64_t j, int64_t g, uint32_t* out) {
          q_row_quantize(f32_row(i0 + j) + 4 * g, w.cols - 4 * g, kg - g, pr[j], out);
        });
        return;
      }
#if defined(__AVX512BW__)
      if (!Op::S8 && !w.im2col && cnt == 8) {
        const float* rows[8] = {};
        const uint16_t* rows16[8] = {};
        for (int j = 0; j < 8; ++j) {
          if (xt == XType::bf16)
            rows16[j] = bf16_row(i0 + j);
          else
            rows[j] = f32_row(i0 + j);
        }
        rest(bf16_rows8_to_panel(rows, rows16, w.cols, dst, ps), [&](int64_t j, int64_t g, uint32_t* out) {
          bf16_row_words(rows[j] ? rows[j] + 2 * g : nullptr, rows16[j] ? rows16[j] + 2 * g : nullptr,
                         w.cols - 2 * g, kg - g, out);
        });
        return;
      }
#endif
      rest(0, [&](int64_t j, int64_t, uint32_t* out) { prep_row(i0 + j, out); });
    };
    // One shared panel (n <= 24, decode batches): the threads split its k-groups, not its rows. Split by
    // rows, two threads wrote halves of the same 64-byte lines of the panel (16 rows x 4 bytes a k-group):
    // 16x4096 int8 packing took 50 us on two cores, 5.6 us on one. Each thread finds the range of every
    // row (the cheap pass, repeated) and quantizes / transposes its own k-groups, in whole lines.
    auto pack_cols = [&](int t, int nthr) {
      const int64_t per = (kg + 16 * nthr - 1) / (16 * nthr) * 16;
      const int64_t g0 = std::min<int64_t>(kg, t * per), g1 = std::min<int64_t>(kg, g0 + per), len = g1 - g0;
      if (len <= 0) return;
      const int64_t k0 = g0 * (Op::S8 ? 4 : 2), kn = std::max<int64_t>(0, std::min<int64_t>(w.cols - k0, len * (Op::S8 ? 4 : 2)));
      for (int64_t i0 = 0; i0 < n; i0 += 8) {
        const int64_t cnt = std::min<int64_t>(8, n - i0);
        uint32_t* words = rowbuf.data();
        for (int64_t j = 0; j < cnt; ++j) {
          const int64_t i = i0 + j;
          if (Op::S8) {
            const QRowParams p = q_row_params(q_row_range(f32_row(i), w.cols));
            if (t == 0) {
              zp[i] = p.zp;
              sx[i] = p.s;
            }
            q_row_quantize(f32_row(i) + k0, kn, len, p, words + j * len);
          } else if (xt == XType::bf16) {
            bf16_row_words(nullptr, bf16_row(i) + k0, kn, len, words + j * len);
          } else {
            bf16_row_words(f32_row(i) + k0, nullptr, kn, len, words + j * len);
          }
        }
        to_panel(words, len, len, cnt, xp + g0 * ps + i0);
      }
    };
    if (!by_rows && units == 1 && nt > 1 && !w.im2col) {
      pack_cols(omp_get_thread_num(), nt);
#pragma omp barrier
    } else if (!by_rows) {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) pack_chunk(c, 0, 0);
    }
    const int tid = omp_get_thread_num();
    if (tid < pm * pn) {
      const int im = tid % pm, in = tid / pm;
      const int64_t br0 = balanced_split(w.row_ptr, w.block_rows, pm, im);
      const int64_t br1 = balanced_split(w.row_ptr, w.block_rows, pm, im + 1);
      // rows [nn0, nn1): whole chunks of 8 (by rows), or whole panels (shared panels)
      const int64_t step = by_rows ? 8 : ps, steps = by_rows ? chunks : units;
      const int64_t nn0 = std::min(n, steps * in / pn * step), nn1 = std::min(n, steps * (in + 1) / pn * step);
      // this thread's first panel: in its own region by rows, the absolute panel of row nn0 otherwise
      const int64_t pbase = nn0 / ps + (by_rows ? in : 0);
      if (by_rows) {
        // Each thread reads all of W from its own L2 once per panel; the first panel found it in L3 (another
        // layer ran in between) and waited on it. Fetched into L2 while packing (the quantize / round half of
        // which computes from L2), a share after each chunk of 8 rows.
        const int64_t c0 = nn0 / 8, c1 = (nn1 + 7) / 8;
        const char* wv = reinterpret_cast<const char*>(w.values);
        const int64_t wbytes = w.nnzb() * r * gpb * 4, share = c1 > c0 ? (wbytes / (c1 - c0) + 63) / 64 * 64 : 0;
        for (int64_t c = c0; c < c1; ++c) {
          pack_chunk(c, nn0, pbase);
          const int64_t o0 = (c - c0) * share, o1 = std::min(wbytes, o0 + share);
          for (int64_t o = o0; o < o1; o += 64) _mm_prefetch(wv + o, _MM_HINT_T1);
        }
      }
      for (int64_t a = nn0; a < nn1; a += nc) {
        const int64_t a1 = std::min(nn1, a + nc);
        if (xt_tiles) {
          const uint32_t* xpp = xp + (pbase + (a - nn0) / ps) * kg * ps;
          q_xt_panel<Op>(xpp, ps, static_cast<int>(a1 - a), w, cols, br0, br1, zp, sx, bias, static_cast<int>(a),
                         y + a * ldy, ldy);
          continue;
        }
        if (fixed && W == 16 && r == W && w.rows % W == 0) {  // whole block rows of a full or 16-row panel
          const uint32_t* xpp = xp + (pbase + (a - nn0) / ps) * kg * ps;
          if (a1 - a == QPW) {
            q_panel<Op, QPW>(xpp, w, cols, br0, br1, zp, sx, bias, static_cast<int>(a), y + a * ldy, ldy);
            continue;
          }
          if constexpr (Op::MR >= 16) {
            if (a1 - a == 16) {  // e.g. the last of 64 rows a thread (128 rows on two threads)
              q_panel<Op, 16>(xpp, w, cols, br0, br1, zp, sx, bias, static_cast<int>(a), y + a * ldy, ldy);
              continue;
            }
          }
        }
        for (int64_t br = br0; br < br1; ++br) {
          const int64_t m0 = br * r;
          const int rows = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
          const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
          for (int i0 = 0; i0 < rows;) {
            // W = 8: 16 outputs a tile where the block row has them (whole 64-byte lines of Y per row)
            const int rv = W == 8 && rows - i0 >= 2 * W ? 2 : 1;
            const int len = std::min(W, rows - i0);
            QEpi e = q_epi(w, zp, sx);
            if (Op::S8) {
              e.comp = w.comp + m0 + i0;
              e.ws = w.wscale + m0 + i0;
            }
            e.bias = bias ? bias + m0 + i0 : nullptr;
            const uint32_t* vv = w.values + i0;
            for (int64_t p0 = a; p0 < a1; p0 += ps) {
              const uint32_t* xpp = xp + (pbase + (p0 - nn0) / ps) * kg * ps;
              const int nv = static_cast<int>(std::min<int64_t>(ps, a1 - p0));
              float* yy = y + p0 * ldy + m0 + i0;
              const int row = static_cast<int>(p0);
              if (rv == 2) {
                if constexpr (W == 8) {
                  if (fixed)
                    q_rows<Op, false, QPW, 16 / G, 2>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
                  else
                    q_rows<Op, false, 0, 0, 2>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
                }
              } else if (len == W) {
                if (fixed)
                  q_rows<Op, false, QPW, 16 / G, 1>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
                else if (fixed16) {  // (false without kAsm: no 16-row instantiation for those)
                  if constexpr (Op::kAsm)
                    q_rows<Op, false, 16, 16 / G, 1>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
                } else
                  q_rows<Op, false, 0, 0, 1>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
              } else {
                q_rows<Op, true, 0, 0, 1>(xpp, ps, nv, r, gpb, vv, cols, b0, b1, len, e, row, yy, ldy);
              }
            }
            i0 += rv * W;
          }
        }
      }
    }
  });
}

template <class Op>
void q_spmm(const QBsrView& w, const void* x, XType xt, int64_t n, int64_t ldx, const float* bias, float* y,
            int64_t ldy, int num_threads) {
  if (w.idx16)
    q_spmm_run<Op>(w, static_cast<const uint16_t*>(w.col_idx), x, xt, n, ldx, bias, y, ldy, num_threads);
  else
    q_spmm_run<Op>(w, static_cast<const int32_t*>(w.col_idx), x, xt, n, ldx, bias, y, ldy, num_threads);
}

// ---------------------------------------------------------------------------------------------
// Shared epilogues over a float vector type V (V8 / V16 of vec_x86.h) and its int32 twin.
template <class V, class I, class Op>
struct QStore {
  static SQ_INLINE void s8(float* y, typename I::T acc, int n, const QEpi& e, int row) {
    using F = typename V::T;
    const bool full = n == V::W;
    typename I::T comp = full ? I::load(e.comp) : I::loadn(e.comp, n);
    typename I::T a = I::sub(acc, I::mullo(comp, I::set1(e.zp[row])));
    F ws = full ? V::load(e.ws) : V::loadn(e.ws, n);
    F v = V::mul(I::to_f(a), V::mul(V::set1(e.sx[row]), ws));
    if (e.bias) v = V::add(v, full ? V::load(e.bias) : V::loadn(e.bias, n));
    if (e.res) v = V::add(v, full ? V::load(residual_at(y, e.res_bytes)) : V::loadn(residual_at(y, e.res_bytes), n));
    if (e.act) v = act_v(v, e.act);
    if (full) V::store(y, v); else V::storen(y, v, n);
  }
  // Full-width rows [row, row + MR) of one tile (vector v of each): the per-output operands loaded once
  // and the bias / activation tests taken once, not per row; the same operations in the same order as
  // s8() / f() per row, so the results are bit-identical.
  template <bool BIAS, bool ACT, int MR, int RV, class T>
  static SQ_INLINE void s8_rows_(float* y, int64_t ldy, const T (&s)[MR][RV], int v, const QEpi& e, int row) {
    using F = typename V::T;
    const typename I::T comp = I::load(e.comp);
    const F ws = V::load(e.ws);
    F bias;
    if constexpr (BIAS) bias = V::load(e.bias);
    // one pointer each, constant offsets from it; the empty asm makes each of the four variants' pointers
    // its own value (GCC 12 hoisted the 48 addresses they share above the branch and kept them on the stack)
    const int32_t* zp = e.zp + row;
    const float* sx = e.sx + row;
    __asm__("" : "+r"(zp), "+r"(sx), "+r"(y));
#pragma GCC unroll 24
    for (int m = 0; m < MR; ++m) {
      const typename I::T a = I::sub(s[m][v], I::mullo(comp, I::set1(zp[m])));
      F r = V::mul(I::to_f(a), V::mul(V::set1(sx[m]), ws));
      if constexpr (BIAS) r = V::add(r, bias);
      if constexpr (ACT) {  // the out-of-line variant: a residual too
        if (e.res) r = V::add(r, V::load(residual_at(y, e.res_bytes)));
        r = act_v(r, e.act);
      }
      V::store(y, r);
      y += ldy;
    }
  }
  template <bool BIAS, bool ACT, int MR, int RV, class T>
  static SQ_INLINE void f_rows_(float* y, int64_t ldy, const T (&s)[MR][RV], int v, const QEpi& e) {
    typename V::T bias;
    if constexpr (BIAS) bias = V::load(e.bias);
    __asm__("" : "+r"(y));
#pragma GCC unroll 24
    for (int m = 0; m < MR; ++m) {
      typename V::T r = s[m][v];
      if constexpr (BIAS) r = V::add(r, bias);
      if constexpr (ACT) {  // the out-of-line variant: a residual too
        if (e.res) r = V::add(r, V::load(residual_at(y, e.res_bytes)));
        r = act_v(r, e.act);
      }
      V::store(y, r);
      y += ldy;
    }
  }
  // With an activation or a residual: out of line (its constants would push the accumulators of the plain
  // stores out of registers); the tile's sums then pass through memory, small next to the activation itself.
  template <int MR, int RV, class T>
  static __attribute__((noinline)) void rows_act(float* y, int64_t ldy, const T (&s)[MR][RV], int v, const QEpi& e,
                                                 int row) {
    if constexpr (Op::S8) {
      if (e.bias) s8_rows_<true, true>(y, ldy, s, v, e, row); else s8_rows_<false, true>(y, ldy, s, v, e, row);
    } else {
      if (e.bias) f_rows_<true, true>(y, ldy, s, v, e); else f_rows_<false, true>(y, ldy, s, v, e);
    }
  }
  template <int MR, int RV, class T>
  static SQ_INLINE void rows(float* y, int64_t ldy, const T (&s)[MR][RV], int v, const QEpi& e, int row) {
    if (e.act || e.res) {
      T c[MR][RV];  // a copy on this path only: s itself then never has its address taken
#pragma GCC unroll 24
      for (int m = 0; m < MR; ++m) c[m][v] = s[m][v];
      rows_act(y, ldy, c, v, e, row);
    } else if constexpr (Op::S8) {
      if (e.bias) s8_rows_<true, false>(y, ldy, s, v, e, row); else s8_rows_<false, false>(y, ldy, s, v, e, row);
    } else {
      if (e.bias) f_rows_<true, false>(y, ldy, s, v, e); else f_rows_<false, false>(y, ldy, s, v, e);
    }
  }
  static SQ_INLINE void f(float* y, typename V::T acc, int n, const QEpi& e, int) {
    const bool full = n == V::W;
    if (e.bias) acc = V::add(acc, full ? V::load(e.bias) : V::loadn(e.bias, n));
    if (e.res) acc = V::add(acc, full ? V::load(residual_at(y, e.res_bytes)) : V::loadn(residual_at(y, e.res_bytes), n));
    if (e.act) acc = act_v(acc, e.act);
    if (full) V::store(y, acc); else V::storen(y, acc, n);
  }
};

#if defined(__AVX2__)
struct QF8 {
  using T = __m256;
  static constexpr int W = 8;
  static SQ_INLINE __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static SQ_INLINE T set1(float v) { return _mm256_set1_ps(v); }
  static SQ_INLINE T load(const float* p) { return _mm256_loadu_ps(p); }
  static SQ_INLINE T loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static SQ_INLINE void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static SQ_INLINE void storen(float* p, T v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static SQ_INLINE T add(T a, T b) { return _mm256_add_ps(a, b); }
  static SQ_INLINE T mul(T a, T b) { return _mm256_mul_ps(a, b); }
};
struct QI8 {
  using T = __m256i;
  static SQ_INLINE T set1(int32_t v) { return _mm256_set1_epi32(v); }
  static SQ_INLINE T load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static SQ_INLINE T loadn(const void* p, int n) {
    return _mm256_maskload_epi32(static_cast<const int*>(p), QF8::mask(n));
  }
  static SQ_INLINE T sub(T a, T b) { return _mm256_sub_epi32(a, b); }
  static SQ_INLINE T mullo(T a, T b) { return _mm256_mullo_epi32(a, b); }
  static SQ_INLINE __m256 to_f(T a) { return _mm256_cvtepi32_ps(a); }
};

// The X^T tiles' members (qspmm_xt.h: a vector holds one k-group word of 8 rows of X, the weight word is
// broadcast), for every Op through one of these bases: XT (accumulator, 8 lanes), XW (a prepared weight word),
// xprep(word), xdot(acc, x, w), xbits / xfrom (to and from the 32-bit lanes), XStore (the 8-wide epilogue).
// int8 with vpmaddubsw + vpmaddwd (exact: 7-bit activations, see S8Maddubs8), or a vpdpbusd of the Op (DOT).
template <class Op>
struct QXtS8 {
  using XT = __m256i;
  using XW = __m256i;
  using XStore = QStore<QF8, QI8, Op>;
  static SQ_INLINE XT xzero() { return _mm256_setzero_si256(); }
  static SQ_INLINE XW xprep(uint32_t word) { return _mm256_set1_epi32(static_cast<int>(word)); }
  static SQ_INLINE __m256i xbits(XT a) { return a; }
  static SQ_INLINE XT xfrom(__m256i a) { return a; }
  static SQ_INLINE XT xdot(XT acc, __m256i x, XW w) {
    if constexpr (Op::kXtVnni) {
      return Op::xvnni(acc, x, w);
    } else {
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
      __asm__("" : "+x"(acc));  // as dot(): one register per accumulator
      return acc;
    }
  }
};
// bf16 widened to fp32 (odd k first, the order of vdpbf16ps), or a vdpbf16ps of the Op.
template <class Op>
struct QXtBF16 {
  using XT = __m256;
  struct XW { __m256 lo, hi; __m256i w; };
  using XStore = QStore<QF8, QI8, Op>;
  static SQ_INLINE XT xzero() { return _mm256_setzero_ps(); }
  static SQ_INLINE XW xprep(uint32_t word) {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(word));
    if constexpr (Op::kXtVnni) return {_mm256_setzero_ps(), _mm256_setzero_ps(), v};
    return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u)))), v};
  }
  static SQ_INLINE __m256i xbits(XT a) { return _mm256_castps_si256(a); }
  static SQ_INLINE XT xfrom(__m256i a) { return _mm256_castsi256_ps(a); }
  static SQ_INLINE XT xdot(XT acc, __m256i x, const XW& w) {
    if constexpr (Op::kXtVnni) {
      return Op::xvnni(acc, x, w.w);
    } else {
      const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
      return _mm256_fmadd_ps(xe, w.lo, _mm256_fmadd_ps(xo, w.hi, acc));
    }
  }
};

// int8 on AVX2: vpmaddubsw (u8 x s8 pairs -> s16) and vpmaddwd by ones (pairs of those -> s32). Exact:
// activations are 7-bit (kQMax, qspmm_pack.h), so a pair sum is at most 2 * 127 * 128 < 2^15 and never
// saturates. One broadcast and three ALU ops per 8 outputs x 4 k (splitting bytes into 16-bit halves for
// two vpmaddwd took six).
struct S8Maddubs8 : QXtS8<S8Maddubs8> {
  static constexpr bool kXtVnni = false;
  using T = __m256i;
  using WP = __m256i;
  static constexpr int W = 8, MR = 8, G = 4;
  static constexpr bool S8 = true;
  static constexpr bool kAsm = false;
  static SQ_INLINE T zero() { return _mm256_setzero_si256(); }
  static SQ_INLINE T add(T a, T b) { return _mm256_add_epi32(a, b); }
  static SQ_INLINE WP loadw(const uint32_t* p) { return QI8::load(p); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return QI8::loadn(p, n); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_set1_epi32(static_cast<int>(word)), w);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    // integer adds reassociate: without this GCC turned the unrolled chains into trees of products
    // and spilled them (the accumulator must stay one register per row)
    __asm__("" : "+x"(acc));
    return acc;
  }
  using Store = QStore<QF8, QI8, S8Maddubs8>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::s8(y, acc, n, e, row); }
};

// bf16 on AVX2 / FMA: widen both operands to fp32 (odd k first, the order of vdpbf16ps).
struct BF16Widen8 : QXtBF16<BF16Widen8> {
  static constexpr bool kXtVnni = false;
  using T = __m256;
  struct WP { __m256 lo, hi; };
  static constexpr int W = 8, MR = 8, G = 2;
  static constexpr bool S8 = false;
  static constexpr bool kAsm = false;
  static SQ_INLINE T zero() { return _mm256_setzero_ps(); }
  static SQ_INLINE T add(T a, T b) { return _mm256_add_ps(a, b); }
  static SQ_INLINE WP prep(__m256i v) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))))};
  }
  static SQ_INLINE WP loadw(const uint32_t* p) { return prep(QI8::load(p)); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return prep(QI8::loadn(p, n)); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    const __m256i xb = _mm256_set1_epi32(static_cast<int>(word));
    const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xb, 16));
    const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(xb, _mm256_set1_epi32(int(0xFFFF0000u))));
    return _mm256_fmadd_ps(xe, w.lo, _mm256_fmadd_ps(xo, w.hi, acc));
  }
  using Store = QStore<QF8, QI8, BF16Widen8>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::f(y, acc, n, e, row); }
};
#endif

#if defined(__AVXVNNI__)
// int8 with AVX-VNNI (VEX-encoded vpdpbusd on ymm).
struct S8Vnni8 : QXtS8<S8Vnni8> {
  static constexpr bool kXtVnni = true;
  static SQ_INLINE __m256i xvnni(__m256i acc, __m256i x, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, x, w); }
  using T = __m256i;
  using WP = __m256i;
  static constexpr int W = 8, MR = 12, G = 4;
  static constexpr bool S8 = true;
  static constexpr bool kAsm = false;
  static SQ_INLINE T zero() { return _mm256_setzero_si256(); }
  static SQ_INLINE T add(T a, T b) { return _mm256_add_epi32(a, b); }
  static SQ_INLINE WP loadw(const uint32_t* p) { return QI8::load(p); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return QI8::loadn(p, n); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    return _mm256_dpbusd_avx_epi32(acc, _mm256_set1_epi32(static_cast<int>(word)), w);
  }
  using Store = QStore<QF8, QI8, S8Vnni8>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::s8(y, acc, n, e, row); }
};
#endif

#if defined(__AVX512BW__)
struct QF16 {
  using T = __m512;
  static constexpr int W = 16;
  static SQ_INLINE __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static SQ_INLINE T set1(float v) { return _mm512_set1_ps(v); }
  static SQ_INLINE T load(const float* p) { return _mm512_loadu_ps(p); }
  static SQ_INLINE T loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static SQ_INLINE void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static SQ_INLINE void storen(float* p, T v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static SQ_INLINE T add(T a, T b) { return _mm512_add_ps(a, b); }
  static SQ_INLINE T mul(T a, T b) { return _mm512_mul_ps(a, b); }
};
struct QI16 {
  using T = __m512i;
  static SQ_INLINE T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static SQ_INLINE T load(const void* p) { return _mm512_loadu_si512(p); }
  static SQ_INLINE T loadn(const void* p, int n) { return _mm512_maskz_loadu_epi32(QF16::mask(n), p); }
  static SQ_INLINE T sub(T a, T b) { return _mm512_sub_epi32(a, b); }
  static SQ_INLINE T mullo(T a, T b) { return _mm512_mullo_epi32(a, b); }
  static SQ_INLINE __m512 to_f(T a) { return _mm512_cvtepi32_ps(a); }
};

// int8 on AVX-512BW without VNNI: vpmaddwd on 16-bit halves (vpmaddubsw, as on AVX2, would also be exact
// with 7-bit activations; not switched: no CPU here to run this path).
struct S8Madd16 : QXtS8<S8Madd16> {
  static constexpr bool kXtVnni = false;
  using T = __m512i;
  struct WP { __m512i lo, hi; };
  static constexpr int W = 16, MR = 12, G = 4;
  static constexpr bool S8 = true;
  static constexpr bool kAsm = false;
  static SQ_INLINE T zero() { return _mm512_setzero_si512(); }
  static SQ_INLINE T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static SQ_INLINE WP prep(__m512i v) { return {_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), _mm512_srai_epi16(v, 8)}; }
  static SQ_INLINE WP loadw(const uint32_t* p) { return prep(QI16::load(p)); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return prep(QI16::loadn(p, n)); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    const __m512i xb = _mm512_set1_epi32(static_cast<int>(word));
    const __m512i xl = _mm512_and_si512(xb, _mm512_set1_epi32(0x00FF00FF)), xh = _mm512_srli_epi16(xb, 8);
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(xl, w.lo), _mm512_madd_epi16(xh, w.hi)));
  }
  using Store = QStore<QF16, QI16, S8Madd16>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::s8(y, acc, n, e, row); }
};

// bf16 on AVX-512F without BF16: widen to fp32 (odd k first, the order of vdpbf16ps).
struct BF16Widen16 : QXtBF16<BF16Widen16> {
  static constexpr bool kXtVnni = false;
  using T = __m512;
  struct WP { __m512 lo, hi; };
  static constexpr int W = 16, MR = 12, G = 2;
  static constexpr bool S8 = false;
  static constexpr bool kAsm = false;
  static SQ_INLINE T zero() { return _mm512_setzero_ps(); }
  static SQ_INLINE T add(T a, T b) { return _mm512_add_ps(a, b); }
  static SQ_INLINE WP prep(__m512i v) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))))};
  }
  static SQ_INLINE WP loadw(const uint32_t* p) { return prep(QI16::load(p)); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return prep(QI16::loadn(p, n)); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    const __m512i xb = _mm512_set1_epi32(static_cast<int>(word));
    const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(xb, 16));
    const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(xb, _mm512_set1_epi32(int(0xFFFF0000u))));
    return _mm512_fmadd_ps(xe, w.lo, _mm512_fmadd_ps(xo, w.hi, acc));
  }
  using Store = QStore<QF16, QI16, BF16Widen16>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::f(y, acc, n, e, row); }
};
#endif


#if defined(__AVX512F__)
// The register tile's block body in assembly (24, 16 or 8 rows of X x one 16-wide block), in statements
// of 12 or 8 rows (an asm takes at most 30 operands; "+v" counts twice): per k-group (words of G k) one
// weight vector (zmm31, 64 bytes on) and one broadcast of the panel's word per row (PSB bytes of words per
// k-group: the panel height x 4) into zmm30, feeding one INS into that row's accumulator, pinned to a
// register by its "+v" operand.
#define SQ_A_DOT(INS, PSB, g, base, i) \
  "vpbroadcastd " #g "*" #PSB "+" #base "*4+" #i "*4(%[x]), %%zmm30\n\t" INS " %%zmm31, %%zmm30, %" #i "\n\t"
#define SQ_A_W(g) "vmovdqu64 " #g "*64(%[w]), %%zmm31\n\t"
#define SQ_A_KG8(INS, PSB, g, base)                                                                     \
  SQ_A_W(g) SQ_A_DOT(INS, PSB, g, base, 0) SQ_A_DOT(INS, PSB, g, base, 1) SQ_A_DOT(INS, PSB, g, base, 2) \
  SQ_A_DOT(INS, PSB, g, base, 3) SQ_A_DOT(INS, PSB, g, base, 4) SQ_A_DOT(INS, PSB, g, base, 5)            \
  SQ_A_DOT(INS, PSB, g, base, 6) SQ_A_DOT(INS, PSB, g, base, 7)
#define SQ_A_KG12(INS, PSB, g, base)                                                                       \
  SQ_A_KG8(INS, PSB, g, base) SQ_A_DOT(INS, PSB, g, base, 8) SQ_A_DOT(INS, PSB, g, base, 9)                 \
  SQ_A_DOT(INS, PSB, g, base, 10) SQ_A_DOT(INS, PSB, g, base, 11)
// all k-groups of a 16-wide block: 4 (int8, 4 k a word) or 8 (bf16, 2 k a word)
#define SQ_A_G4(KG, INS, PSB, base) KG(INS, PSB, 0, base) KG(INS, PSB, 1, base) KG(INS, PSB, 2, base) KG(INS, PSB, 3, base)
#define SQ_A_G8(KG, INS, PSB, base) \
  SQ_A_G4(KG, INS, PSB, base) KG(INS, PSB, 4, base) KG(INS, PSB, 5, base) KG(INS, PSB, 6, base) KG(INS, PSB, 7, base)
#define SQ_A_ACCS8(a, o)                                                                                   \
  "+v"(a[o + 0][0]), "+v"(a[o + 1][0]), "+v"(a[o + 2][0]), "+v"(a[o + 3][0]), "+v"(a[o + 4][0]),          \
      "+v"(a[o + 5][0]), "+v"(a[o + 6][0]), "+v"(a[o + 7][0])
#define SQ_A_ACCS12(a, o) SQ_A_ACCS8(a, o), "+v"(a[o + 8][0]), "+v"(a[o + 9][0]), "+v"(a[o + 10][0]), "+v"(a[o + 11][0])
#define SQ_A_STMT(BODY, ACCS) __asm__(BODY : ACCS : [x] "r"(x), [w] "r"(w) : "xmm30", "xmm31", "memory")
// The body of block_asm<MR, PS> for one instruction and k-group count (GN: SQ_A_G4 or SQ_A_G8).
#define SQ_A_BLOCK(GN, INS)                                                                       \
  if constexpr (MR == 24 && PS == 24) {                                                           \
    SQ_A_STMT(GN(SQ_A_KG12, INS, 96, 0), SQ_A_ACCS12(a, 0));                                      \
    SQ_A_STMT(GN(SQ_A_KG12, INS, 96, 12), SQ_A_ACCS12(a, 12));                                    \
  } else if constexpr (MR == 16 && PS == 24) {                                                    \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 96, 0), SQ_A_ACCS8(a, 0));                                        \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 96, 8), SQ_A_ACCS8(a, 8));                                        \
  } else if constexpr (MR == 8 && PS == 24) {                                                     \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 96, 0), SQ_A_ACCS8(a, 0));                                        \
  } else if constexpr (MR == 16 && PS == 16) {                                                    \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 64, 0), SQ_A_ACCS8(a, 0));                                        \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 64, 8), SQ_A_ACCS8(a, 8));                                        \
  } else if constexpr (MR == 8 && PS == 16) {                                                     \
    SQ_A_STMT(GN(SQ_A_KG8, INS, 64, 0), SQ_A_ACCS8(a, 0));                                        \
  }
#endif
#if defined(__AVX512VNNI__)
// int8 with AVX512-VNNI: one vpdpbusd = 16 outputs x 4 k.
struct S8Vnni16 : QXtS8<S8Vnni16> {
  static constexpr bool kXtVnni = true;
  static SQ_INLINE __m256i xvnni(__m256i acc, __m256i x, __m256i w) { return _mm256_dpbusd_epi32(acc, x, w); }
  using T = __m512i;
  using WP = __m512i;
  static constexpr int W = 16, MR = 24, G = 4;
  static constexpr bool S8 = true;
  static constexpr bool kAsm = true;
  static SQ_INLINE T zero() { return _mm512_setzero_si512(); }
  static SQ_INLINE T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static SQ_INLINE WP loadw(const uint32_t* p) { return QI16::load(p); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return QI16::loadn(p, n); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(static_cast<int>(word)), w);
  }
  // the planes tile (qspmm_planes.h): 16 pixels' words of X against one weight word, a {1to16} broadcast
  static SQ_INLINE T dot_bw(T acc, __m512i xv, const uint32_t* wp) {
    return _mm512_dpbusd_epi32(acc, xv, _mm512_set1_epi32(static_cast<int>(*wp)));
  }
  // vpdpbusd: the broadcast X words are the unsigned operand, the weights the signed one
  template <int MR, int PS>
  static SQ_INLINE void block_asm(T (&a)[MR][1], const uint32_t* x, const uint32_t* w) { SQ_A_BLOCK(SQ_A_G4, "vpdpbusd") }
  using Store = QStore<QF16, QI16, S8Vnni16>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::s8(y, acc, n, e, row); }
};
#endif

#if defined(__AVX512BF16__)
// bf16 with AVX512-BF16: one vdpbf16ps = 16 outputs x 2 k, fp32 accumulation.
struct BF16Dp16 : QXtBF16<BF16Dp16> {
  static constexpr bool kXtVnni = true;
  static SQ_INLINE __m256 xvnni(__m256 acc, __m256i x, __m256i w) { return _mm256_dpbf16_ps(acc, (__m256bh)x, (__m256bh)w); }
  using T = __m512;
  using WP = __m512i;
  static constexpr int W = 16, MR = 24, G = 2;
  static constexpr bool S8 = false;
  static constexpr bool kAsm = true;
  static SQ_INLINE T zero() { return _mm512_setzero_ps(); }
  static SQ_INLINE T add(T a, T b) { return _mm512_add_ps(a, b); }
  static SQ_INLINE WP loadw(const uint32_t* p) { return QI16::load(p); }
  static SQ_INLINE WP loadw_n(const uint32_t* p, int n) { return QI16::loadn(p, n); }
  static SQ_INLINE T dot(T acc, uint32_t word, const WP& w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(word)), (__m512bh)w);
  }
  static SQ_INLINE T dot_bw(T acc, __m512i xv, const uint32_t* wp) {
    return _mm512_dpbf16_ps(acc, (__m512bh)xv, (__m512bh)_mm512_set1_epi32(static_cast<int>(*wp)));
  }
  template <int MR, int PS>
  static SQ_INLINE void block_asm(T (&a)[MR][1], const uint32_t* x, const uint32_t* w) { SQ_A_BLOCK(SQ_A_G8, "vdpbf16ps") }
  using Store = QStore<QF16, QI16, BF16Dp16>;  // the tile epilogues (per row, or rows of a full-width tile)
  static SQ_INLINE void store(float* y, T acc, int n, const QEpi& e, int row) { Store::f(y, acc, n, e, row); }
};
#endif

#include "qspmm_xt.h"
