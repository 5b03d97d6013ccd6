// Per-call preparation of X for the quantized kernels: one row of X -> a row of 32-bit words
// (int8: 4 x u8 quantized per row, see qkernels.h; bf16: 2 x bf16 rounded to nearest even).
// Included inside an ISA namespace (like vec_x86.h): the AVX2 branch is taken in every x86 TU,
// the scalar branch in the reference TU; both give bit-identical words (min/max are exact, both
// round with nearest-even, both clamp NaN to 0). Files including this are built -ffp-contract=off.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

// Activations are quantized to [0, kQMax]: 7 bits, as torch's dynamic quantization does on x86
// (fbgemm's reduce_range). Then u8 x s8 pair sums fit 16 bits (2 * 127 * 128 < 2^15), so the AVX2
// kernel's vpmaddubsw is exact (one multiply per 4 k where 16-bit halves took two).
constexpr float kQMax = 127.0f;

struct QRowParams {
  float s = 1.0f;    // scale
  float inv = 1.0f;  // 1 / s
  int32_t zp = 0;    // zero point, in [0, kQMax]
};

inline QRowParams q_row_params(float lo, float hi) {
  lo = lo < 0.0f ? lo : 0.0f;
  hi = hi > 0.0f ? hi : 0.0f;
  QRowParams p;
  float s = (hi - lo) / kQMax;
  // a finite range wider than float32 (hi - lo overflows: e.g. a row of +-2e38) scaled part by part
  if (std::isinf(s) && std::isfinite(hi) && std::isfinite(lo)) s = hi / kQMax - lo / kQMax;
  // all-zero rows, and ranges so small that 1 / s would overflow, use s = 1 (q == zp == 0 for them)
  if (!(s >= 1e-30f) || !std::isfinite(s)) s = 1.0f;
  p.s = s;
  p.inv = 1.0f / s;
  float z = std::nearbyint(-lo / s);
  z = z > 0.0f ? z : 0.0f;
  z = z < kQMax ? z : kQMax;
  p.zp = static_cast<int32_t>(z);
  return p;
}

inline uint32_t q_u8(float x, float inv, float zp) {
  float t = std::nearbyint(x * inv) + zp;
  t = t > 0.0f ? t : 0.0f;  // NaN -> 0
  t = t < kQMax ? t : kQMax;
  return static_cast<uint32_t>(t);
}

inline uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// int8, first pass: the range of x[0, K) (with 0 inside it) and whether a NaN or infinity occurs.
struct QRowRange {
  float lo = 0.0f, hi = 0.0f;
  bool bad = false;
};

inline QRowRange q_row_range(const float* x, int64_t K) {
  float lo = 0.0f, hi = 0.0f;
  bool bad = false;
  int64_t k = 0;
#if defined(__AVX512BW__)
  {
    // four independent min / max chains (one chain is bound by the 4-cycle latency, not the loads);
    // x as the first operand: minps / maxps return the second (the accumulator) when x is NaN, so NaN is skipped
    // as in the scalar loop below. A NaN is caught by unordered compares (one per two vectors, into a mask: no
    // dependency chain through a vector register), an infinity by lo / hi at the end.
    __m512 vlo[4], vhi[4];
    const __m512 zero = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) vlo[j] = vhi[j] = zero;
    __mmask16 nan = 0;
    for (; k + 64 <= K; k += 64) {
      __m512 v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm512_loadu_ps(x + k + 16 * j);
        vlo[j] = _mm512_min_ps(v[j], vlo[j]);
        vhi[j] = _mm512_max_ps(v[j], vhi[j]);
      }
      nan |= static_cast<__mmask16>(_mm512_cmp_ps_mask(v[0], v[1], _CMP_UNORD_Q) |
                                    _mm512_cmp_ps_mask(v[2], v[3], _CMP_UNORD_Q));
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + k);
      vlo[0] = _mm512_min_ps(v, vlo[0]);
      vhi[0] = _mm512_max_ps(v, vhi[0]);
      nan |= static_cast<__mmask16>(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    }
    bad = nan != 0;
    lo = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_min_ps(vlo[0], vlo[1]), _mm512_min_ps(vlo[2], vlo[3])));
    hi = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vhi[0], vhi[1]), _mm512_max_ps(vhi[2], vhi[3])));
  }
