// SIMD SpMM micro-kernels shared by the AVX2 and AVX-512 translation units.
// Include inside `namespace sparseprune { namespace SP_NS {` after vec_x86.h, with the TU defining
//   VB  - vector type for the broadcast family (wide),   MRB1 / MRB2: row tiles for 1 / 2 vectors
//   VN  - narrow vector type (8 lanes) for blocks with r <= 8
//   VX  - vector type of the X^T family,  XT_MAX_ACC: accumulator registers it may use
//
// Two families, picked per call by which wastes fewer vector lanes:
//  * bcast (f32_bsr_spmm_<MR>x<RV*W>): vectorised along the r output features of a block (block
//    columns are contiguous), X elements broadcast, an MR x (RV*W) register tile of Y kept in
//    registers across the whole block row. A dense GEMM micro-kernel with a gathered K.
//  * xt (f32_bsr_spmm_xt_<R>x<NB>): XNNPACK-style; X is transposed once per call into K x NB tiles
//    so that NB rows of X are contiguous, weights are broadcast, and each loaded X^T row is reused
//    by the R output features of a block. The right shape for CSR (r = 1) and thin blocks.
//  * gather (f32_csr_spmv_gather): CSR with one or two rows of X: gather x at the column indices.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

#define SP_INLINE inline __attribute__((always_inline))

#include "epilogue_simd.h"

// Transpose rows [0, nv) x cols [k0, k1) of X into xt (K x NB, row k at xt + k*NB); lanes nv..NB = 0.
template <int NB>
inline void transpose_panel(const float* x, int64_t ldx, int nv, int64_t k0, int64_t k1, float* xt) {
  int64_t k = k0;
  if (nv == NB) {
    for (; k + 8 <= k1; k += 8)
      for (int g = 0; g < NB; g += 8) transpose8x8(x + g * ldx + k, ldx, xt + k * NB + g, NB);
  }
  for (; k < k1; ++k) {
    float* d = xt + k * NB;
    for (int q = 0; q < nv; ++q) d[q] = x[q * ldx + k];
    for (int q = nv; q < NB; ++q) d[q] = 0.0f;
  }
}

// One thread-local scratch per calling thread: concurrent Python threads never share it.
// `floats` 64-byte aligned floats from buf, grown as needed.
inline float* aligned_floats(std::vector<float>& buf, size_t floats) {
  if (buf.size() < floats + 16) buf.resize(floats + 16);
  auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

inline float* xt_scratch(size_t floats) {
  thread_local std::vector<float> buf;
  return aligned_floats(buf, floats);
}

// ---------------------------------------------------------------------------------------------
// bcast family
// With many rows, X is first packed into panels of PW rows stored k-major ([k][PW]): a tile's
// broadcasts then read consecutive floats whatever X's row stride (with K = 3072, 24 rows of X
// 12 KiB apart all fall into one L1 set and evict each other).
constexpr int PW = 24;
// bcast_tile's residual offset (BsrView::res_bytes) when there is none: not a float's offset (odd)
constexpr int64_t kNoRes = INT64_MIN + 1;

template <class V, int MR, int RV, bool TAIL, bool PACKED, class Idx>
SP_INLINE void bcast_tile(const float* __restrict x, int64_t ldx, int64_t K, int r, int c,
                          const float* __restrict vals, const Idx* __restrict cols, int64_t b0,
                          int64_t b1, const float* bias, int act, int64_t rb, int tail, float* __restrict y,
                          int64_t ldy) {
  using T = typename V::T;
  constexpr int W = V::W;
  T acc[MR][RV];
#pragma GCC unroll 4
  for (int v = 0; v < RV; ++v) {
    T bv = V::zero();
    if (bias) bv = (TAIL && v == RV - 1) ? V::loadn(bias + v * W, tail) : V::load(bias + v * W);
#pragma GCC unroll 24
    for (int m = 0; m < MR; ++m) acc[m][v] = bv;
  }
  const int64_t rc = static_cast<int64_t>(r) * c;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k0 = static_cast<int64_t>(cols[b]) * c;
    const int cc = static_cast<int>(std::min<int64_t>(c, K - k0));
    const float* wb = vals + b * rc;
    const float* xb = PACKED ? x + k0 * PW : x + k0;
    if constexpr (PACKED && MR >= 8) {
      // the weights of the block after next: at 50% an FFN's fp32 weights (4.7 MB) stream from L3, and
      // the first panel's loads of each line stalled the FMAs (the sequential prefetchers lag behind)
      const char* pf = reinterpret_cast<const char*>(wb + 2 * rc);
      for (int64_t l = 0; l < rc * 4; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    }
    for (int j = 0; j < cc; ++j) {
      T wv[RV];
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v)
        wv[v] = (TAIL && v == RV - 1) ? V::loadn(wb + j * r + v * W, tail) : V::load(wb + j * r + v * W);
#pragma GCC unroll 24
      for (int m = 0; m < MR; ++m) {
        const T xv = V::set1(PACKED ? xb[j * PW + m] : xb[m * ldx + j]);
#pragma GCC unroll 4
        for (int v = 0; v < RV; ++v) acc[m][v] = V::fma(xv, wv[v], acc[m][v]);
      }
    }
  }
#pragma GCC unroll 24
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) {
      if (rb != kNoRes) {  // a residual (SparseConv2d's channels_last 1x1 route): rb bytes on from y
        const float* rp = residual_at(y + m * ldy + v * W, rb);
        acc[m][v] = V::add(acc[m][v], (TAIL && v == RV - 1) ? V::loadn(rp, tail) : V::load(rp));
      }
      if (act) acc[m][v] = act_v(acc[m][v], act);
      if (TAIL && v == RV - 1) V::storen(y + m * ldy + v * W, acc[m][v], tail);
      else V::store(y + m * ldy + v * W, acc[m][v]);
    }
}

// Rows [n0, n1) of Y for one slice of one block row: full MR tiles, then 8/4/2/1-row tails.
template <class V, int MR, int RV, bool TAIL, bool PACKED, class Idx>
void bcast_rows(const float* x, int64_t ldx, int64_t K, int r, int c, const float* vals,
                const Idx* cols, int64_t b0, int64_t b1, const float* bias, int act, int64_t rb, int tail, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t rs = PACKED ? 1 : ldx;  // distance between rows of X
  int64_t i = n0;
  for (; i + MR <= n1; i += MR)
    bcast_tile<V, MR, RV, TAIL, PACKED>(x + i * rs, ldx, K, r, c, vals, cols, b0, b1,
        bias, act, rb, tail, y + i * ldy, ldy);
  if constexpr (MR > 8) {
    for (; i + 8 <= n1; i += 8)
      bcast_tile<V, 8, RV, TAIL, PACKED>(x + i * rs, ldx, K, r, c, vals, cols, b0, b1,
          bias, act, rb, tail, y + i * ldy, ldy);
  }
  const int64_t rem = n1 - i;
  if constexpr (MR > 4) if (rem & 4) {
    bcast_tile<V, 4, RV, TAIL, PACKED>(x + i * rs, ldx, K, r, c, vals, cols, b0, b1,
        bias, act, rb, tail, y + i * ldy, ldy);
    i += 4;
  }
  if (rem & 2) {
    bcast_tile<V, 2, RV, TAIL, PACKED>(x + i * rs, ldx, K, r, c, vals, cols, b0, b1,
        bias, act, rb, tail, y + i * ldy, ldy);
    i += 2;
  }
  if (rem & 1)
    bcast_tile<V, 1, RV, TAIL, PACKED>(x + i * rs, ldx, K, r, c, vals, cols, b0, b1,
        bias, act, rb, tail, y + i * ldy, ldy);
}

