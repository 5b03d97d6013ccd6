// Explicit threading helpers: callers pass num_threads, we never read a global setting.
#pragma once
#include <algorithm>
#include <cstdint>
#include <omp.h>

namespace sparseprune {

// Below this much work (multiply-adds) a thread start costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 15;

inline int threads_for(int64_t work, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::min<int64_t>(num_threads, by_work));
}

// Split block rows [0, nrows) into `parts` ranges holding about equal numbers of non-zeros
// (row_ptr is the prefix sum we need). Returns the start of part `p`.
inline int64_t balanced_split(const int32_t* row_ptr, int64_t nrows, int parts, int p) {
  if (p <= 0) return 0;
  if (p >= parts) return nrows;
  // weight each row by nnz + 1 so that empty rows (which still write bias) are spread too
  const int64_t total = row_ptr[nrows] + nrows;
  const int64_t target = total * p / parts;
  int64_t lo = 0, hi = nrows;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (row_ptr[mid] + mid < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace sparseprune
