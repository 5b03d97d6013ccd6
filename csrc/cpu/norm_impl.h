// The body of the add + LayerNorm kernel (see norm.cpp), compiled once per vector width: norm.cpp (the
// baseline ISA, 16-byte vectors) and norm_avx2.cpp (-mavx2 -mfma, 32-byte vectors). The includer defines
// SP_NORM_BYTES and SP_NORM_NAME.
#include <cmath>
#include <cstdint>

#include "sparseprune/kernels.h"
#include "sparseprune/parallel.h"

namespace sparseprune {

namespace {

// Four independent vector accumulators (GCC vector extensions): one chain of dependent adds would be
// latency-bound, 3-4 cycles per vector. (32-byte vectors without AVX enabled spill to the stack: hence one
// width per translation unit.)
typedef float vec __attribute__((vector_size(SP_NORM_BYTES)));
constexpr int kW = SP_NORM_BYTES / 4;

inline vec loadv(const float* p) {
  vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, vec v) { __builtin_memcpy(p, &v, sizeof v); }
inline float hsum(vec v) {
  float s = 0.f;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}

// sum of s[j] = a[j] (+ b[j]), s written to y
inline float sum_into(const float* a, const float* b, float* y, int64_t cols) {
  vec acc[4] = {};
  int64_t j = 0;
  for (; j + 4 * kW <= cols; j += 4 * kW)
    for (int u = 0; u < 4; ++u) {
      vec s = loadv(a + j + kW * u);
      if (b) s += loadv(b + j + kW * u);
      storev(y + j + kW * u, s);
      acc[u] += s;
    }
  float tail = 0.f;
  for (; j < cols; ++j) {
    y[j] = b ? a[j] + b[j] : a[j];
    tail += y[j];
  }
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
}

inline float sum_sq_dev(const float* y, float mean, int64_t cols) {
  vec acc[4] = {};
  const vec m = vec{} + mean;
  int64_t j = 0;
  for (; j + 4 * kW <= cols; j += 4 * kW)
    for (int u = 0; u < 4; ++u) {
      const vec d = loadv(y + j + kW * u) - m;
      acc[u] += d * d;
    }
  float tail = 0.f;
  for (; j < cols; ++j) tail += (y[j] - mean) * (y[j] - mean);
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
}

void one_row(const float* a, const float* b, const float* gamma, const float* beta, float* y, int64_t cols,
             float eps) {
  const float mean = sum_into(a, b, y, cols) / static_cast<float>(cols);
  const float rstd = 1.f / std::sqrt(sum_sq_dev(y, mean, cols) / static_cast<float>(cols) + eps);
  if (gamma && beta) {
    for (int64_t j = 0; j < cols; ++j) y[j] = (y[j] - mean) * rstd * gamma[j] + beta[j];
  } else if (gamma) {
    for (int64_t j = 0; j < cols; ++j) y[j] = (y[j] - mean) * rstd * gamma[j];
  } else if (beta) {
    for (int64_t j = 0; j < cols; ++j) y[j] = (y[j] - mean) * rstd + beta[j];
  } else {
    for (int64_t j = 0; j < cols; ++j) y[j] = (y[j] - mean) * rstd;
  }
}

}  // namespace

void SP_NORM_NAME(const float* a, const float* b, const float* gamma, const float* beta, float* y, int64_t rows,
                       int64_t cols, float eps, int num_threads) {
  const int nt = threads_for(rows * cols * 2, num_threads);
#pragma omp parallel for num_threads(fork_safe_threads(nt)) schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    one_row(a + i * cols, b ? b + i * cols : nullptr, gamma, beta, y + i * cols, cols, eps);
}

}  // namespace sparseprune