template <class V, int MR1, int MR2, bool PACKED, class Idx>
SP_INLINE void bcast_slice(int key, const float* x, int64_t ldx, int64_t K, int r, int c, const float* vals,
                           const Idx* cols, int64_t b0, int64_t b1, const float* bias, int act, int64_t rb,
                           int tail, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (key) {
    case 2:
      bcast_rows<V, MR1, 1, false, PACKED>(x, ldx, K, r, c, vals, cols, b0, b1, bias, act, rb, tail, y, ldy, n0, n1);
      break;
    case 3:
      bcast_rows<V, MR1, 1, true, PACKED>(x, ldx, K, r, c, vals, cols, b0, b1, bias, act, rb, tail, y, ldy, n0, n1);
      break;
    case 4:
      bcast_rows<V, MR2, 2, false, PACKED>(x, ldx, K, r, c, vals, cols, b0, b1, bias, act, rb, tail, y, ldy, n0, n1);
      break;
    default:
      bcast_rows<V, MR2, 2, true, PACKED>(x, ldx, K, r, c, vals, cols, b0, b1, bias, act, rb, tail, y, ldy, n0, n1);
      break;
  }
}

// Rows [n0, n1) of Y's columns [m0, m0 + len) for a block row without blocks: act(bias [+ residual]), one store
// per vector. Through the tiles these cost a tile's setup (spilled loop state) per 24 rows; at 90% most block
// rows of a 1x1 conv's channels_last route are empty (64->256 @56: 10 of 16).
template <class V>
void bcast_fill(const float* bias, int act, int64_t rb, int len, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  using T = typename V::T;
  constexpr int W = V::W;
  for (int i0 = 0; i0 < len; i0 += W) {
    const int t = std::min(W, len - i0);
    const T b = bias ? (t == W ? V::load(bias + i0) : V::loadn(bias + i0, t)) : V::zero();
    if (rb == kNoRes) {
      const T v = act_v(b, act);
      if (t == W)
        for (int64_t i = n0; i < n1; ++i) V::store(y + i * ldy + i0, v);
      else
        for (int64_t i = n0; i < n1; ++i) V::storen(y + i * ldy + i0, v, t);
    } else {
      for (int64_t i = n0; i < n1; ++i) {
        float* yp = y + i * ldy + i0;
        const float* rp = residual_at(yp, rb);
        const T v = act_v(V::add(b, t == W ? V::load(rp) : V::loadn(rp, t)), act);
        if (t == W) V::store(yp, v);
        else V::storen(yp, v, t);
      }
    }
  }
}

// Every block row of [br0, br1) for one full panel (PW rows of packed X at xpp, Y's rows at y), block rows of W
// outputs and no tail: bcast_spmm's loop over one panel, with the tiles inlined. Through bcast_slice /
// bcast_rows each block row cost a call with 17 arguments, the tail tests and the bias and residual tests, next
// to a tile whose work (1-2 blocks of a 64-channel 1x1 conv at 80%, ~5 of BERT's FFN at 90%) is a few hundred
// cycles: 1.14-1.19x on ResNet's channels_last 64->256 @56 at 80-90%, 1.2x on 128->512 @28 at 90%.
template <class V, int MR, class Idx>
__attribute__((noinline)) void bcast_panel(const float* __restrict xpp, int64_t K, int c, const float* vals,
                                           const Idx* cols, const int32_t* row_ptr, int64_t br0, int64_t br1,
                                           const float* bias, int act, int64_t rb, float* y, int64_t ldy) {
  constexpr int W = V::W;
  static_assert(PW % MR == 0, "register tiles must tile a panel");
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t b0 = row_ptr[br], b1 = row_ptr[br + 1];
    const float* bb = bias ? bias + br * W : nullptr;
    float* yy = y + br * W;
    if (b0 == b1) {
      bcast_fill<V>(bb, act, rb, W, yy, ldy, 0, PW);
      continue;
    }
#pragma GCC unroll 1
    for (int i = 0; i < PW; i += MR)
      bcast_tile<V, MR, 1, false, true>(xpp + i, 0, K, W, c, vals, cols, b0, b1, bb, act, rb, W, yy + i * ldy, ldy);
  }
}