#endif
#if defined(__AVX2__)
  {
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps();
    __m256 nz = zero;
    {
      __m256 l[4], h[4], z[4];
      for (int j = 0; j < 4; ++j) l[j] = h[j] = z[j] = zero;
      for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; ++j) {
          const __m256 v = _mm256_loadu_ps(x + k + 8 * j);
          l[j] = _mm256_min_ps(v, l[j]);
          h[j] = _mm256_max_ps(v, h[j]);
          z[j] = _mm256_fmadd_ps(v, zero, z[j]);
        }
      vlo = _mm256_min_ps(_mm256_min_ps(l[0], l[1]), _mm256_min_ps(l[2], l[3]));
      vhi = _mm256_max_ps(_mm256_max_ps(h[0], h[1]), _mm256_max_ps(h[2], h[3]));
      nz = _mm256_add_ps(_mm256_add_ps(z[0], z[1]), _mm256_add_ps(z[2], z[3]));
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vlo = _mm256_min_ps(v, vlo);
      vhi = _mm256_max_ps(v, vhi);
      nz = _mm256_fmadd_ps(v, zero, nz);
    }
    alignas(32) float a[8], b[8], z[8];
    _mm256_store_ps(a, vlo);
    _mm256_store_ps(b, vhi);
    _mm256_store_ps(z, nz);
    for (int i = 0; i < 8; ++i) {
      lo = a[i] < lo ? a[i] : lo;
      hi = b[i] > hi ? b[i] : hi;
      bad |= z[i] != 0.0f;
    }
  }
#endif
  for (; k < K; ++k) {
    lo = x[k] < lo ? x[k] : lo;
    hi = x[k] > hi ? x[k] : hi;
    bad |= x[k] * 0.0f != 0.0f;
  }
  // an infinity anywhere in the row is lo or hi (what the AVX-512 loop relies on; the others saw it already)
  bad |= std::isinf(lo) || std::isinf(hi);
  QRowRange r;
  r.lo = lo;
  r.hi = hi;
  r.bad = bad;
  return r;
}

inline QRowParams q_row_params(const QRowRange& r) {
  QRowParams p = q_row_params(r.lo, r.hi);
  // a NaN or infinity in the row: its scale is NaN, so the whole output row is NaN (as a float matmul's
  // would be) instead of a finite number computed from the rest of the row
  if (r.bad) p.s = std::numeric_limits<float>::quiet_NaN();
  return p;
}

#if defined(__AVX512BW__)
// int8: 64 floats of a row quantized into 16 words, in the order the packs leave them (they work within
// 128-bit lanes): dword 4 * l + j holds word 4 * j + l, i.e. x[16 j + 4 l ..]. As the AVX2 loop below:
// vcvtps2dq rounds to nearest even, the packs saturate (NaN -> INT_MIN -> 0).
// The zero point (vzp16: in every 16-bit lane) is added after the first pack, with saturation: the same bytes
// as adding it to the 32-bit values (in range the sums are exact; out of range both saturate the same way).
inline __m512i q_quant64(const float* x, __m512 vinv, __m512i vzp16, __m512i vqmax) {
  __m512i q[4];
  for (int j = 0; j < 4; ++j) q[j] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * j), vinv));
  const __m512i b = _mm512_packus_epi16(_mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), vzp16),
                                        _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), vzp16));
  return _mm512_min_epu8(b, vqmax);
}
// The word held by dword d of q_quant64's result.
constexpr int q_quant64_word(int d) { return 4 * (d % 4) + d / 4; }
#endif

// int8, second pass: x[0, K) quantized with p into kg words (k >= K are 0).
inline void q_row_quantize(const float* x, int64_t K, int64_t kg, const QRowParams& p, uint32_t* out) {
  const float zpf = static_cast<float>(p.zp);
  int64_t g = 0;
#if defined(__AVX512BW__)
  {
    // 64 at a time, put back in order
    const __m512 vinv = _mm512_set1_ps(p.inv);
    const __m512i vzp16 = _mm512_set1_epi16(static_cast<int16_t>(p.zp));
    const __m512i vqmax = _mm512_set1_epi8(static_cast<char>(kQMax));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; 4 * g + 64 <= K; g += 16) {
      const __m512i b = _mm512_permutexvar_epi32(order, q_quant64(x + 4 * g, vinv, vzp16, vqmax));
      _mm512_storeu_si512(reinterpret_cast<void*>(out + g), b);
    }
  }
  {
    const __m512 vinv = _mm512_set1_ps(p.inv), vzp = _mm512_set1_ps(zpf);
    const __m512 v0 = _mm512_setzero_ps(), vmax = _mm512_set1_ps(kQMax);
    for (; 4 * g + 16 <= K; g += 4) {
      __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 4 * g), vinv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t = _mm512_add_ps(t, vzp);
      t = _mm512_min_ps(_mm512_max_ps(t, v0), vmax);  // max(NaN, 0) = 0
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t)));
    }
  }
