// Thin SIMD traits over x86 intrinsics. Included inside an ISA namespace (SP_NS) so that each
// translation unit, compiled with its own -m flags, gets its own copies (no ODR mixing of ISAs).
#pragma once
#include <immintrin.h>
#include <cstdint>

// 8 x f32 in a ymm register (AVX2 + FMA).
struct V8 {
  using T = __m256;
  static constexpr int W = 8;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float v) { return _mm256_set1_ps(v); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256i mask(int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
  }
  static inline T loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline void storen(float* p, T v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  // p[0..3] in both 128-bit halves (one load); lane<u>(q) is p[u] in every lane (an in-lane shuffle, no load)
  static inline T dup4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  template <int U>
  static inline T lane(T q) { return _mm256_permute_ps(q, 0x55 * U); }
  // lanes [lo, hi) as a store mask
  using M = __m256i;
  static inline M mrange(int lo, int hi) {
    const __m256i l = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), l), _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), l));
  }
  static inline void store_m(float* p, T v, M m) { _mm256_maskstore_ps(p, m, v); }
  static inline T load_m(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static inline float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline __m256i idx(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline __m256i idx(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <class Idx>
  static inline T gather(const float* base, const Idx* p) {
    return _mm256_i32gather_ps(base, idx(p), 4);
  }
};

#if defined(__AVX512F__)
// 16 x f32 in a zmm register (AVX-512F).
struct V16 {
  using T = __m512;
  static constexpr int W = 16;
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T set1(float v) { return _mm512_set1_ps(v); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline T loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline void storen(float* p, T v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T dup4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  template <int U>
  static inline T lane(T q) { return _mm512_permute_ps(q, 0x55 * U); }
  using M = __mmask16;
  static inline M mrange(int lo, int hi) { return static_cast<M>(((1u << hi) - 1u) & ~((1u << lo) - 1u)); }
  static inline void store_m(float* p, T v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static inline T load_m(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static inline __m512i idx(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline __m512i idx(const int32_t* p) { return _mm512_loadu_si512(p); }
  template <class Idx>
  static inline T gather(const float* base, const Idx* p) {
    return _mm512_i32gather_ps(idx(p), base, 4);
  }
};
#endif

// 8x8 transpose of f32: rows src[i*lds .. +8] -> dst[j*ldd + i].
static inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}