template <class V, int MR1, int MR2, class Idx>
void bcast_spmm(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
                const float* bias, float* y, int64_t ldy, int nt) {
  static_assert(PW % MR1 == 0 && PW % MR2 == 0, "register tiles must tile a panel");
  constexpr int W = V::W;
  const int r = w.r, c = w.c;
  const int64_t K = w.cols;
  // Default (w.pack == 0): with AVX-512 (Zen 4, Sapphire Rapids) X is packed into panels, reading rows in
  // place was slower on every BERT shape measured there (K = 768 and 3072, 50-90%). With AVX2 and blocks
  // taller than one vector (the 6-row tile: six rows of X at a 4K-aliasing stride still fit an 8-way L1)
  // reading in place was faster on every shape measured on Zen 3 (BERT, MiniLM, ResNet 1x1, decode;
  // 50-90%; e.g. FFN down 90% eta 0.87 -> 1.02), so that is the AVX2 default there. convert() times
  // both per layer (w.pack 1 / 2) whatever the default.
  const bool pack_default = W >= 16 || r <= W;
  const bool packed = n >= 16 && (w.pack == 1 || (w.pack == 0 && pack_default));
  const int64_t unit = packed ? PW : 1;  // rows are split between threads in whole panels
  const int64_t units = (n + unit - 1) / unit;
  float* xp = packed ? xt_scratch(static_cast<size_t>(units * K * PW)) : nullptr;
  const int64_t kstep = 256, kblocks = (K + kstep - 1) / kstep;
  const int64_t rb = w.has_res ? w.res_bytes : kNoRes;
  // Split rows of X between threads (split_rows, parallel.h: each thread packs only its own panels) or
  // block rows by non-zeros (and rows of X as well when there are too few block rows).
  const bool by_rows = w.split ? (w.split == 1 && n >= 16)
                               : split_rows(w.nnzb() * w.r * w.c, n * K, (n + PW - 1) / PW, nt, n >= 16);
  const int pm = by_rows ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, w.block_rows)));
  const int pn = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt / pm, units)));
  // Rows of X per pass: keep the X panel (nc x K floats) within ~256 KiB of L2.
  const int64_t nc = std::max<int64_t>(PW, ((int64_t(1) << 16) / std::max<int64_t>(K, 1)) / PW * PW);
  // Packed X, panel by panel: every block row for one panel before the next (the weights stream again per panel),
  // so that the panel's rows of Y are written whole, one contiguous stretch, while in L1. Block rows outside and
  // the panels of nc rows inside (the weights' block row reused from L1) wrote a 64-byte piece of each row per
  // tile, a Y row apart. Panel by panel where a block row is one vector tall and 16 wide (bcast_panel: on Zen 5
  // 1.0-1.9x on every shape measured, BERT, MiniLM, ResNet 1x1, 2048 rows with a 4 MB weight 1.28x), or where the
  // weights fit half of a 1 MB L2; not otherwise: with a 4.7 MB weight at 50% AVX2's 8x8 blocks ran 0.84x and
  // AVX-512's 32x32 0.86-0.95x that way.
  const bool by_panel = packed && ((r == W && W >= 16) || w.nnzb() * w.r * w.c <= (int64_t(1) << 17));
  const int64_t step = by_panel ? PW : nc;
  parallel_team(nt, [&] {
    if (packed && pm > 1) {  // panels shared by the threads: packed together, then a barrier
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units * kblocks; ++u) {
        const int64_t t = u / kblocks, kb = u % kblocks;
        const int nv = static_cast<int>(std::min<int64_t>(PW, n - t * PW));
        transpose_panel<PW>(x + t * PW * ldx, ldx, nv, kb * kstep, std::min(K, (kb + 1) * kstep), xp + t * K * PW);
      }
    }
    const int tid = omp_get_thread_num();
    if (tid < pm * pn) {
      const int im = tid % pm, in = tid / pm;
      const int64_t br0 = balanced_split(w.row_ptr, w.block_rows, pm, im);
      const int64_t br1 = balanced_split(w.row_ptr, w.block_rows, pm, im + 1);
      const int64_t nn0 = std::min(n, units * in / pn * unit), nn1 = std::min(n, units * (in + 1) / pn * unit);
      for (int64_t a = nn0; a < nn1; a += step) {
        const int64_t a1 = std::min(nn1, a + step);
        // this thread's own panels, each pass's right before its tiles: read back from L1 (all of them first, the
        // 3136 rows of a 64-channel 1x1 conv went out to L2 and back: 1.03-1.1x on ResNet's channels_last 1x1 shapes)
        if (packed && pm == 1)
          for (int64_t t = a / PW; t * PW < a1; ++t)
            transpose_panel<PW>(x + t * PW * ldx, ldx, static_cast<int>(std::min<int64_t>(PW, a1 - t * PW)), 0, K,
                                xp + t * K * PW);
        if (packed && a1 - a == PW && r == W && w.rows % W == 0) {  // a full panel, whole block rows
          bcast_panel<V, MR1>(xp + (a / PW) * K * PW, K, c, w.values, cols, w.row_ptr, br0, br1, bias, w.act, rb,
                              y + a * ldy, ldy);
          continue;
        }
        for (int64_t br = br0; br < br1; ++br) {
          const int64_t m0 = br * r;
          const int rows = static_cast<int>(std::min<int64_t>(r, w.rows - m0));
          const int64_t b0 = w.row_ptr[br], b1 = w.row_ptr[br + 1];
          if (b0 == b1) {
            bcast_fill<V>(bias ? bias + m0 : nullptr, w.act, rb, rows, y + m0, ldy, a, a1);
            continue;
          }
          for (int i0 = 0; i0 < rows; i0 += 2 * W) {
            const int len = std::min(2 * W, rows - i0);
            const int rv = (len + W - 1) / W;
            const int tail = len - (rv - 1) * W;
            const int key = rv * 2 + (tail != W);
            const float* bb = bias ? bias + m0 + i0 : nullptr;
            const float* vv = w.values + i0;
            float* yy = y + m0 + i0;
            if (packed) {
              for (int64_t p0 = a; p0 < a1; p0 += PW)
                bcast_slice<V, MR1, MR2, true>(key, xp + (p0 / PW) * K * PW, ldx, K, r, c, vv, cols, b0, b1, bb,
                                               w.act, rb, tail, yy + p0 * ldy, ldy, 0, std::min<int64_t>(PW, a1 - p0));
            } else {
              bcast_slice<V, MR1, MR2, false>(key, x, ldx, K, r, c, vv, cols, b0, b1, bb, w.act, rb, tail, yy, ldy, a,
                                              a1);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// xt family
// One block row (R outputs) times an X^T tile into out (R x NB). CH (K-chunked, xt_rows_chunked): start
// from out unless `init`, and stop at the first block column >= kend; returns where it stopped.
template <class V, int R, int NBV, bool C1, bool CH = false, class Idx>
SP_INLINE int64_t xt_tile(const float* __restrict xt, int64_t K, int c, const float* __restrict vals,
                          const Idx* __restrict cols, int64_t b0, int64_t b1, const float* bias, int act,
                          int rows, float* __restrict out, bool init = true, int64_t kend = 0) {
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int NB = NBV * W;
  T acc[R][NBV];
  if (!CH || init) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const T bv = V::set1(bias && i < rows ? bias[i] : 0.0f);
#pragma GCC unroll 4
      for (int v = 0; v < NBV; ++v) acc[i][v] = bv;
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NBV; ++v) acc[i][v] = V::load(out + i * NB + v * W);
  }
  int64_t b = b0;
  if constexpr (C1 && R == 1) {
    // CSR: one output row has NBV accumulators only, fewer than FMA latency x FMA ports; U independent sets
    // (nonzero b + u goes to set u) put U x NBV chains in flight (stand-alone loop on Zen 3, K = 768, 10%, two
    // sets: 1.87 -> 1.63 ns a nonzero with X^T in L2, 1.63 -> 1.20 in L1). With four sets the loop is bound by
    // loads (three of X^T a nonzero, 24-column tiles): the four values come in one load and are spread with
    // in-lane shuffles, the four 16-bit column indices in one 64-bit load (stand-alone loop, Zen 4 AVX2, 24
    // columns, 26 nonzeros a row: 0.91 -> 0.83 ns a nonzero; 200 a row: 0.82 -> 0.69).
    constexpr int U = NBV * 4 <= XT_MAX_ACC ? 4 : 2;  // sets; four-vector AVX2 tiles: two (8 accumulators)
    T acc2[U][NBV];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int v = 0; v < NBV; ++v) acc2[u][v] = u ? V::zero() : acc[0][v];
    for (; b + 4 <= b1 && (!CH || cols[b + 3] < kend); b += 4) {  // sorted columns: cols[b] < kend too
      int64_t c4[4];
      if constexpr (sizeof(Idx) == 2) {
        uint64_t q;
        std::memcpy(&q, cols + b, sizeof(q));
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) c4[u] = static_cast<int64_t>((q >> (16 * u)) & 0xffffu);
      } else {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) c4[u] = static_cast<int64_t>(cols[b + u]);
      }
      const T w4 = V::dup4(vals + b);
      auto step = [&](auto uc) {  // non-zero b + u into set u % U
        constexpr int u = decltype(uc)::value;
        const float* xr = xt + c4[u] * NB;
        const T wv = V::template lane<u>(w4);
#pragma GCC unroll 4
        for (int v = 0; v < NBV; ++v) acc2[u % U][v] = V::fma(wv, V::load(xr + v * W), acc2[u % U][v]);
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
#pragma GCC unroll 4
    for (int v = 0; v < NBV; ++v) {
      T s = acc2[0][v];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) s = V::add(s, acc2[u][v]);
      acc[0][v] = s;
    }
  }
  if constexpr (!C1 && R == 1) {
    // 1 x c blocks: one output row, as CSR, with the same independent sets (column j of a block into set j % U;
    // one set was FMA-latency bound: 1x4 blocks ran below CSR) and the block's values four at a time
    constexpr int U = NBV * 4 <= XT_MAX_ACC ? 4 : 2;
    T acc2[U][NBV];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int v = 0; v < NBV; ++v) acc2[u][v] = u ? V::zero() : acc[0][v];
    for (; b < b1 && (!CH || cols[b] < kend); ++b) {
      const int64_t k0 = static_cast<int64_t>(cols[b]) * c;
      const int cc = static_cast<int>(std::min<int64_t>(c, K - k0));
      const float* xr = xt + k0 * NB;
      const float* wb = vals + b * static_cast<int64_t>(c);
      int j = 0;
      for (; j + 4 <= cc; j += 4) {
        const T w4 = V::dup4(wb + j);
        auto step = [&](auto uc) {
          constexpr int u = decltype(uc)::value;
          const T wv = V::template lane<u>(w4);
#pragma GCC unroll 4
          for (int v = 0; v < NBV; ++v) acc2[u % U][v] = V::fma(wv, V::load(xr + (j + u) * NB + v * W), acc2[u % U][v]);
        };
        step(std::integral_constant<int, 0>{});
        step(std::integral_constant<int, 1>{});
        step(std::integral_constant<int, 2>{});
        step(std::integral_constant<int, 3>{});
      }
      for (; j < cc; ++j) {
        const T wv = V::set1(wb[j]);
#pragma GCC unroll 4
        for (int v = 0; v < NBV; ++v) acc2[0][v] = V::fma(wv, V::load(xr + j * NB + v * W), acc2[0][v]);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NBV; ++v) {
      T s = acc2[0][v];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) s = V::add(s, acc2[u][v]);
      acc[0][v] = s;
    }
  }
  for (; b < b1 && (!CH || cols[b] < kend); ++b) {
    if constexpr (C1) {
      const float* xr = xt + static_cast<int64_t>(cols[b]) * NB;
      const float* wb = vals + b * R;
      T xv[NBV];
#pragma GCC unroll 4
      for (int v = 0; v < NBV; ++v) xv[v] = V::load(xr + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const T wv = V::set1(wb[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NBV; ++v) acc[i][v] = V::fma(wv, xv[v], acc[i][v]);
      }
    } else {
      const int64_t k0 = static_cast<int64_t>(cols[b]) * c;
      const int cc = static_cast<int>(std::min<int64_t>(c, K - k0));
      const float* xr = xt + k0 * NB;
      const float* wb = vals + b * static_cast<int64_t>(R) * c;
      for (int j = 0; j < cc; ++j) {
        T xv[NBV];
#pragma GCC unroll 4
        for (int v = 0; v < NBV; ++v) xv[v] = V::load(xr + j * NB + v * W);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          const T wv = V::set1(wb[j * R + i]);
#pragma GCC unroll 4
          for (int v = 0; v < NBV; ++v) acc[i][v] = V::fma(wv, xv[v], acc[i][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NBV; ++v) V::store(out + i * NB + v * W, act ? act_v(acc[i][v], act) : acc[i][v]);
  return b;
}

// G consecutive block rows (8R outputs) into a panel, then one transposed store into Y with 8x8
// transposes: Y rows are written 8R contiguous floats at a time instead of one float per row.
constexpr int XT_G = 8;

// rows x NB results (row i at tmp + i * NB; `full` rows make a whole group) into Y: columns [0, nvalid)
// of rows are the first nvalid rows of X's tile.
template <int NB>
SP_INLINE void xt_store(const float* tmp, int rows, int full, int nvalid, float* yy, int64_t ldy) {
  if (rows == full && nvalid == NB) {
    for (int i = 0; i < full; i += 8)
      for (int q = 0; q < NB; q += 8) transpose8x8(tmp + i * NB + q, NB, yy + q * ldy + i, ldy);
  } else {
    for (int q = 0; q < nvalid; ++q)
      for (int i = 0; i < rows; ++i) yy[q * ldy + i] = tmp[i * NB + q];
  }
}
template <class V, int R, int NBV, bool C1, class Idx>
SP_INLINE void xt_group(const BsrView& w, const Idx* cols, const float* xtt, int64_t br, int64_t br_end,
                        const float* bias, float* y, int64_t ldy, int nvalid) {
  constexpr int NB = NBV * V::W;
  alignas(64) float tmp[XT_G * R][NB];
  const int64_t m0 = br * R;
  const int ng = static_cast<int>(std::min<int64_t>(XT_G, br_end - br));
  for (int g = 0; g < ng; ++g) {
    const int64_t mg = m0 + g * R;
    xt_tile<V, R, NBV, C1>(xtt, w.cols, w.c, w.values, cols, w.row_ptr[br + g], w.row_ptr[br + g + 1],
                           bias ? bias + mg : nullptr, w.act, static_cast<int>(std::min<int64_t>(R, w.rows - mg)), tmp[g * R]);
  }
  xt_store<NB>(tmp[0], static_cast<int>(std::min<int64_t>(ng * R, w.rows - m0)), XT_G * R, nvalid, y + m0, ldy);
}

// K-chunked xt: a tile of X^T (K x NB floats) that outgrows L2 beside the streaming weights (BERT FFN
// down, K = 3072: 384 KiB at NB = 32, a 512 KiB L2) is read chunk by chunk of kcb block columns. Block
// rows [br0, br1) each run once per chunk, their partial sums kept in part ((br1 - br0) R x NB floats) and
// their place in the block row in cur; the last chunk applies the activation, then groups of XT_G block
// rows go to Y as in xt_group. Every block is visited exactly once: the last chunk has no column limit.
template <class V, int R, int NBV, bool C1, class Idx>
void xt_rows_chunked(const BsrView& w, const Idx* cols, const float* xtt, int64_t br0, int64_t br1, int64_t kcb,
                     const float* bias, float* y, int64_t ldy, int nvalid, float* part, int64_t* cur) {
  constexpr int NB = NBV * V::W;
  for (int64_t br = br0; br < br1; ++br) cur[br - br0] = w.row_ptr[br];
  const int64_t block_cols = (w.cols + w.c - 1) / w.c;
  for (int64_t k0 = 0; k0 < block_cols; k0 += kcb) {
    const bool first = k0 == 0, last = k0 + kcb >= block_cols;
    const int64_t kend = last ? INT64_MAX : k0 + kcb;
    const int act = last ? w.act : 0;
    for (int64_t br = br0; br < br1; ++br) {
      const int64_t mg = br * R;
      cur[br - br0] = xt_tile<V, R, NBV, C1, true>(
          xtt, w.cols, w.c, w.values, cols, cur[br - br0], w.row_ptr[br + 1], bias ? bias + mg : nullptr, act,
          static_cast<int>(std::min<int64_t>(R, w.rows - mg)), part + (br - br0) * R * NB, first, kend);
    }
  }
  for (int64_t br = br0; br < br1; br += XT_G) {
    const int64_t ng = std::min<int64_t>(XT_G, br1 - br);
    xt_store<NB>(part + (br - br0) * R * NB, static_cast<int>(std::min<int64_t>(ng * R, w.rows - br * R)), XT_G * R,
                 nvalid, y + br * R, ldy);
  }
}

// Block columns per K chunk of the xt family, 0 for none. Chunks pay when a whole tile of X^T passes
// 5/16 of L2 (160 KiB of Zen 3's 512 KiB), next to the weights streaming through, and the partial sums of
// all M outputs are at most half its size (M <= K / 2: FFN down projections; not decode 16x4096->4096,
// where chunks only add the partial sums' traffic). A chunk holds L2 / 8 of X^T (64 KiB) at >= 20% density,
// more below (density / 0.2 fewer non-zeros a row in each chunk, and each block row pays a fixed cost per
// chunk). Zen 3, CSR, 128 rows, against no chunks: FFN down 128x3072->768 1.13-1.20x at 80%, MiniLM down
// 128x1536->384 1.12-1.24x; ~1.05-1.19x at 90%. Scaled by L2 size on other CPUs, not measured there.
// SPARSEPRUNE_XT_CHUNK=<columns of K> overrides (0: never chunk), for experiments.
inline int64_t xt_chunk_blocks(const BsrView& w, int NB) {
  const int64_t K = w.cols;
  static const char* force = std::getenv("SPARSEPRUNE_XT_CHUNK");
  int64_t kcols;
  if (force) {
    kcols = std::atoll(force);
  } else {
    const int64_t tile = K * NB * static_cast<int64_t>(sizeof(float));
    if (16 * tile <= 5 * l2_bytes() || 2 * w.rows > K) return 0;
    const double density = static_cast<double>(w.nnzb()) * w.r * w.c / (static_cast<double>(w.rows) * K);
    kcols = static_cast<int64_t>(l2_bytes() / 8 / (NB * static_cast<int64_t>(sizeof(float))) * std::max(1.0, 0.2 / std::max(density, 1e-6)));
  }
  if (kcols <= 0 || kcols >= K) return 0;
  return std::max<int64_t>(1, kcols / std::max(w.c, 1));
}

// Per-thread buffers of xt_rows_chunked: partial sums (floats, 64-byte aligned) and positions.
inline float* xt_chunk_scratch(size_t floats, size_t positions, int64_t** cur) {
  thread_local std::vector<float> part;
  thread_local std::vector<int64_t> pos;
  if (pos.size() < positions) pos.resize(positions);
  *cur = pos.data();
  return aligned_floats(part, floats);
}

// Transpose units of X into the scratch: full tiles of NB rows, then one remainder tile of NBR rows
// (the narrowest of W, 2W, 4W that holds it, so N = 196 does not compute 256 rows).
template <int NB, int NBR>
SP_INLINE void xt_transpose_unit(const float* x, int64_t ldx, int64_t n, int64_t K, int64_t full, int64_t t,
                                 int64_t k0, int64_t k1, float* xt) {
  if (t < full) transpose_panel<NB>(x + t * NB * ldx, ldx, NB, k0, k1, xt + t * K * NB);
  else transpose_panel<NBR>(x + full * NB * ldx, ldx, static_cast<int>(n - full * NB), k0, k1, xt + full * K * NB);
}

template <class V, int R, int NBV, int NBVR, bool C1, class Idx>
void xt_spmm_r(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
               const float* bias, float* y, int64_t ldy, int nt) {
  constexpr int NB = NBV * V::W, NBR = NBVR * V::W;
  const int64_t K = w.cols;
  const int64_t full = n / NB;
  const int64_t units = full + (n % NB ? 1 : 0);
  const int64_t kstep = 256;
  const int64_t kblocks = (K + kstep - 1) / kstep;
  // by rows of X (below): a thread that starts inside another thread's tile transposes its own copy of it into
  // one of nt - 1 spare tiles after the others
  float* xt = xt_scratch(static_cast<size_t>(full * K * NB + K * NBR + (nt - 1) * K * NB));
  // K chunks (xt_rows_chunked) where a whole tile of X^T would not stay in L2; the remainder tile is narrower
  const int64_t kcb = xt_chunk_blocks(w, NB), kcbr = xt_chunk_blocks(w, NBR);
  // block rows [br0, br1) times tile t of X^T into Y
  auto run_tile_at = [&](int64_t t, int64_t br0, int64_t br1, const float* xtt) {
    const bool whole = t < full;
    float* yt = y + t * NB * ldy;
    const int nv = whole ? NB : static_cast<int>(n - full * NB);
    if (whole ? kcb : kcbr) {
      int64_t* cur;
      float* part = xt_chunk_scratch(static_cast<size_t>((br1 - br0) * R * (whole ? NB : NBR)),
                                     static_cast<size_t>(br1 - br0), &cur);
      if (whole) xt_rows_chunked<V, R, NBV, C1>(w, cols, xtt, br0, br1, kcb, bias, yt, ldy, nv, part, cur);
      else xt_rows_chunked<V, R, NBVR, C1>(w, cols, xtt, br0, br1, kcbr, bias, yt, ldy, nv, part, cur);
    } else if (whole) {
      for (int64_t br = br0; br < br1; br += XT_G) xt_group<V, R, NBV, C1>(w, cols, xtt, br, br1, bias, yt, ldy, nv);
    } else {
      for (int64_t br = br0; br < br1; br += XT_G) xt_group<V, R, NBVR, C1>(w, cols, xtt, br, br1, bias, yt, ldy, nv);
    }
  };
  auto run_tile = [&](int64_t t, int64_t br0, int64_t br1) { run_tile_at(t, br0, br1, xt + t * K * NB); };
  // split_rows (parallel.h): each thread transposes its own tiles of X and runs every block row on them
  const bool by_rows = w.split ? w.split == 1 : split_rows(w.nnzb() * R * w.c, n * K, units, nt, true);
  if (by_rows) {
    // Each thread gets an equal share of the work, counted in (tile, block row) steps: a tile costs its vectors
    // + 1 (the weights' loads) a non-zero, and a share may end inside a tile at a block row with the share's
    // fraction of its non-zeros (balanced_split), the next thread taking the rest. Whole tiles per thread left
    // up to a tile's work idle: 196 rows in 24-column tiles on two threads, four tiles against four and the
    // 8-column remainder.
    const int64_t cost_full = 1024 * (NBV + 1), cost_rem = 1024 * (NBVR + 1);
    const int64_t total = full * cost_full + (units - full) * cost_rem;
    // the tile and block row where cost c (0 <= c <= total) falls
    auto locate = [&](int64_t c, int64_t& t, int64_t& br) {
      const int64_t tf = std::min(full, c / cost_full);
      t = tf;
      const int64_t in = c - tf * cost_full, cost = tf == full ? cost_rem : cost_full;
      if (t >= units) {
        t = units;
        br = 0;
        return;
      }
      // fraction in / cost of the tile's block rows, weighted by non-zeros + 1 as balanced_split does
      br = balanced_split(w.row_ptr, w.block_rows, static_cast<int>(cost), static_cast<int>(in));
      if (br >= w.block_rows) ++t, br = 0;
    };
    parallel_team(nt, [&] {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      int64_t t0, b0, t1, b1;
      locate(total * tid / nth, t0, b0);
      locate(total * (tid + 1) / nth, t1, b1);
      // tiles [t0, t1) whole except the first from block row b0, and tile t1 up to block row b1
      float* own = xt + (full * NB + NBR) * K + static_cast<int64_t>(tid - 1) * K * NB;  // spare tile (tid > 0)
      for (int64_t t = t0; t <= t1 && t < units; ++t) {
        const int64_t r0 = t == t0 ? b0 : 0, r1 = t == t1 ? b1 : w.block_rows;
        if (r0 >= r1) continue;
        if (t == t0 && b0 > 0) {
          // the previous thread runs this tile's first block rows: a copy of it of our own
          if (t < full) transpose_panel<NB>(x + t * NB * ldx, ldx, NB, 0, K, own);
          else transpose_panel<NBR>(x + full * NB * ldx, ldx, static_cast<int>(n - full * NB), 0, K, own);
          run_tile_at(t, r0, r1, own);
        } else {
          xt_transpose_unit<NB, NBR>(x, ldx, n, K, full, t, 0, K, xt);
          run_tile(t, r0, r1);
        }
      }
    });
    return;
  }
  parallel_team(nt, [&] {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units * kblocks; ++u) {
      const int64_t t = u / kblocks, kb = u % kblocks;
      xt_transpose_unit<NB, NBR>(x, ldx, n, K, full, t, kb * kstep, std::min(K, (kb + 1) * kstep), xt);
    }
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t br0 = balanced_split(w.row_ptr, w.block_rows, nth, tid);
    const int64_t br1 = balanced_split(w.row_ptr, w.block_rows, nth, tid + 1);
    for (int64_t t = 0; t < units; ++t) run_tile(t, br0, br1);
  });
}

template <class V, int R, int NBV, bool C1, class Idx>
void xt_spmm(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
             const float* bias, float* y, int64_t ldy, int nt) {
  constexpr int W = V::W;
  const int64_t rem = n % (NBV * W);
  if (NBV == 3 && rem > 2 * W) xt_spmm_r<V, R, NBV, 3, C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  else if (NBV >= 4 && rem > 2 * W) xt_spmm_r<V, R, NBV, (NBV >= 4 ? 4 : 1), C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  else if (NBV >= 2 && rem > W) xt_spmm_r<V, R, NBV, (NBV >= 2 ? 2 : 1), C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  else xt_spmm_r<V, R, NBV, 1, C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
}

// ---------------------------------------------------------------------------------------------
// gather: CSR times one or two rows of X (decode-style, memory-bound).
template <class V, class Idx>
void gather_spmm(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
                 const float* bias, float* y, int64_t ldy, int nt) {
  using T = typename V::T;
  constexpr int W = V::W;
  parallel_team(nt, [&] {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t m0 = balanced_split(w.row_ptr, w.rows, nth, tid);
    const int64_t m1 = balanced_split(w.row_ptr, w.rows, nth, tid + 1);
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * ldx;
      for (int64_t m = m0; m < m1; ++m) {
        int64_t p = w.row_ptr[m];
        const int64_t p1 = w.row_ptr[m + 1];
        T a0 = V::zero(), a1 = V::zero();
        for (; p + 2 * W <= p1; p += 2 * W) {
          a0 = V::fma(V::load(w.values + p), V::gather(xi, cols + p), a0);
          a1 = V::fma(V::load(w.values + p + W), V::gather(xi, cols + p + W), a1);
        }
        float s = V::hsum(V::add(a0, a1));
        for (; p < p1; ++p) s += w.values[p] * xi[cols[p]];
        y[i * ldy + m] = act_scalar(s + (bias ? bias[m] : 0.0f), w.act);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The block-row loop of the thin kernels below: each thread an even share of the blocks; per block row
// body(br, b0, b1, edge, rows): its full-width blocks [b0, b1), whether its last block is the partial one, its
// valid outputs. K % c != 0: the last block column holds fewer than c columns of X (the block zero-padded, X
// not: reading past the row met the next row's values, a NaN or infinity there times 0 a NaN); columns are
// sorted in a row, so only its last block can be that one, done apart by the body.
template <class Idx, class Body>
void thin_block_rows(const BsrView& w, const Idx* cols, int nt, Body&& body) {
  const int64_t klast = (w.cols + w.c - 1) / w.c - 1;
  const bool partial = w.cols % w.c != 0;
  parallel_team(nt, [&] {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t br0 = balanced_split(w.row_ptr, w.block_rows, nth, tid);
    const int64_t br1 = balanced_split(w.row_ptr, w.block_rows, nth, tid + 1);
    for (int64_t br = br0; br < br1; ++br) {
      const int64_t b0 = w.row_ptr[br], b1a = w.row_ptr[br + 1];
      const bool edge = partial && b1a > b0 && cols[b1a - 1] == klast;
      body(br, b0, edge ? b1a - 1 : b1a, edge, static_cast<int>(std::min<int64_t>(w.r, w.rows - br * w.r)));
    }
  });
}

// thin: 1 x c blocks (c % 4 == 0) times one or two rows of X. Per output, its blocks' c weights (contiguous: a
// one-row block) against the c values of x each meets (contiguous): a dot product in 4-wide pieces, two pieces a
// vector. The broadcast family's masked tail tiles used one lane in eight for 1 x 4 blocks (0.44x dense at 50%,
// N = 1), the xt family one row of its 8-row tiles. (Taller blocks are stored column-major, an output's weights
// r floats apart: thin_cols_spmm below.)
template <class Idx>
void thin_spmm(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int nt) {
  const int r = w.r, c = w.c;
  const int64_t bsz = static_cast<int64_t>(r) * c;
  const int64_t klast = (w.cols + c - 1) / c - 1, kr = w.cols - klast * c;
  thin_block_rows(w, cols, nt, [&](int64_t br, int64_t b0, int64_t b1, bool edge, int rows) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * ldx;
      for (int o = 0; o < rows; ++o) {
        const float* wv = w.values + o * c;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        if (c == 4) {  // two blocks a vector
          int64_t b = b0;
          for (; b + 4 <= b1; b += 4) {
            const __m256 x0 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(xi + 4 * static_cast<int64_t>(cols[b]))),
                                                   _mm_loadu_ps(xi + 4 * static_cast<int64_t>(cols[b + 1])), 1);
            const __m256 x1 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(xi + 4 * static_cast<int64_t>(cols[b + 2]))),
                                                   _mm_loadu_ps(xi + 4 * static_cast<int64_t>(cols[b + 3])), 1);
            const __m256 w0 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(wv + b * bsz)),
                                                   _mm_loadu_ps(wv + (b + 1) * bsz), 1);
            const __m256 w1 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(wv + (b + 2) * bsz)),
                                                   _mm_loadu_ps(wv + (b + 3) * bsz), 1);
            a0 = _mm256_fmadd_ps(w0, x0, a0);
            a1 = _mm256_fmadd_ps(w1, x1, a1);
          }
          __m128 t = _mm_setzero_ps();
          for (; b < b1; ++b)
            t = _mm_fmadd_ps(_mm_loadu_ps(wv + b * bsz), _mm_loadu_ps(xi + 4 * static_cast<int64_t>(cols[b])), t);
          a1 = _mm256_add_ps(a1, _mm256_insertf128_ps(_mm256_setzero_ps(), t, 0));
        } else {  // c % 4 == 0: 8-wide pieces, then one 4-wide
          for (int64_t b = b0; b < b1; ++b) {
            const float* xb = xi + static_cast<int64_t>(cols[b]) * c;
            const float* wb = wv + b * bsz;
            int j = 0;
            for (; j + 8 <= c; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wb + j), _mm256_loadu_ps(xb + j), a0);
            if (j < c)
              a1 = _mm256_add_ps(a1, _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_mul_ps(_mm_loadu_ps(wb + j), _mm_loadu_ps(xb + j)), 0));
          }
        }
        const __m256 v = _mm256_add_ps(a0, a1);
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        float s = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
        if (edge) {
          const float* wb = wv + b1 * bsz;
          const float* xb = xi + klast * c;
          for (int64_t j = 0; j < kr; ++j) s += wb[j] * xb[j];
        }
        const int64_t m = br * r + o;
        y[i * ldy + m] = act_scalar(s + (bias ? bias[m] : 0.0f), w.act);
      }
    }
  });
}

