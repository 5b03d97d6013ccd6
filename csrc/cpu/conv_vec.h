// Minimal SIMD traits for the conv kernels. Included inside an ISA namespace (conv_avx2,
// conv_avx512) so each translation unit, compiled with its own -m flags, gets its own copies.
#pragma once
#include <immintrin.h>
#include <cstdint>

// 8 x f32 in a ymm register (AVX2 + FMA).
struct CV8 {
  using T = __m256;
  static constexpr int W = 8;
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float v) { return _mm256_set1_ps(v); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline T loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline void storen(float* p, T v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  // lanes [lo, hi) as a store mask
  using M = __m256i;
  static inline M mrange(int lo, int hi) {
    const __m256i l = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), l), _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), l));
  }
  static inline void store_m(float* p, T v, M m) { _mm256_maskstore_ps(p, m, v); }
};

#if defined(__AVX512F__)
// 16 x f32 in a zmm register (AVX-512F); masked loads never touch memory outside the mask.
struct CV16 {
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
  using M = __mmask16;
  static inline M mrange(int lo, int hi) { return static_cast<M>(((1u << hi) - 1u) & ~((1u << lo) - 1u)); }
  static inline void store_m(float* p, T v, M m) { _mm512_mask_storeu_ps(p, m, v); }
};
#endif
