// The body of the attention kernel (see attention.cpp), compiled once per vector width: attention.cpp (the
// baseline ISA, 16-byte vectors) and attention_avx2.cpp (-mavx2 -mfma, 32-byte vectors). The includer
// defines SP_ATTN_BYTES, SP_ATTN_NAME and SP_ATTN_TRANSPOSE (the layout change of that ISA, kernels.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

namespace sparseprune {

namespace {

typedef float vec __attribute__((vector_size(SP_ATTN_BYTES)));
typedef int32_t ivec __attribute__((vector_size(SP_ATTN_BYTES)));
constexpr int kW = SP_ATTN_BYTES / 4;  // floats per vector
constexpr int kR = 6;                  // query rows per tile (12 accumulators: FMA latency x ports is 8)
constexpr int kC = 2 * kW;             // key columns (QK^T) or head dimensions (PV) per tile

inline vec loadv(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) {  // one broadcast (`vec{} + x` adds 0.0 first; a per-lane loop inserts lane by lane)
#if SP_ATTN_BYTES == 64
  return vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif SP_ATTN_BYTES == 32
  return vec{x, x, x, x, x, x, x, x};
#else
  return vec{x, x, x, x};
#endif
}

// exp(x) for x <= 0 (x - rowmax): 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], p the
// degree-6 Taylor polynomial (relative error < 2e-7 there); below -87.3 (where 2^n leaves the normal range)
// the result is 0, so a masked score (-inf) contributes exactly nothing.
inline vec exp_nonpos(vec x) {
  const vec lo = splat(-87.3f);
  const ivec dead = x < lo;
  x = x < lo ? lo : x;
  const vec t = x * splat(1.44269504088896341f);
  // round to nearest: add and subtract 1.5 * 2^23 (|t| < 2^22 here)
  const vec magic = splat(12582912.f);
  const vec n = (t + magic) - magic;
  const vec r = (x - n * splat(0.693145751953125f)) - n * splat(1.42860682030941723212e-6f);
  vec p = splat(1.f / 720.f);
  p = p * r + splat(1.f / 120.f);
  p = p * r + splat(1.f / 24.f);
  p = p * r + splat(1.f / 6.f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &e, sizeof scale);
  const vec y = p * scale;
  return dead ? splat(0.f) : y;
}

// S[r][j] = sum_d Q[r][d] * KT[d][j] for R rows, all padded columns (a multiple of kC)
template <int R>
inline void qk_tile(const float* q, int64_t ldq, const float* kt, int64_t ldkt, int64_t d_len, int64_t cols, float* s,
                    int64_t lds) {
  for (int64_t j = 0; j < cols; j += kC) {
    vec acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vec{};
    for (int64_t d = 0; d < d_len; ++d) {
      const vec k0 = loadv(kt + d * ldkt + j), k1 = loadv(kt + d * ldkt + j + kW);
      for (int r = 0; r < R; ++r) {
        const vec qd = splat(q[r * ldq + d]);
        acc[r][0] += qd * k0;
        acc[r][1] += qd * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      storev(s + r * lds + j, acc[r][0]);
      storev(s + r * lds + j + kW, acc[r][1]);
    }
  }
}

// O[r][:] = inv[r] * sum_j P[r][j] * V[j][:] for R rows
template <int R>
inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t keys, int64_t d_len,
                    const float* inv, float* o, int64_t ldo) {
  int64_t d0 = 0;
  for (; d0 + kC <= d_len; d0 += kC) {
    vec acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vec{};
    for (int64_t j = 0; j < keys; ++j) {
      const vec v0 = loadv(v + j * ldv + d0), v1 = loadv(v + j * ldv + d0 + kW);
      for (int r = 0; r < R; ++r) {
        const vec pj = splat(p[r * ldp + j]);
        acc[r][0] += pj * v0;
        acc[r][1] += pj * v1;
      }
    }
    for (int r = 0; r < R; ++r) {
      storev(o + r * ldo + d0, acc[r][0] * splat(inv[r]));
      storev(o + r * ldo + d0 + kW, acc[r][1] * splat(inv[r]));
    }
  }
  for (; d0 < d_len; ++d0)  // head sizes that are not a multiple of kC
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < keys; ++j) acc += p[r * ldp + j] * v[j * ldv + d0];
      o[r * ldo + d0] = acc * inv[r];
    }
}