// R x c blocks (R = 2 or 4, c % 4 == 0) times one or two rows of X: blocks are column-major, so 8 / R columns of
// a block are 8 contiguous floats (R outputs each), against those columns' x values spread R lanes each (one
// vpermps); each block row's R sums are the vector's column groups added at the end.
template <int R, class Idx>
void thin_cols_spmm(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx, const float* bias,
                    float* y, int64_t ldy, int nt) {
  static_assert(R == 2 || R == 4, "two or four rows a block");
  constexpr int J = 8 / R;  // columns a vector
  const int c = w.c;
  const int64_t bsz = static_cast<int64_t>(R) * c;
  const int64_t klast = (w.cols + c - 1) / c - 1, kr = w.cols - klast * c;
  const __m256i spread = R == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  thin_block_rows(w, cols, nt, [&](int64_t br, int64_t b0, int64_t b1, bool edge, int rows) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        const float* xb = xi + static_cast<int64_t>(cols[b]) * c;
        const float* wb = w.values + b * bsz;
        int j = 0;
        for (; j + 2 * J <= c; j += 2 * J) {
          __m256 x0, x1;
          if constexpr (R == 2) {
            x0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(xb + j)), spread);
            x1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(xb + j + J)), spread);
          } else {
            const __m128 q = _mm_loadu_ps(xb + j);  // columns j .. j + 3
            x0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(q), spread);
            x1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_movehl_ps(q, q)), spread);
          }
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wb + j * R), x0, a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wb + (j + J) * R), x1, a1);
        }
        if (j < c) {  // one vector's columns left (c % (2J) == J)
          __m256 x0;
          if constexpr (R == 2) {
            x0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(xb + j)), spread);
          } else {
            x0 = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xb + j)))), spread);
          }
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wb + j * R), x0, a0);
        }
      }
      const __m256 v = _mm256_add_ps(a0, a1);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // R == 4: the 4 sums
      if constexpr (R == 2) h = _mm_add_ps(h, _mm_movehl_ps(h, h));                    // lanes 0, 1
      alignas(16) float sum[4];
      _mm_store_ps(sum, h);
      if (edge) {
        const float* wb = w.values + b1 * bsz;
        const float* xb = xi + klast * c;
        for (int64_t j = 0; j < kr; ++j)
          for (int o = 0; o < R; ++o) sum[o] += wb[j * R + o] * xb[j];
      }
      for (int o = 0; o < rows; ++o) {
        const int64_t m = br * R + o;
        y[i * ldy + m] = act_scalar(sum[o] + (bias ? bias[m] : 0.0f), w.act);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Choice of family and register tile.
template <class V, int R, bool C1, class Idx>
void xt_pick_nb(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
                const float* bias, float* y, int64_t ldy, int nt) {
  constexpr int W = V::W;
  // accumulators R * NBV <= XT_MAX_ACC; fewer lanes when N is small
  constexpr int NBV_MAX = std::max(1, std::min(4, XT_MAX_ACC / R));
  int64_t want = (n + W - 1) / W;
  // CSR with 16-lane vectors: 32-column tiles of X^T (not 64) up to K = 1024. Zen 5, one thread, eta at 80 / 90%:
  // ResNet 1x1 196x256->1024 0.51 / 0.39 -> 0.88 / 0.63, 196x512->2048 0.68 / 0.54 -> 0.78 / 0.74, MiniLM up
  // 128x384->1536 0.84 / 0.67 -> 0.86 / 0.84, BERT FFN up 0.74 / 0.64 -> 0.86 / 0.73, attention 0.75 / 0.73 ->
  // 0.69 / 0.74; K = 1536 worse (0.75 / 0.63 -> 0.56 / 0.49), K = 3072 equal. SPARSEPRUNE_XT_NBV=1|2|4 caps the vectors per row, for experiments.
  if constexpr (C1 && R == 1 && W == 16)
    if (w.cols <= 1024) want = std::min<int64_t>(want, 2);
  static const char* force = std::getenv("SPARSEPRUNE_XT_NBV");
  if (force) want = std::min<int64_t>(want, std::atoi(force));
  // CSR with 8-lane vectors: 24-column tiles of X^T (3 vectors) unless they leave a thread more lanes to compute
  // than 32-column tiles do (tiles go to threads in contiguous runs, the last one a remainder of 8 / 16 / NB
  // lanes), K <= 1024. Zen 4 (AVX-512 hidden), 2 threads, CSR, eta 24 vs 32 columns at 80 / 90%: N = 196, K =
  // 192-768: +2-10% / +2-20% (ResNet 1x1 196x256->1024: 0.51 / 0.40 -> 0.54 / 0.45); N = 128 (24-column tiles
  // leave one thread 72 lanes against 64): K = 256-384 equal, K = 512-768 3-15% slower. SPARSEPRUNE_XT_NBV=3
  // forces them.
  if constexpr (C1 && R == 1 && W == 8) {
    auto busiest = [n, nt](int64_t nb) {  // lanes of the thread with the most, in nb-column tiles
      const int64_t full = n / nb, rem = n % nb, units = full + (rem ? 1 : 0);
      const int64_t last = rem == 0 ? nb : rem <= 8 ? 8 : rem <= 16 ? 16 : nb;
      const int th = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, units)));
      int64_t most = 0;
      for (int t = 0; t < th; ++t) {
        const int64_t u0 = units * t / th, u1 = units * (t + 1) / th;
        most = std::max(most, (u1 - u0) * nb - (u1 == units && rem ? nb - last : 0));
      }
      return most;
    };
    const bool three = force ? std::atoi(force) == 3 && want >= 3
                             : want >= 4 && w.cols <= 1024 && busiest(24) <= busiest(32);
    if (three) return xt_spmm<V, R, 3, C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  }
  if (NBV_MAX >= 4 && want >= 4) xt_spmm<V, R, (NBV_MAX >= 4 ? 4 : 1), C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  else if (NBV_MAX >= 2 && want >= 2) xt_spmm<V, R, (NBV_MAX >= 2 ? 2 : 1), C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
  else xt_spmm<V, R, 1, C1>(w, cols, x, n, ldx, bias, y, ldy, nt);
}

