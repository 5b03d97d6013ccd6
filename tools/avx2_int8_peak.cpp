// The ceiling of the AVX2 int8 kernels on the machine at hand: the vpmaddubsw -> vpmaddwd -> vpaddd
// triple (32 u8 x s8 MACs into int32, as qspmm_simd.h's S8Maddubs8 does per weight vector and row) run on
// 12 independent chains, nothing else. Build and run (one core):
//   g++ -O2 -mavx2 tools/avx2_int8_peak.cpp -o /tmp/avx2_int8_peak && /tmp/avx2_int8_peak
// Zen 3 (AMD EPYC family 25 model 1), 2 Dec 2026: 1.84 G triples/s = 58.9 GMAC/s per core, i.e. about one
// multiply uop per cycle; the 90% 16x16 int8 BSR kernel did 85-103 GMAC/s on 2 cores at 128 x 768 -> M.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

int main() {
  __m256i w = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[12], x[12];
  for (int i = 0; i < 12; ++i) {
    acc[i] = _mm256_setzero_si256();
    x[i] = _mm256_set1_epi32(i + 1);
  }
  const long n = 200000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < n; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x[i], w), ones));
    __asm__ volatile("" : "+x"(w));  // w unknown each iteration: nothing is hoisted
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m256i t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_epi32(t, acc[i]);
  std::printf("(checksum %d) %.2f G triples/s = %.1f GMAC/s on one core\n", _mm256_extract_epi32(t, 0),
              n * 12 / s / 1e9, n * 12 * 32 / s / 1e9);
  return 0;
}