// scale, mask, exponentiate one row of scores in place; returns 1 / sum (for a row with no key left: 0, or NaN
// with empty_nan, what softmax over all -inf gives)
inline float softmax_row(float* s, int64_t keys, float scale, const float* madd, const uint8_t* mkeep,
                         bool empty_nan) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // one simple loop per mask kind (each vectorised by the compiler), then the max over whole vectors
  if (madd) {
    for (int64_t j = 0; j < keys; ++j) s[j] = s[j] * scale + madd[j];
  } else if (mkeep) {
    for (int64_t j = 0; j < keys; ++j) s[j] = mkeep[j] ? s[j] * scale : ninf;
  } else {
    for (int64_t j = 0; j < keys; ++j) s[j] *= scale;
  }
  vec vmx = splat(ninf);
  int64_t j0 = 0;
  for (; j0 + kW <= keys; j0 += kW) {
    const vec x = loadv(s + j0);
    vmx = x > vmx ? x : vmx;  // NaN scores are dropped from the max, and stay NaN below
  }
  float mx = ninf;
  for (int l = 0; l < kW; ++l) mx = std::max(mx, vmx[l]);
  for (; j0 < keys; ++j0) mx = std::max(mx, s[j0]);
  if (mx == ninf) {  // no key to attend to: zeros, as torch's scaled_dot_product_attention gives (or NaN)
    std::fill(s, s + keys, 0.f);
    return empty_nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const vec m = splat(mx);
  vec acc = vec{};
  int64_t j = 0;
  for (; j + kW <= keys; j += kW) {
    const vec e = exp_nonpos(loadv(s + j) - m);
    storev(s + j, e);
    acc += e;
  }
  float sum = 0.f;
  for (int l = 0; l < kW; ++l) sum += acc[l];
  if (j < keys) {
    float tail[kW];
    for (int l = 0; l < kW; ++l) tail[l] = j + l < keys ? s[j + l] - mx : -1000.f;
    const vec e = exp_nonpos(loadv(tail));
    for (int l = 0; j + l < keys; ++l) {
      s[j + l] = e[l];
      sum += e[l];
    }
  }
  return 1.f / sum;
}

// dst (rows x dim, contiguous) = rows of src `stride` floats apart, each row's lines prefetched 8 rows ahead
inline void gather_rows(float* dst, const float* src, int64_t rows, int64_t dim, int64_t stride) {
  constexpr int64_t ahead = 8;
  for (int64_t j = 0; j < std::min(rows, ahead); ++j)
    for (int64_t c = 0; c < dim; c += 16) __builtin_prefetch(src + j * stride + c);
  for (int64_t j = 0; j < rows; ++j) {
    if (j + ahead < rows)
      for (int64_t c = 0; c < dim; c += 16) __builtin_prefetch(src + (j + ahead) * stride + c);
    std::memcpy(dst + j * dim, src + j * stride, sizeof(float) * static_cast<size_t>(dim));
  }
}

}  // namespace

void SP_ATTN_NAME(const AttnArgs& a, int num_threads) {
  const int64_t units = a.batch * a.heads;
  const int64_t cols = (a.keys + kC - 1) / kC * kC;  // K^T and score rows padded to whole tiles
  const int nt = threads_for(units * a.queries * a.keys * a.dim * 2, num_threads);
#pragma omp parallel num_threads(fork_safe_threads(nt))
  {
    std::vector<float> kt(static_cast<size_t>(a.dim * cols)), sbuf(static_cast<size_t>(kR * cols)),
        vbuf(static_cast<size_t>(a.keys * a.dim)), kbuf(static_cast<size_t>(a.keys * a.dim)),
        qbuf(static_cast<size_t>(a.queries * a.dim));
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / a.heads, h = u % a.heads;
      const float* q = a.q + b * a.q_sb + h * a.q_sh;
      const float* k = a.k + b * a.k_sb + h * a.k_sh;
      const float* v = a.v + b * a.v_sb + h * a.v_sh;
      float* o = a.o + b * a.o_sb + h * a.o_sh;
      // this head's rows of K, V and Q, contiguous: in place each is a 256-byte slice of a token's 3 KiB row,
      // usually in L3 after the projections; the copies prefetch ahead (the rows are independent) and every
      // later pass reads L1 / L2
      gather_rows(kbuf.data(), k, a.keys, a.dim, a.k_sr);
      gather_rows(vbuf.data(), v, a.keys, a.dim, a.v_sr);
      gather_rows(qbuf.data(), q, a.queries, a.dim, a.q_sr);
      // K^T, zero-padded to `cols`
      SP_ATTN_TRANSPOSE(kbuf.data(), 1, a.keys, a.dim, a.dim, 0, kt.data(), cols, 0, 1);
      for (int64_t d = 0; d < a.dim; ++d) std::fill(kt.data() + d * cols + a.keys, kt.data() + (d + 1) * cols, 0.f);
      for (int64_t i = 0; i < a.queries; i += kR) {
        const int rows = static_cast<int>(std::min<int64_t>(kR, a.queries - i));
        float* s = sbuf.data();
        const float* qi = qbuf.data() + i * a.dim;
        switch (rows) {
          case 6: qk_tile<6>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
          case 5: qk_tile<5>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
          case 4: qk_tile<4>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
          case 3: qk_tile<3>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
          case 2: qk_tile<2>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
          default: qk_tile<1>(qi, a.dim, kt.data(), cols, a.dim, cols, s, cols); break;
        }
        float inv[kR];
        for (int r = 0; r < rows; ++r) {
          const int64_t moff = b * a.m_sb + h * a.m_sh + (i + r) * a.m_sr;
          inv[r] = softmax_row(s + r * cols, a.keys, a.scale, a.mask_add ? a.mask_add + moff : nullptr,
                               a.mask_keep ? a.mask_keep + moff : nullptr, a.empty_nan);
        }
        float* oi = o + i * a.o_sr;
        switch (rows) {
          case 6: pv_tile<6>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
          case 5: pv_tile<5>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
          case 4: pv_tile<4>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
          case 3: pv_tile<3>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
          case 2: pv_tile<2>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
          default: pv_tile<1>(s, cols, vbuf.data(), a.dim, a.keys, a.dim, inv, oi, a.o_sr); break;
        }
      }
    }
  }
}

}  // namespace sparseprune