template <class Idx>
void xt_pick_r(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
               const float* bias, float* y, int64_t ldy, int nt) {
  switch (w.r) {
    case 1:
      if (w.c == 1) xt_pick_nb<VX, 1, true>(w, cols, x, n, ldx, bias, y, ldy, nt);
      else xt_pick_nb<VX, 1, false>(w, cols, x, n, ldx, bias, y, ldy, nt);
      break;
    case 2: xt_pick_nb<VX, 2, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
    case 3: xt_pick_nb<VX, 3, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
    case 4: xt_pick_nb<VX, 4, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
    case 5: xt_pick_nb<VX, 5, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
    case 6: xt_pick_nb<VX, 6, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
    default: xt_pick_nb<VX, 7, false>(w, cols, x, n, ldx, bias, y, ldy, nt); break;
  }
}

// y = act(y + residual) over n rows of m outputs (the residual res_bytes on from each element of y).
template <class V>
void add_residual_act(float* y, int64_t ldy, int64_t n, int64_t m, int64_t res_bytes, int act, int nt) {
  constexpr int W = V::W;
  parallel_team(nt, [&] {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float* yi = y + i * ldy;
      const float* ri = residual_at(yi, res_bytes);
      for (int64_t j = 0; j < m; j += W) {
        const int len = static_cast<int>(std::min<int64_t>(W, m - j));
        typename V::T v = V::add(V::loadn(yi + j, len), V::loadn(ri + j, len));
        if (act) v = act_v(v, act);
        V::storen(yi + j, v, len);
      }
    }
  });
}