#endif
#if defined(__AVX2__)
  {
    // 32 at a time: vcvtps2dq rounds to nearest even like nearbyint (|x * inv| <= 127 for a finite row;
    // NaN gives INT_MIN, clamped to 0 as below), the zero point added as an integer (exact), then packs
    // with saturation to bytes and one 32-byte store
    const __m256 vinv = _mm256_set1_ps(p.inv);
    const __m256i vzpi = _mm256_set1_epi32(p.zp), vqmax = _mm256_set1_epi8(static_cast<char>(kQMax));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; 4 * g + 32 <= K; g += 8) {
      __m256i q[4];
      for (int j = 0; j < 4; ++j)
        q[j] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 4 * g + 8 * j), vinv)), vzpi);
      __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      b = _mm256_permutevar8x32_epi32(_mm256_min_epu8(b, vqmax), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g), b);
    }
  }
  {
    const __m256 vinv = _mm256_set1_ps(p.inv), vzp = _mm256_set1_ps(zpf);
    const __m256 v0 = _mm256_setzero_ps(), vmax = _mm256_set1_ps(kQMax);
    const __m128i pick = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (; 4 * g + 8 <= K; g += 2) {
      __m256 t = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 4 * g), vinv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t = _mm256_add_ps(t, vzp);
      t = _mm256_min_ps(_mm256_max_ps(t, v0), vmax);  // max(NaN, 0) = 0
      const __m256i q = _mm256_cvttps_epi32(t);
      out[g] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_shuffle_epi8(_mm256_castsi256_si128(q), pick)));
      out[g + 1] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_shuffle_epi8(_mm256_extracti128_si256(q, 1), pick)));
    }
  }
#endif
  for (; g < kg; ++g) {
    uint32_t wd = 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t kk = 4 * g + j;
      if (kk < K) wd |= q_u8(x[kk], p.inv, zpf) << (8 * j);
    }
    out[g] = wd;
  }
}

#if defined(__AVX512BW__)
// Eight rows' 16 words each (q[j]: row j, dword d holding word WORD(d)) into a panel: word g of row j to
// dst[g * ps + j]. Transposed in registers (two unpack steps within lanes, one two-source qword permute
// across them), one 32-byte store per word: where the words went through a row buffer and 8x8 transposes
// of 32-byte loads, that round trip cost about as much as the quantization itself.
template <int (*WORD)(int)>
inline void panel_store8x16(const __m512i (&q)[8], uint32_t* dst, int64_t ps) {
  __m512i t[8], u[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm512_unpacklo_epi32(q[j], q[j + 1]);      // lane l: dwords 4l, 4l+1 of rows j, j+1
    t[j + 1] = _mm512_unpackhi_epi32(q[j], q[j + 1]);  // dwords 4l+2, 4l+3
  }
  for (int b = 0; b < 8; b += 4) {  // u[b/4*4 + i], lane l: dword 4l+i of rows b..b+3
    u[b + 0] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
    u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
    u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int i = 0; i < 4; ++i) {
    const __m512i a = _mm512_permutex2var_epi64(u[i], lo, u[i + 4]);  // dword i of rows 0-7, then dword 4+i
    const __m512i b = _mm512_permutex2var_epi64(u[i], hi, u[i + 4]);  // dwords 8+i, 12+i
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + WORD(i) * ps), _mm512_castsi512_si256(a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + WORD(4 + i) * ps), _mm512_extracti64x4_epi64(a, 1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + WORD(8 + i) * ps), _mm512_castsi512_si256(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + WORD(12 + i) * ps), _mm512_extracti64x4_epi64(b, 1));
  }
}

