// Vector activations for the fused epilogues. Include inside an ISA namespace after <immintrin.h>
// (each TU compiles its own copy with its own -m flags). act_v(v, act) overloads __m256 and, where
// the TU has AVX-512F, __m512; act codes are those of sparseprune/epilogue.h.
//
// exp: Cephes expf (range reduction by ln 2 in two parts, degree-6 polynomial, 2^n through the
// exponent bits), input clamped to [-87, 88] so 2^n stays a normal float.
// GELU (erf): max(x, 0) - |x|/2 * erfc(|x|/sqrt 2), erfc from a rational fit of erf (see gelu below).
// Reciprocals by estimate + Newton step, no vdivps. GELU (tanh) and SiLU: x * sigmoid(k), as x / (1 + exp(-k)).
#pragma once
#include "sparseprune/epilogue.h"

struct EV8 {
  using T = __m256;
  static inline T set1(float v) { return _mm256_set1_ps(v); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static inline T rcp0(T a) { return _mm256_rcp_ps(a); }  // ~12 bits
  static inline T zero_gt(T v, T a, T b) { return _mm256_andnot_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ), v); }  // a > b ? 0 : v
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T fnma(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a*b
  static inline T max(T a, T b) { return _mm256_max_ps(a, b); }
  static inline T min(T a, T b) { return _mm256_min_ps(a, b); }
  static inline T abs(T a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline T nan_at_neg_inf(T v, T x) {  // x == -inf ? NaN : v
    return _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")), _mm256_cmp_ps(x, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ));
  }
  static inline T pow2(T n) {  // 2^n for integral n in [-126, 127]
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
};

#if defined(__AVX512F__)
struct EV16 {
  using T = __m512;
  static inline T set1(float v) { return _mm512_set1_ps(v); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T rcp0(T a) { return _mm512_rcp14_ps(a); }  // ~14 bits
  static inline T zero_gt(T v, T a, T b) { return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), _mm512_setzero_ps()); }
  static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T fnma(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline T max(T a, T b) { return _mm512_max_ps(a, b); }
  static inline T min(T a, T b) { return _mm512_min_ps(a, b); }
  static inline T abs(T a) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
  }
  static inline T round(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline T nan_at_neg_inf(T v, T x) {  // x == -inf ? NaN : v
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ),
                              _mm512_set1_ps(__builtin_nanf("")));
  }
  static inline T pow2(T n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
};
#endif

template <class E>
struct ActMath {
  using T = typename E::T;
  static inline T exp(T x) {
    x = E::min(E::max(x, E::set1(-87.0f)), E::set1(88.0f));
    const T n = E::round(E::mul(x, E::set1(1.44269504088896341f)));
    T r = E::fnma(n, E::set1(0.693359375f), x);
    r = E::fnma(n, E::set1(-2.12194440e-4f), r);
    T p = E::set1(1.9875691500e-4f);
    p = E::fma(p, r, E::set1(1.3981999507e-3f));
    p = E::fma(p, r, E::set1(8.3334519073e-3f));
    p = E::fma(p, r, E::set1(4.1665795894e-2f));
    p = E::fma(p, r, E::set1(1.6666665459e-1f));
    p = E::fma(p, r, E::set1(5.0000001201e-1f));
    p = E::fma(p, E::mul(r, r), E::add(r, E::set1(1.0f)));
    return E::mul(p, E::pow2(n));
  }
  // 1 / d for d >= 1 (no division: vdivps is a 10-16 cycle, one-port instruction that made a fused
  // GELU cost more than the whole 90%-sparse product): the estimate plus one Newton step, within
  // ~2 ulp; 0 where 1 / d is below the normal range (rcp flushes it; a denormal would be slow).
  static inline T rcp(T d) {
    const T r = E::rcp0(d);
    return E::fma(r, E::fnma(d, r, E::set1(1.0f)), r);
  }
  // x / (1 + exp(-k)): x * sigmoid(k); 0 where -k > 87 (exp saturates there, and x * e^k is below
  // anything x can resolve; dividing by the saturated value gave -1.8 for silu(-3e38))
  // (x = -inf: NaN, as PyTorch's -inf / inf and -inf * 0 give)
  static inline T x_sigmoid(T x, T k) {
    const T nk = E::mul(k, E::set1(-1.0f));
    return E::nan_at_neg_inf(E::zero_gt(E::mul(x, rcp(E::add(E::set1(1.0f), exp(nk)))), nk, E::set1(87.0f)), x);
  }
  // GELU (erf) = max(x, 0) - |x|/2 * erfc(|x| / sqrt 2), erf(x / sqrt 2) ~ x P(x^2) / Q(x^2) for |x| <= 5.6
  // (a rational fit made for this file: tools/fit_gelu.py; erfc is 0 beyond, below what the result can
  // resolve). ~23 vector ops where Abramowitz & Stegun's erfc with an exp took ~42, and nothing leaves the
  // normal range. Error <= 7.9e-7 x max(|gelu(x)|, 1); exact 0 / x in the far tails.
  static inline T gelu(T x) {
    const T a = E::abs(x);
    const T ac = E::min(a, E::set1(5.6f));  // min(NaN, c) = c: NaN comes back through max(0, x) below
    const T t = E::mul(ac, ac);
    T p = E::set1(2.16534068e-10f);
    p = E::fma(p, t, E::set1(-4.61340512e-08f));
    p = E::fma(p, t, E::set1(7.53938684e-06f));
    p = E::fma(p, t, E::set1(0.000426679326f));
    p = E::fma(p, t, E::set1(0.00955026597f));
    p = E::fma(p, t, E::set1(0.0798498243f));
    p = E::fma(p, t, E::set1(0.797883689f));
    T q = E::set1(7.72214989e-05f);
    q = E::fma(q, t, E::set1(0.00207399321f));
    q = E::fma(q, t, E::set1(0.0314358771f));
    q = E::fma(q, t, E::set1(0.266737401f));
    q = E::fma(q, t, E::set1(1.0f));  // >= 1
    // |x|/2 erfc(|x|/sqrt 2), 0 beyond 5.6 (a product zeroed, not a zero factor: +inf gives inf, not inf x 0)
    const T tail = E::zero_gt(E::mul(E::mul(a, E::set1(0.5f)), E::fnma(E::mul(ac, p), rcp(q), E::set1(1.0f))), a,
                              E::set1(5.6f));
    return E::nan_at_neg_inf(E::sub(E::max(E::set1(0.0f), x), tail), x);  // -inf: NaN, as x * Phi(x) = -inf * 0
  }
  static inline T apply(T v, int act) {
    switch (act) {
      case kActRelu: return E::max(E::set1(0.0f), v);
      case kActGelu: return gelu(v);
      case kActGeluTanh: {
        const T x3 = E::mul(E::mul(v, v), v);
        const T u = E::mul(E::fma(x3, E::set1(0.044715f), v), E::set1(2.0f * 0.79788456080286536f));
        return x_sigmoid(v, u);
      }
      case kActSilu: return x_sigmoid(v, v);
      default: return v;
    }
  }
};

static inline __m256 act_v(__m256 v, int act) { return act ? ActMath<EV8>::apply(v, act) : v; }
#if defined(__AVX512F__)
static inline __m512 act_v(__m512 v, int act) { return act ? ActMath<EV16>::apply(v, act) : v; }
#endif