// Fraction of vector lanes doing useful work: lanes(n, W) for N rows in W-lane vectors.
inline double lane_use(int64_t used, int width) {
  return static_cast<double>(used) / static_cast<double>(((used + width - 1) / width) * width);
}

template <class Idx>
void spmm_entry(const BsrView& w, const Idx* cols, const float* x, int64_t n, int64_t ldx,
                const float* bias, float* y, int64_t ldy, int num_threads) {
  if (n <= 0 || w.rows <= 0) return;
  const int nt = threads_for(n * (w.nnzb() * w.r * w.c + w.rows), num_threads);
  const double use_xt = lane_use(std::min<int64_t>(n, 4 * VX::W), VX::W);
  const double use_narrow = lane_use(w.r, VN::W);
  const bool thin = n <= 2 && (w.r == 1 || w.r == 2 || w.r == 4) && w.c % 4 == 0;
  const bool bcast = !(w.r == 1 && w.c == 1 && n <= 2) && !thin && !(w.r < 8 && use_xt > use_narrow);
  if (w.has_res && !bcast) {
    // only the broadcast family adds a residual in its store: the others write X W^T + b, then one pass adds
    // the residual and applies the activation
    BsrView plain = w;
    plain.has_res = false;
    plain.act = kActNone;
    spmm_entry(plain, cols, x, n, ldx, bias, y, ldy, num_threads);
    add_residual_act<VX>(y, ldy, n, w.rows, w.res_bytes, w.act, nt);
    return;
  }
  if (w.r == 1 && w.c == 1 && n <= 2) {
    gather_spmm<VX>(w, cols, x, n, ldx, bias, y, ldy, nt);
    return;
  }
  if (thin) {
    if (w.r == 1) thin_spmm(w, cols, x, n, ldx, bias, y, ldy, nt);
    else if (w.r == 2) thin_cols_spmm<2>(w, cols, x, n, ldx, bias, y, ldy, nt);
    else thin_cols_spmm<4>(w, cols, x, n, ldx, bias, y, ldy, nt);
    return;
  }
  if (w.r < 8 && use_xt > use_narrow) {
    xt_pick_r(w, cols, x, n, ldx, bias, y, ldy, nt);
  } else if (lane_use(w.r, VB::W) >= use_narrow) {
    bcast_spmm<VB, MRB1, MRB2>(w, cols, x, n, ldx, bias, y, ldy, nt);
  } else {
    bcast_spmm<VN, MRN1, MRN2>(w, cols, x, n, ldx, bias, y, ldy, nt);
  }
}

inline void spmm(const BsrView& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                 float* y, int64_t ldy, int num_threads) {
  if (w.idx16)
    spmm_entry(w, static_cast<const uint16_t*>(w.col_idx), x, n, ldx, bias, y, ldy, num_threads);
  else
    spmm_entry(w, static_cast<const int32_t*>(w.col_idx), x, n, ldx, bias, y, ldy, num_threads);
}