// int8: rows x[j] (j < 8), K floats each, quantized with p[j] straight into a panel (word g of row j at
// dst[g * ps + j]) for the words of whole 64-float groups; returns how many words that was (the rest, with
// the zero padding, goes through q_row_quantize). Bit-identical to q_row_quantize.
inline int64_t q_rows8_to_panel(const float* const (&x)[8], int64_t K, const QRowParams (&p)[8], uint32_t* dst,
                                int64_t ps) {
  __m512 vinv[8];
  __m512i vzp[8];
  for (int j = 0; j < 8; ++j) {
    vinv[j] = _mm512_set1_ps(p[j].inv);
    vzp[j] = _mm512_set1_epi16(static_cast<int16_t>(p[j].zp));
  }
  const __m512i vqmax = _mm512_set1_epi8(static_cast<char>(kQMax));
  int64_t g = 0;
  for (; 4 * g + 64 <= K; g += 16) {
    __m512i q[8];
    for (int j = 0; j < 8; ++j) q[j] = q_quant64(x[j] + 4 * g, vinv[j], vzp[j], vqmax);
    panel_store8x16<q_quant64_word>(q, dst + g * ps, ps);
  }
  return g;
}
#endif

// int8: quantize x[0, K) into kg words (k >= K are 0). Returns this row's parameters.
inline QRowParams q_row_words(const float* x, int64_t K, int64_t kg, uint32_t* out) {
  const QRowParams p = q_row_params(q_row_range(x, K));
  q_row_quantize(x, K, kg, p, out);
  return p;
}

#if defined(__AVX512BW__)
// bf16: rows x[j] (float32) or xb[j] (already bf16; x null), j < 8, K values each, straight into a panel as
// q_rows8_to_panel does for int8, for the words of whole 32-value groups; returns how many words that was.
// Bit-identical to bf16_row_words (the same integer rounding).
constexpr int bf16_packus_word(int d) { return (d % 4 < 2 ? 2 * (d / 4) : 8 + 2 * (d / 4) - 2) + d % 4; }
constexpr int bf16_same_word(int d) { return d; }
inline int64_t bf16_rows8_to_panel(const float* const (&x)[8], const uint16_t* const (&xb)[8], int64_t K,
                                   uint32_t* dst, int64_t ps) {
  int64_t g = 0;
  if (x[0]) {
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    auto round16 = [&](const float* p) {  // 16 values -> their bf16 bits in the low halves of 16 dwords
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(p));
      return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    };
    for (; 2 * g + 32 <= K; g += 16) {
      __m512i q[8];
      // packus within 128-bit lanes: dword 4l + {0, 1} holds words 2l + {0, 1}, dword 4l + {2, 3} words 8 + 2l + {0, 1}
      for (int j = 0; j < 8; ++j) q[j] = _mm512_packus_epi32(round16(x[j] + 2 * g), round16(x[j] + 2 * g + 16));
      panel_store8x16<bf16_packus_word>(q, dst + g * ps, ps);
    }
  } else {
    for (; 2 * g + 32 <= K; g += 16) {
      __m512i q[8];
      for (int j = 0; j < 8; ++j) q[j] = _mm512_loadu_si512(xb[j] + 2 * g);
      panel_store8x16<bf16_same_word>(q, dst + g * ps, ps);
    }
  }
  return g;
}
#endif

// bf16: round x[0, K) to bf16 pairs, kg words (k >= K are 0). xb: X already in bf16 (or null).
inline void bf16_row_words(const float* x, const uint16_t* xb, int64_t K, int64_t kg, uint32_t* out) {
  int64_t g = 0;
  if (xb) {
    const int64_t full = K / 2;
    std::memcpy(out, xb, static_cast<size_t>(full) * 4);
    g = full;
    for (; g < kg; ++g) out[g] = 2 * g < K ? xb[2 * g] : 0u;
    return;
  }
#if defined(__AVX512BW__)
  {
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (; 2 * g + 16 <= K; g += 8) {
      const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + 2 * g));
      const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
  }
#endif
#if defined(__AVX2__)
  {
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    for (; 2 * g + 8 <= K; g += 4) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + 2 * g));
      const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
      const __m256i h = _mm256_srli_epi32(r, 16);  // 8 bf16 in the low halves of 8 dwords
      // pair neighbours: word j = h[2j] | h[2j+1] << 16
      const __m256i pairs = _mm256_or_si256(h, _mm256_srli_epi64(h, 16));
      const __m256i packed = _mm256_permutevar8x32_epi32(pairs, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g), _mm256_castsi256_si128(packed));
    }
  }
#endif
  for (; g < kg; ++g) {
    const uint32_t a = 2 * g < K ? bf16_bits(x[2 * g]) : 0u;
    const uint32_t b = 2 * g + 1 < K ? bf16_bits(x[2 * g + 1]) : 0u;
    out[g] = a | (b << 16);
  }
}
