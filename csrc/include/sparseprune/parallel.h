// Explicit threading helpers: callers pass num_threads, we never read a global setting.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <omp.h>
#include <unistd.h>

namespace sparseprune {

// This core's L2 in bytes (sysconf; 512 KiB when unknown, as on the Zen 3 the xt K-chunk rule was measured on).
inline int64_t l2_bytes() {
  static const int64_t v = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long b = 0;
#endif
    return b >= (int64_t(64) << 10) && b <= (int64_t(64) << 20) ? static_cast<int64_t>(b) : int64_t(512) << 10;
  }();
  return v;
}

// Set in a child process after fork() (registered once by the extension's init): libgomp's thread pool does not
// survive a fork, and a team of more than one thread in the child waits forever. A forked child gets at most
// omp_get_max_threads() threads, which follows torch.set_num_threads (DataLoader workers set 1), whatever
// thread count a layer was pinned to.
inline std::atomic<bool>& forked_child() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline int fork_safe_threads(int nt) {
  if (nt > 1 && forked_child().load(std::memory_order_relaxed)) return std::max(1, std::min(nt, omp_get_max_threads()));
  return nt;
}

// Below this much work (multiply-adds) a thread start costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 15;

inline int threads_for(int64_t work, int num_threads) {
  num_threads = fork_safe_threads(num_threads < 1 ? 1 : num_threads);
  int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::min<int64_t>(num_threads, by_work));
}

// Runs f() on a team of nt threads (OpenMP constructs inside f bind to it), or directly on this thread
// when nt == 1: a one-thread parallel region still costs ~0.3 us, libgomp's closing barrier making a
// futex syscall every time.
template <class F>
void parallel_team(int nt, F&& f) {
  nt = fork_safe_threads(nt);
  if (nt <= 1) {
    f();
    return;
  }
#pragma omp parallel num_threads(nt)
  f();
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

// Split rows of X between threads (each thread packs its own panels and reads all of W) rather than
// block rows (panels of X shared across cores, each thread reads its part of W)? Measured on a 2-core
// Xeon (BERT / MiniLM / ResNet-1x1 shapes, 128 rows, 10-50% density): rows won or tied up to W ~12x the
// size of X: a panel packed on one core and read on the other costs more than re-reading W from L2.
// w_elems / x_elems: elements of W and of packed X in the same unit. SPARSEPRUNE_SPLIT=rows|blocks
// overrides, for experiments.
inline bool split_rows(int64_t w_elems, int64_t x_elems, int64_t units, int nt, bool can_split) {
  static const char* force = std::getenv("SPARSEPRUNE_SPLIT");
  if (!can_split) return false;
  if (force && force[0] == 'r') return true;
  if (force && force[0] == 'b') return false;
  return units >= nt && w_elems <= 16 * x_elems;
}

}  // namespace sparseprune
