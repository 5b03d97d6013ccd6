// Run-time selection of the CPU path. SPARSEPRUNE_ISA=scalar|avx2|avx512 forces one (tests use it
// to cover every path on one machine); otherwise the best path this CPU supports.
#include <atomic>
#include <cstdlib>
#include <string>

#include "sparseprune/kernels.h"

namespace sparseprune {
namespace {

bool cpu_any() { return true; }
#if defined(SPARSEPRUNE_X86)
bool cpu_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_avx512() {
  return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#endif

std::vector<IsaPath> make_table() {
  std::vector<IsaPath> t;
#define SP_PATH(isa, names, spmm, spmm_t, check) t.push_back(IsaPath{#isa, names, spmm, spmm_t, check});
#include "ukernels.inc"
#undef SP_PATH
  // --- conv ---
#define SP_PATH(...)
#define SP_CONV_PATH(isa_, names, fwd, bwd)                                                 \
  for (auto& row : t)                                                                       \
    if (std::string(row.isa) == #isa_) { row.conv_name = names; row.conv = fwd; row.conv_bwd = bwd; }
#include "ukernels.inc"
#undef SP_CONV_PATH
#undef SP_PATH
  return t;
}

int best_supported() {
  const auto& t = all_paths();
  for (int i = static_cast<int>(t.size()) - 1; i >= 0; --i)
    if (t[i].supported()) return i;
  return 0;
}

int find(const std::string& isa) {
  const auto& t = all_paths();
  for (size_t i = 0; i < t.size(); ++i)
    if (isa == t[i].isa && t[i].supported()) return static_cast<int>(i);
  return -1;
}

std::atomic<int>& current() {
  static std::atomic<int> cur{[] {
    const char* env = std::getenv("SPARSEPRUNE_ISA");
    if (env && *env) {
      int i = find(env);
      if (i >= 0) return i;
    }
    return best_supported();
  }()};
  return cur;
}

}  // namespace

const std::vector<IsaPath>& all_paths() {
  static const std::vector<IsaPath> table = make_table();
  return table;
}

const IsaPath& active_path() { return all_paths()[current().load(std::memory_order_relaxed)]; }

bool set_isa(const std::string& isa) {
  const int i = isa == "best" ? best_supported() : find(isa);
  if (i < 0) return false;
  current().store(i);
  return true;
}

std::string cpu_features() {
  std::string s;
#if defined(SPARSEPRUNE_X86)
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
  if (__builtin_cpu_supports("avx512vl")) s += "avx512vl ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

}  // namespace sparseprune
