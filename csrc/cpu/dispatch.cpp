// Run-time selection of the CPU path. SPARSEPRUNE_ISA=scalar|avx2|avx512 forces one (tests use it
// to cover every path on one machine); otherwise the best path this CPU supports.
// The quantized kernels add ISA levels (avxvnni, avx512vnni, avx512bf16): forcing a level selects,
// for every family (fp32, int8, bf16), the best path at or below that level that this CPU runs.
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sparseprune/kernels.h"
#include "sparseprune/qkernels.h"
#if defined(SPARSEPRUNE_X86)
#include <cpuid.h>
#endif

namespace sparseprune {
namespace {

bool cpu_any() { return true; }
#if defined(SPARSEPRUNE_X86)
bool cpu_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_avx512() {
  return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}

// CPUID feature bits the quantized paths need, with the OS check (XCR0) for the register state.
struct X86Q {
  bool avxvnni = false, avx512vnni = false, avx512bf16 = false, amx = false;
};
X86Q detect_q() {
  X86Q f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xE6) == 0xE6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const unsigned max_sub = a;
  f.avx512vnni = os_avx512 && ((c >> 11) & 1);
  f.amx = os_amx && ((d >> 24) & 1) && ((d >> 25) & 1);  // AMX-TILE, AMX-INT8 (reported only)
  if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f.avxvnni = os_avx && ((a >> 4) & 1);
    f.avx512bf16 = os_avx512 && ((a >> 5) & 1);
  }
  return f;
}
const X86Q& q_features() {
  static const X86Q f = detect_q();
  return f;
}
bool cpu_avxvnni() { return cpu_avx2() && q_features().avxvnni; }
bool cpu_avx512vnni() { return cpu_avx512() && q_features().avx512vnni; }
bool cpu_avx512bf16() { return cpu_avx512() && q_features().avx512bf16; }
#endif

// ISA levels, lowest first. A forced level selects per family the best supported path at or below it.
struct Level {
  const char* name;
  bool (*check)();
};
const std::vector<Level>& levels() {
  static const std::vector<Level> l = {
      {"scalar", cpu_any},
#if defined(SPARSEPRUNE_X86)
      {"avx2", cpu_avx2},         {"avxvnni", cpu_avxvnni},       {"avx512", cpu_avx512},
      {"avx512vnni", cpu_avx512vnni}, {"avx512bf16", cpu_avx512bf16},
#endif
  };
  return l;
}
int level_of(const char* isa) {
  const auto& l = levels();
  for (size_t i = 0; i < l.size(); ++i)
    if (std::string(isa) == l[i].name) return static_cast<int>(i);
  return 0;
}

std::vector<IsaPath> make_table() {
  std::vector<IsaPath> t;
#define SP_PATH(isa, names, spmm, spmm_t, check) t.push_back(IsaPath{#isa, names, spmm, spmm_t, check});
#include "ukernels.inc"
#undef SP_PATH
#define SP_PATH(...)
#define SP_CONV_PATH(isa_, names, fwd, bwd)                                                 \
  for (auto& row : t)                                                                       \
    if (std::string(row.isa) == #isa_) { row.conv_name = names; row.conv = fwd; row.conv_bwd = bwd; }
#include "ukernels.inc"
#undef SP_CONV_PATH
#undef SP_PATH
  return t;
}

int best_level() {
  const auto& l = levels();
  for (int i = static_cast<int>(l.size()) - 1; i >= 0; --i)
    if (l[i].check()) return i;
  return 0;
}

int find_level(const std::string& isa) {
  const auto& l = levels();
  for (size_t i = 0; i < l.size(); ++i)
    if (isa == l[i].name && l[i].check()) return static_cast<int>(i);
  return -1;
}

// The best fp32 path at or below level `lv`.
int fp32_path_for(int lv) {
  const auto& t = all_paths();
  for (int i = static_cast<int>(t.size()) - 1; i >= 0; --i)
    if (level_of(t[i].isa) <= lv && t[i].supported()) return i;
  return 0;
}

// SPARSEPRUNE_ISA in any case: that level, or the best one below it this CPU runs; unset, "best" or
// unknown: the best level. ops.py warns at import about an unknown level or one this CPU lacks.
int env_level() {
  const char* env = std::getenv("SPARSEPRUNE_ISA");
  std::string isa = env ? env : "";
  for (char& c : isa) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto& l = levels();
  for (int i = static_cast<int>(l.size()) - 1; i >= 0; --i)
    if (isa == l[i].name) {
      while (!l[i].check()) --i;  // scalar always runs
      return i;
    }
  return best_level();
}

std::atomic<int>& level() {
  static std::atomic<int> lv{env_level()};
  return lv;
}

std::atomic<int>& current() {
  static std::atomic<int> cur{fp32_path_for(level().load())};
  return cur;
}

std::vector<QPath> make_qtable() {
  std::vector<QPath> t;
#define SP_PATH(...)
#define SP_QPATH(dtype, isa, names, fn, check, planes) t.push_back(QPath{#dtype, #isa, names, fn, check, planes});
#include "ukernels.inc"
#undef SP_QPATH
#undef SP_PATH
  return t;
}

}  // namespace

const std::vector<IsaPath>& all_paths() {
  static const std::vector<IsaPath> table = make_table();
  return table;
}

const IsaPath& active_path() { return all_paths()[current().load(std::memory_order_relaxed)]; }

bool set_isa(const std::string& isa) {
  const int lv = isa == "best" ? best_level() : find_level(isa);
  if (lv < 0) return false;
  level().store(lv);
  current().store(fp32_path_for(lv));
  return true;
}

const std::vector<QPath>& all_qpaths() {
  static const std::vector<QPath> table = make_qtable();
  return table;
}

const QPath& active_qpath(const std::string& dtype) {
  // per level and dtype the best supported path, found once (this runs on every call: the loop with its
  // string compares cost ~0.2 us, a few per cent of a 90%-sparse 768x768 int8 product)
  static const std::vector<std::array<int, 2>> best = [] {
    const auto& t = all_qpaths();
    std::vector<std::array<int, 2>> b(levels().size(), std::array<int, 2>{-1, -1});
    for (size_t lv = 0; lv < b.size(); ++lv)
      for (size_t i = 0; i < t.size(); ++i)
        if (level_of(t[i].isa) <= static_cast<int>(lv) && t[i].supported())
          b[lv][std::strcmp(t[i].dtype, "int8") == 0 ? 0 : 1] = static_cast<int>(i);
    return b;
  }();
  const int kind = dtype == "int8" ? 0 : dtype == "bf16" ? 1 : -1;
  const int i = kind < 0 ? -1 : best[level().load(std::memory_order_relaxed)][kind];
  if (i < 0) throw std::invalid_argument("no quantized kernel for dtype '" + dtype + "'");
  return all_qpaths()[i];
}

const QPath& active_qpath(bool s8) {
  static const std::string int8 = "int8", bf16 = "bf16";
  return active_qpath(s8 ? int8 : bf16);
}

std::string cpu_features() {
  std::string s;
#if defined(SPARSEPRUNE_X86)
  if (__builtin_cpu_supports("avx2")) s += "avx2 ";
  if (__builtin_cpu_supports("fma")) s += "fma ";
  if (__builtin_cpu_supports("avx512f")) s += "avx512f ";
  if (__builtin_cpu_supports("avx512vl")) s += "avx512vl ";
  if (q_features().avxvnni) s += "avxvnni ";
  if (q_features().avx512vnni) s += "avx512vnni ";
  if (q_features().avx512bf16) s += "avx512bf16 ";
  if (q_features().amx) s += "amx ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

}  // namespace sparseprune
