// pybind11 membrane for the CPU kernels: converts arguments, checks the cheap invariants,
// releases the GIL, calls the kernel. Tensors arrive as raw addresses (ops.py validates them
// and keeps them alive for the duration of the call).
#include <pthread.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <cstdint>
#include <string>
#include <vector>

#include "sparseprune/kernels.h"
#include "sparseprune/qkernels.h"
#include "sparseprune/parallel.h"

namespace py = pybind11;
using namespace sparseprune;

namespace {

template <class T>
T* ptr(uintptr_t a) { return reinterpret_cast<T*>(a); }

int32_t check_act(int act) {
  if (act < 0 || act >= kActCount) throw std::invalid_argument("unknown fused activation code " + std::to_string(act));
  return act;
}

BsrView make_view(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx,
                  bool idx16, uintptr_t values) {
  if (rows < 0 || cols < 0 || r < 1 || c < 1) throw std::invalid_argument("bad sparse matrix shape");
  if (!row_ptr) throw std::invalid_argument("row_ptr is null");
  BsrView w;
  w.rows = rows;
  w.cols = cols;
  w.r = r;
  w.c = c;
  w.block_rows = (rows + r - 1) / r;
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = ptr<const void>(col_idx);
  w.idx16 = idx16;
  w.values = ptr<const float>(values);
  return w;
}

// The blocked transpose of the active ISA level (checked operands; runs without the GIL).
void transpose_f32(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss, float* dst,
                   int64_t ldd, int64_t bsd, int num_threads) {
#if defined(SPARSEPRUNE_X86)
  if (std::string(active_path().isa) == "avx512") {
    f32_transpose__avx512(src, batch, rows, cols, lds, bss, dst, ldd, bsd, num_threads);
    return;
  }
  if (std::string(active_path().isa) != "scalar") {
    f32_transpose__avx2(src, batch, rows, cols, lds, bss, dst, ldd, bsd, num_threads);
    return;
  }
#endif
  f32_transpose__scalar(src, batch, rows, cols, lds, bss, dst, ldd, bsd, num_threads);
}

void transpose(uintptr_t src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss, uintptr_t dst,
               int64_t ldd, int64_t bsd, int num_threads) {
  if (batch < 0 || rows < 0 || cols < 0) throw std::invalid_argument("transpose: negative extent");
  if (batch == 0 || rows == 0 || cols == 0) return;
  if (!src || !dst) throw std::invalid_argument("transpose: null operand");
  if (lds < cols || ldd < rows || (batch > 1 && (bss < rows * lds || bsd < cols * ldd)))
    throw std::invalid_argument("transpose: strides overlap");
  py::gil_scoped_release nogil;
  transpose_f32(ptr<const float>(src), batch, rows, cols, lds, bss, ptr<float>(dst), ldd, bsd, num_threads);
}

void maxpool2d(uintptr_t x, uintptr_t y, int64_t planes, int64_t h, int64_t w, int64_t ho, int64_t wo, int kh, int kw,
               int sh, int sw, int ph, int pw, int dh, int dw, int num_threads) {
  if (planes < 0 || h < 0 || w < 0 || ho < 0 || wo < 0) throw std::invalid_argument("maxpool2d: negative extent");
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0)
    throw std::invalid_argument("maxpool2d: kernel, stride and dilation must be >= 1, padding >= 0");
  if (h > (int64_t(1) << 31) || w > (int64_t(1) << 31) || ho > (int64_t(1) << 31) || wo > (int64_t(1) << 31))
    throw std::invalid_argument("maxpool2d: plane too large");
  if (planes == 0 || ho == 0 || wo == 0) return;
  if (h == 0 || w == 0) throw std::invalid_argument("maxpool2d: empty input plane");
  if (!x || !y) throw std::invalid_argument("maxpool2d: null operand");
  const MaxPoolGeom g{planes, h, w, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw};
  py::gil_scoped_release nogil;
  f32_maxpool2d_nchw(g, ptr<const float>(x), ptr<float>(y), num_threads);
}

void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t mask, int mask_kind, int64_t batch,
               int64_t heads, int64_t queries, int64_t keys, int64_t dim, const std::vector<int64_t>& strides,
               double scale, int num_threads) {
  if (batch < 0 || heads < 0 || queries < 0 || keys < 1 || dim < 1)
    throw std::invalid_argument("attention: extents must be >= 0 (keys, dim >= 1)");
  if (strides.size() != 15) throw std::invalid_argument("attention: 15 strides expected (q, k, v, o, mask)");
  for (int64_t st : strides)
    if (st < 0) throw std::invalid_argument("attention: negative stride");
  // mask kinds: 0 none, 1 float added, 2 bool keep, 3 float added with a fully masked row giving NaN (eager)
  if (mask_kind < 0 || mask_kind > 3) throw std::invalid_argument("attention: mask kind must be 0, 1, 2 or 3");
  if (mask_kind != 0 && !mask) throw std::invalid_argument("attention: null mask");
  if (!std::isfinite(scale)) throw std::invalid_argument("attention: scale must be finite");
  if (batch == 0 || heads == 0 || queries == 0) return;
  if (!q || !k || !v || !o) throw std::invalid_argument("attention: null operand");
  AttnArgs a{};
  a.q = ptr<const float>(q);
  a.k = ptr<const float>(k);
  a.v = ptr<const float>(v);
  a.o = ptr<float>(o);
  a.mask_add = mask_kind == 1 || mask_kind == 3 ? ptr<const float>(mask) : nullptr;
  a.empty_nan = mask_kind == 3;
  a.mask_keep = mask_kind == 2 ? ptr<const uint8_t>(mask) : nullptr;
  a.batch = batch;
  a.heads = heads;
  a.queries = queries;
  a.keys = keys;
  a.dim = dim;
  int64_t* dst[15] = {&a.q_sb, &a.q_sh, &a.q_sr, &a.k_sb, &a.k_sh, &a.k_sr, &a.v_sb, &a.v_sh, &a.v_sr,
                      &a.o_sb, &a.o_sh, &a.o_sr, &a.m_sb, &a.m_sh, &a.m_sr};
  for (int i = 0; i < 15; ++i) *dst[i] = strides[i];
  a.scale = static_cast<float>(scale);
  py::gil_scoped_release nogil;
#if defined(SPARSEPRUNE_X86)
  const std::string isa = active_path().isa;
  if (isa == "avx512") {
    f32_attention__avx512(a, num_threads);
    return;
  }
  if (isa != "scalar") {
    f32_attention__avx2(a, num_threads);
    return;
  }
#endif
  f32_attention(a, num_threads);
}

void add_layernorm(uintptr_t a, uintptr_t b, uintptr_t gamma, uintptr_t beta, uintptr_t y, int64_t rows, int64_t cols,
                   double eps, int num_threads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("add_layernorm: negative extent");
  if (rows == 0) return;
  if (cols == 0) throw std::invalid_argument("add_layernorm: rows of zero columns");
  if (!a || !y) throw std::invalid_argument("add_layernorm: null operand");
  if (!(eps >= 0.0)) throw std::invalid_argument("add_layernorm: eps must be >= 0");
  py::gil_scoped_release nogil;
#if defined(SPARSEPRUNE_X86)
  if (std::string(active_path().isa) != "scalar") {
    f32_add_layernorm__avx2(ptr<const float>(a), ptr<const float>(b), ptr<const float>(gamma), ptr<const float>(beta),
                            ptr<float>(y), rows, cols, static_cast<float>(eps), num_threads);
    return;
  }
#endif
  f32_add_layernorm(ptr<const float>(a), ptr<const float>(b), ptr<const float>(gamma), ptr<const float>(beta),
                    ptr<float>(y), rows, cols, static_cast<float>(eps), num_threads);
}

// res (0: none): an addend laid out as y, added in the store; kept as its offset from y (BsrView / QBsrView).
template <class View>
void set_residual(View& w, uintptr_t res, uintptr_t y, const char* who) {
  if (!res) return;
  if (res % alignof(float) || y % alignof(float))
    throw std::invalid_argument(std::string(who) + ": misaligned residual");
  w.has_res = true;
  w.res_bytes = static_cast<int64_t>(res) - static_cast<int64_t>(y);
}

// res: 0, or an addend with y's shape and row stride (ldy), added before the activation
void spmm_res(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
              uintptr_t values, uintptr_t x, int64_t n, int64_t ldx, uintptr_t bias, uintptr_t y,
              int64_t ldy, int num_threads, int act, int split, int pack, uintptr_t res) {
  BsrView w = make_view(rows, cols, r, c, row_ptr, col_idx, idx16, values);
  w.act = check_act(act);
  if (split < 0 || split > 2 || pack < 0 || pack > 2) throw std::invalid_argument("bad kernel variant");
  w.split = split;
  w.pack = pack;
  set_residual(w, res, y, "spmm");
  if (n < 0 || ldx < cols || ldy < rows) throw std::invalid_argument("bad dense operand shape");
  if (n == 0) return;
  if (!x || !y) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().spmm(w, ptr<const float>(x), n, ldx, ptr<const float>(bias), ptr<float>(y), ldy, num_threads);
}

void spmm(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
          uintptr_t values, uintptr_t x, int64_t n, int64_t ldx, uintptr_t bias, uintptr_t y,
          int64_t ldy, int num_threads, int act, int split, int pack) {
  spmm_res(rows, cols, r, c, row_ptr, col_idx, idx16, values, x, n, ldx, bias, y, ldy, num_threads, act, split, pack,
           0);
}

void spmm_t(int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
            uintptr_t values, uintptr_t dy, int64_t n, int64_t lddy, uintptr_t dx, int64_t lddx,
            int num_threads) {
  BsrView w = make_view(rows, cols, r, c, row_ptr, col_idx, idx16, values);
  if (n < 0 || lddy < rows || lddx < cols) throw std::invalid_argument("bad dense operand shape");
  if (n == 0) return;
  if (!dy || !dx) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().spmm_t(w, ptr<const float>(dy), n, lddy, ptr<float>(dx), lddx, num_threads);
}

// geom: [n, c_in, h, w, c_out, ho, wo, kh, kw, sh, sw, pt, pl, dh, dw, groups, xs[4], ys[4]]
ConvGeom make_geom(const std::vector<int64_t>& v) {
  if (v.size() != 24) throw std::invalid_argument("conv geometry must have 24 entries");
  ConvGeom g;
  g.n = v[0]; g.c_in = v[1]; g.h = v[2]; g.w = v[3]; g.c_out = v[4]; g.ho = v[5]; g.wo = v[6];
  g.kh = int(v[7]); g.kw = int(v[8]); g.sh = int(v[9]); g.sw = int(v[10]); g.pt = int(v[11]);
  g.pl = int(v[12]); g.dh = int(v[13]); g.dw = int(v[14]); g.groups = int(v[15]);
  for (int i = 0; i < 4; ++i) { g.xs[i] = v[16 + i]; g.ys[i] = v[20 + i]; }
  if (g.n < 0 || g.c_in < 1 || g.h < 1 || g.w < 1 || g.c_out < 1 || g.ho < 1 || g.wo < 1 || g.kh < 1 ||
      g.kw < 1 || g.sh < 1 || g.sw < 1 || g.pt < 0 || g.pl < 0 || g.dh < 1 || g.dw < 1 || g.groups < 1 ||
      g.c_in % g.groups || g.c_out % g.groups)
    throw std::invalid_argument("bad conv geometry");
  return g;
}

int64_t conv2d_workspace(const std::vector<int64_t>& geom) {
  const ConvGeom g = make_geom(geom);
  const ConvQLayout q = conv_q_layout(g);
  // q-domain offsets are int32 (they live in L1 next to the input rows)
  if (g.c_in * q.plane > INT32_MAX) throw std::invalid_argument("conv2d: input too large for 32-bit offsets");
  return q.ws_floats;
}

void conv2d(const std::vector<int64_t>& geom, int r, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
            uintptr_t values, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t ws, int64_t ws_floats,
            int num_threads, int act, uintptr_t res) {
  const ConvGeom g = make_geom(geom);
  BsrView w = make_view(g.c_out, g.cin_g() * g.taps(), r, 1, row_ptr, col_idx, idx16, values);
  w.act = check_act(act);
  set_residual(w, res, y, "conv2d");  // an addend with y's strides (ops.py checks its shape and strides)
  if (g.groups > 1 && g.cout_g() % r) throw std::invalid_argument("conv2d: block rows straddle groups");
  if (ws_floats < conv2d_workspace(geom)) throw std::invalid_argument("conv2d: workspace too small");
  if (g.n == 0) return;
  if (!x || !y) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().conv(g, w, ptr<const float>(x), ptr<const float>(bias), ptr<float>(y), ptr<float>(ws), num_threads);
}

// One float32 convolution's fixed operands for one input shape and strides, checked once: SparseConv2d keeps one
// per layer and each call passes X, Y, the thread count and the residual. The general route (geometry list,
// workspace tensor, Python-side checks and plan lookups) cost ~13 us a call, a tenth of a 90%-sparse 1x1 conv at 56x56.
struct ConvCall {
  ConvGeom g;
  BsrView w;
  const float* bias = nullptr;
  int64_t ws_floats = 0;
  void run(uintptr_t x, uintptr_t y, int num_threads, uintptr_t res) const {
    if (g.n == 0) return;
    if (!x || !y) throw std::invalid_argument("conv2d: null dense operand");
    BsrView wv = w;
    set_residual(wv, res, y, "conv2d");
    std::unique_ptr<float, void (*)(void*)> ws(nullptr, std::free);
    if (ws_floats > 0) {
      const size_t bytes = (static_cast<size_t>(ws_floats) * sizeof(float) + 63) / 64 * 64;
      ws.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!ws) throw std::bad_alloc();
    }
    py::gil_scoped_release nogil;
    active_path().conv(g, wv, ptr<const float>(x), bias, ptr<float>(y), ws.get(), num_threads);
  }
};

ConvCall make_conv_call(const std::vector<int64_t>& geom, int r, uintptr_t row_ptr, uintptr_t col_idx, bool idx16,
                        uintptr_t values, uintptr_t bias, int act) {
  ConvCall c;
  c.g = make_geom(geom);
  c.w = make_view(c.g.c_out, c.g.cin_g() * c.g.taps(), r, 1, row_ptr, col_idx, idx16, values);
  c.w.act = check_act(act);
  if (c.g.groups > 1 && c.g.cout_g() % r) throw std::invalid_argument("conv2d: block rows straddle groups");
  c.ws_floats = conv2d_workspace(geom);
  c.bias = ptr<const float>(bias);
  return c;
}

void conv2d_input_grad(const std::vector<int64_t>& geom, int r, uintptr_t row_ptr, uintptr_t col_idx,
                       bool idx16, uintptr_t values, uintptr_t dy, uintptr_t dx, int num_threads) {
  const ConvGeom g = make_geom(geom);
  BsrView w = make_view(g.c_out, g.cin_g() * g.taps(), r, 1, row_ptr, col_idx, idx16, values);
  if (g.groups > 1 && g.cout_g() % r) throw std::invalid_argument("conv2d: block rows straddle groups");
  if (g.n == 0) return;
  if (!dy || !dx) throw std::invalid_argument("null dense operand");
  py::gil_scoped_release nogil;
  active_path().conv_bwd(g, w, ptr<const float>(dy), ptr<float>(dx), num_threads);
}

// --- quantized (issue #14) ---
// The packed weight of a qspmm call, checked. x_bf16: X given in bf16 (bf16 kernels only).
QBsrView q_view(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, bool x_bf16,
                int act) {
  const bool s8 = dtype == "int8";
  if (!s8 && dtype != "bf16") throw std::invalid_argument("qspmm: dtype must be 'int8' or 'bf16'");
  const int g = s8 ? 4 : 2;
  if (rows < 0 || cols < 0 || r < 1 || c < 1) throw std::invalid_argument("qspmm: bad sparse matrix shape");
  if (c % g) throw std::invalid_argument("qspmm: block width must be a multiple of " + std::to_string(g));
  if (s8 && cols > 65536) throw std::invalid_argument("qspmm: int8 supports K <= 65536 (int32 accumulation)");
  if (!row_ptr) throw std::invalid_argument("qspmm: row_ptr is null");
  if (s8 && (!wscale || !comp)) throw std::invalid_argument("qspmm: int8 needs scales and compensation");
  if (s8 && x_bf16) throw std::invalid_argument("qspmm: int8 takes float32 input");
  QBsrView w;
  w.rows = rows;
  w.cols = cols;
  w.r = r;
  w.c = c;
  w.block_rows = (rows + r - 1) / r;
  w.block_cols = (cols + c - 1) / c;
  w.row_ptr = ptr<const int32_t>(row_ptr);
  w.col_idx = ptr<const void>(col_idx);
  w.idx16 = idx16;
  w.values = ptr<const uint32_t>(values);
  w.wscale = ptr<const float>(wscale);
  w.comp = ptr<const int32_t>(comp);
  w.act = check_act(act);
  return w;
}

// res: 0, or an addend with y's shape and row stride (ldy), added after the bias, before the activation
void qspmm_res(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
               uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t x,
               bool x_bf16, int64_t n, int64_t ldx, uintptr_t bias, uintptr_t y, int64_t ldy, int num_threads, int act,
               uintptr_t res) {
  QBsrView w = q_view(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, x_bf16, act);
  set_residual(w, res, y, "qspmm");
  if (n < 0 || ldx < cols || ldy < rows) throw std::invalid_argument("qspmm: bad dense operand shape");
  if (n == 0 || rows == 0) return;
  if (!x || !y) throw std::invalid_argument("qspmm: null dense operand");
  const QPath& path = active_qpath(dtype);
  py::gil_scoped_release nogil;
  path.fn(w, ptr<const void>(x), x_bf16 ? XType::bf16 : XType::f32, n, ldx, ptr<const float>(bias), ptr<float>(y),
          ldy, num_threads);
}

void qspmm(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr, uintptr_t col_idx,
           bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t x, bool x_bf16, int64_t n,
           int64_t ldx, uintptr_t bias, uintptr_t y, int64_t ldy, int num_threads, int act) {
  qspmm_res(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, x, x_bf16, n, ldx, bias, y, ldy,
            num_threads, act, 0);
}

// A quantized Linear's fixed kernel arguments, checked once: SparseLinear keeps one per packed layer and
// each call passes only X (contiguous, float32), its row count, Y and the thread count. Building and
// converting qspmm's twenty arguments cost ~0.4 us a call.
struct QCall {
  QBsrView w;
  bool s8 = true;
  const float* bias = nullptr;
  void run(uintptr_t x, int64_t n, uintptr_t y, int num_threads) const {
    if (n < 0) throw std::invalid_argument("qspmm: bad dense operand shape");
    if (n == 0 || w.rows == 0) return;
    if (!x || !y) throw std::invalid_argument("qspmm: null dense operand");
    const QPath& path = active_qpath(s8);
    py::gil_scoped_release nogil;
    path.fn(w, ptr<const void>(x), XType::f32, n, w.cols, bias, ptr<float>(y), w.rows, num_threads);
  }
};

QCall make_qcall(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                 uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t bias,
                 int act) {
  QCall q;
  q.w = q_view(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, false, act);
  q.s8 = dtype == "int8";
  q.bias = ptr<const float>(bias);
  return q;
}

// One planes convolution's fixed operands, checked (qspmm_planes_res, QPlanesCall).
struct PlanesJob {
  QBsrView w;
  QPlanes g;
  bool s8 = true;
  int64_t n_img = 0;
};

PlanesJob make_planes_job(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                          uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp,
                          int64_t n_img, int64_t h, int64_t wd, int kh, int kw, int dh, int dw, int pt, int pl, int sh,
                          int sw, int act) {
  PlanesJob j;
  j.w = q_view(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, false, act);
  j.s8 = dtype == "int8";
  if (n_img < 0 || h < 0 || wd < 0 || kh < 1 || kw < 1 || dh < 1 || dw < 1 || sh < 1 || sw < 1 || sh > 16 ||
      sw > 16 || pt < 0 || pl < 0 || pt > static_cast<int64_t>(dh) * (kh - 1) ||
      pl > static_cast<int64_t>(dw) * (kw - 1) || cols < 1 || cols % (static_cast<int64_t>(kh) * kw))
    throw std::invalid_argument("qspmm_planes: bad convolution geometry");
  if (h > (int64_t{1} << 20) || wd > (int64_t{1} << 20) ||
      (h * wd > 0 && n_img > (int64_t{1} << 40) / (h * wd * sh * sw)))
    throw std::invalid_argument("qspmm_planes: image too large");
  j.n_img = n_img;
  j.g.h = h;
  j.g.w = wd;
  j.g.ch = cols / (static_cast<int64_t>(kh) * kw);
  j.g.kh = kh;
  j.g.kw = kw;
  j.g.dh = dh;
  j.g.dw = dw;
  j.g.pt = pt;
  j.g.pl = pl;
  j.g.sh = sh;
  j.g.sw = sw;
  return j;
}

// The per-call operands of a planes job: X and Y present, a residual (res != 0) aligned as Y.
void check_planes_operands(uintptr_t x, uintptr_t y, uintptr_t res) {
  if (!x || !y) throw std::invalid_argument("qspmm_planes: null dense operand");
  if (res && (res % alignof(float) || y % alignof(float)))
    throw std::invalid_argument("qspmm_planes: misaligned residual");
}

// Runs a checked job (without the GIL): the active path's planes kernel where it has one (every x86 path) and the map
// is not small; otherwise the image is rebuilt as NHWC, the row kernel runs over its implicit im2col rows, and its
// rows are transposed back.
void run_planes_job(const PlanesJob& job, const float* x, const float* bias, float* y, int num_threads,
                    uintptr_t res) {
  const QPlanes& g = job.g;
  const int64_t rows = job.w.rows, cols = job.w.cols, n_img = job.n_img, h = g.h, wd = g.w;
  if (n_img == 0 || h == 0 || wd == 0 || rows == 0) return;
  QBsrView w = job.w;
  set_residual(w, res, reinterpret_cast<uintptr_t>(y), "qspmm_planes");
  const QPath& path = active_qpath(job.s8);
  const int64_t hw = h * wd, n = n_img * hw, big_h = h * g.sh, big_w = wd * g.sw;
  // The 8-pixel panels (every x86 path; the AVX-512 VNNI / BF16 ones take 16-row blocks in 16-pixel panels) read
  // the weights once per 8 pixels: on a 7 x 7 map the rows' 24-pixel panels read them less often (int8 3x3 512 @7
  // 0.88-0.92x through the planes, AVX2, Zen 4); from 14 x 14 on the planes win (1.17-2.2x).
  // SPARSEPRUNE_PLANES=0 / 1 overrides (never / wherever the path has them), for tests; read once per process.
  static const char* force = std::getenv("SPARSEPRUNE_PLANES");
  const bool planes16 = w.r == 16 && (std::strcmp(path.isa, "avx512vnni") == 0 || std::strcmp(path.isa, "avx512bf16") == 0);
  if (path.planes && (force ? force[0] == '1' : planes16 || hw >= 100)) {
    path.planes(w, g, x, n_img, bias, y, num_threads);
    return;
  }
  std::vector<float> xr(static_cast<size_t>(n_img * big_h * big_w * g.ch)), yr(static_cast<size_t>(n * rows));
  std::vector<float> rr(res ? static_cast<size_t>(n * rows) : 0);
  if (g.sh == 1 && g.sw == 1) {
    transpose_f32(x, n_img, g.ch, hw, hw, g.ch * hw, xr.data(), g.ch, hw * g.ch, num_threads);
  } else {  // the phases back into one NHWC image
    const float* src = x;
    for (int64_t i = 0; i < n_img; ++i)
      for (int64_t py = 0; py < g.sh; ++py)
        for (int64_t px = 0; px < g.sw; ++px)
          for (int64_t ci = 0; ci < g.ch; ++ci, src += hw)
            for (int64_t yy = 0; yy < h; ++yy)
              for (int64_t xx = 0; xx < wd; ++xx)
                xr[((i * big_h + yy * g.sh + py) * big_w + xx * g.sw + px) * g.ch + ci] = src[yy * wd + xx];
  }
  if (res) {
    transpose_f32(ptr<const float>(res), n_img, rows, hw, hw, rows * hw, rr.data(), rows, hw * rows, num_threads);
    w.res_bytes = reinterpret_cast<const char*>(rr.data()) - reinterpret_cast<const char*>(yr.data());
  }
  QIm2col ig;  // the same convolution over the NHWC image
  ig.h = big_h;
  ig.w = big_w;
  ig.ch = g.ch;
  ig.kh = g.kh;
  ig.kw = g.kw;
  ig.sh = g.sh;
  ig.sw = g.sw;
  ig.dh = g.dh;
  ig.dw = g.dw;
  ig.pt = g.pt;
  ig.pl = g.pl;
  ig.ho = h;
  ig.wo = wd;
  if (g.kh > 1 || g.kw > 1 || g.sh > 1 || g.sw > 1) w.im2col = &ig;
  path.fn(w, xr.data(), XType::f32, n, cols, bias, yr.data(), rows, num_threads);
  transpose_f32(yr.data(), n_img, hw, rows, rows, hw * rows, y, hw, rows * hw, num_threads);
}

// A convolution on NCHW images given as their stride phases (QPlanes: x is n_img images of sh * sw phases of
// ch = cols / (kh * kw) float32 planes of h x wd pixels; the image itself at stride 1), its output h x wd
// pixels: y gets n_img images of `rows` planes. pt / pl rows / columns of zero padding on top / left; res: 0,
// or an addend laid out as y (added after the bias, before the activation). The active path's planes kernel
// where it has one and the blocks are 16 rows; otherwise the image is rebuilt as NHWC, the row kernel runs
// over its implicit im2col rows, and its rows are transposed back.
void qspmm_planes_res(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                      uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t x,
                      int64_t n_img, int64_t h, int64_t wd, int kh, int kw, int dh, int dw, int pt, int pl, int sh,
                      int sw, uintptr_t bias, uintptr_t y, int num_threads, int act, uintptr_t res) {
  const PlanesJob job = make_planes_job(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, n_img,
                                        h, wd, kh, kw, dh, dw, pt, pl, sh, sw, act);
  if (n_img == 0 || h == 0 || wd == 0 || rows == 0) return;
  check_planes_operands(x, y, res);
  py::gil_scoped_release nogil;
  run_planes_job(job, ptr<const float>(x), ptr<const float>(bias), ptr<float>(y), num_threads, res);
}

// A quantized convolution's fixed planes-route arguments for one input shape, checked once: SparseConv2d keeps
// one per packed layer (as QCall for SparseLinear) and each call passes X, Y, the thread count and the residual
// (0: none). Building and converting qspmm_planes_res's twenty-seven arguments, and the Python checks of the
// general route, cost ~5-8 us a call.
struct QPlanesCall {
  PlanesJob job;
  const float* bias = nullptr;
  void run(uintptr_t x, uintptr_t y, int num_threads, uintptr_t res) const {
    check_planes_operands(x, y, res);
    py::gil_scoped_release nogil;
    run_planes_job(job, ptr<const float>(x), bias, ptr<float>(y), num_threads, res);
  }
};

QPlanesCall make_qplanes_call(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                              uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp,
                              int64_t n_img, int64_t h, int64_t wd, int kh, int kw, int dh, int dw, int pt, int pl,
                              uintptr_t bias, int act) {
  QPlanesCall q;
  q.job = make_planes_job(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, n_img, h, wd, kh, kw,
                          dh, dw, pt, pl, 1, 1, act);
  q.bias = ptr<const float>(bias);
  return q;
}

// A convolution as the quantized kernel over its implicit im2col matrix: x is a contiguous NHWC float32 (or,
// for bf16 weights, bf16) image (n_img, h, w, ch), zero padding pt / pb / pl / pr implied; y gets n_img * ho * wo rows of `rows`
// outputs (ldy).
// res: 0, or an addend with y's shape and row stride (ldy), added after the bias, before the activation
void qspmm_im2col_res(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                      uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t x,
                      bool x_bf16, int64_t n_img, int64_t h, int64_t wd, int64_t ch, int kh, int kw, int sh, int sw,
                      int dh, int dw, int pt, int pb, int pl, int pr, uintptr_t bias, uintptr_t y, int64_t ldy,
                      int num_threads, int act, uintptr_t res) {
  QBsrView view = q_view(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, x_bf16, act);
  set_residual(view, res, y, "qspmm_im2col");
  if (n_img < 0 || h < 1 || wd < 1 || ch < 1 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || pt < 0 ||
      pb < 0 || pl < 0 || pr < 0)
    throw std::invalid_argument("qspmm_im2col: bad convolution geometry");
  if (cols != static_cast<int64_t>(kh) * kw * ch)
    throw std::invalid_argument("qspmm_im2col: cols must be kh * kw * channels");
  QIm2col g;
  g.h = h;
  g.w = wd;
  g.ch = ch;
  g.kh = kh;
  g.kw = kw;
  g.sh = sh;
  g.sw = sw;
  g.dh = dh;
  g.dw = dw;
  g.pt = pt;
  g.pl = pl;
  const int64_t eh = static_cast<int64_t>(dh) * (kh - 1) + 1, ew = static_cast<int64_t>(dw) * (kw - 1) + 1;
  if (eh > h + pt + pb || ew > wd + pl + pr)
    throw std::invalid_argument("qspmm_im2col: the padded image is smaller than the dilated kernel");
  g.ho = (h + pt + pb - eh) / sh + 1;
  g.wo = (wd + pl + pr - ew) / sw + 1;
  if (ldy < rows) throw std::invalid_argument("qspmm_im2col: bad output stride");
  const int64_t n = n_img * g.ho * g.wo;
  if (n == 0 || rows == 0) return;
  if (!x || !y) throw std::invalid_argument("qspmm_im2col: null dense operand");
  QBsrView w = view;
  w.im2col = &g;
  const QPath& path = active_qpath(dtype);
  py::gil_scoped_release nogil;
  path.fn(w, ptr<const void>(x), x_bf16 ? XType::bf16 : XType::f32, n, cols, ptr<const float>(bias), ptr<float>(y),
          ldy, num_threads);
}

void qspmm_im2col(const std::string& dtype, int64_t rows, int64_t cols, int r, int c, uintptr_t row_ptr,
                  uintptr_t col_idx, bool idx16, uintptr_t values, uintptr_t wscale, uintptr_t comp, uintptr_t x,
                  bool x_bf16, int64_t n_img, int64_t h, int64_t wd, int64_t ch, int kh, int kw, int sh, int sw, int dh,
                  int dw, int pt, int pb, int pl, int pr, uintptr_t bias, uintptr_t y, int64_t ldy, int num_threads,
                  int act) {
  qspmm_im2col_res(dtype, rows, cols, r, c, row_ptr, col_idx, idx16, values, wscale, comp, x, x_bf16, n_img, h, wd, ch,
                   kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, bias, y, ldy, num_threads, act, 0);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparseprune CPU kernels (torch-free)";
#ifdef SPARSEPRUNE_VERSION
  m.attr("__version__") = SPARSEPRUNE_VERSION;
#endif
  m.def("same_bytes", [](uintptr_t a, uintptr_t b, int64_t n, uintptr_t a2, uintptr_t b2, int64_t n2) {
    auto same = [](uintptr_t x, uintptr_t y, int64_t k) {
      if (k < 0 || (k > 0 && (!x || !y))) throw std::invalid_argument("same_bytes: bad arguments");
      return k == 0 || std::memcmp(ptr<const void>(x), ptr<const void>(y), static_cast<size_t>(k)) == 0;
    };
    return same(a, b, n) && same(a2, b2, n2);
  }, "whether n bytes at a and b, and n2 bytes at a2 and b2, are equal (derived arrays' sources unchanged)");
  m.def("transpose", &transpose, "dst[b][c][r] = src[b][r][c] (float32; NCHW <-> NHWC layout changes)");
  m.def("maxpool2d", &maxpool2d, "max pooling of contiguous NCHW float32 planes (torch's semantics)");
  m.def("attention", &attention,
        "o = softmax(scale * q k^T + mask) v per (batch, head), float32 through strides (inference)");
  m.def("add_layernorm", &add_layernorm,
        "y = LayerNorm(a + b) * gamma + beta over the last of `cols` columns (float32 rows; b, gamma, beta may be 0)");
  m.def("spmm", &spmm, "Y = act(X W^T + b) with W block-sparse (CSR is the 1x1 block case)");
  m.def("spmm_res", &spmm_res, "Y = act(X W^T + b + R), R with Y's shape and row stride");
  m.def("spmm_t", &spmm_t, "dX = dY W with W block-sparse");
  m.def("paths", [] {
    py::list out;
    for (const auto& p : all_paths()) {
      py::dict d;
      d["isa"] = p.isa;
      d["kernels"] = p.spmm_name;
      d["supported"] = p.supported();
      d["conv_kernels"] = p.conv_name ? p.conv_name : "";
      out.append(d);
    }
    return out;
  });
  m.def("active_isa", [] { return std::string(active_path().isa); });
  m.def("set_isa", [](const std::string& isa) {
    if (!set_isa(isa)) throw std::invalid_argument("ISA path '" + isa + "' is unknown or not supported by this CPU");
  });
  m.def("cpu_features", &cpu_features);
  m.def("omp_max_threads", [] { return omp_get_max_threads(); });
  // a child process after fork() runs at most omp_get_max_threads() threads (see parallel.h)
  pthread_atfork(nullptr, nullptr, [] { sparseprune::forked_child().store(true, std::memory_order_relaxed); });
  m.def("forked_child", [] { return sparseprune::forked_child().load(); });
  m.def("conv2d_workspace", &conv2d_workspace, "floats of workspace conv2d needs for this geometry");
  m.def("conv2d", &conv2d, "y = conv2d(x, W) + b with W packed as (r x 1)-block BSR over (Cout, Cin/g*kh*kw)");
  py::class_<ConvCall>(m, "ConvCall", "conv2d's fixed arguments for one layer and input geometry; call(x, y, "
                       "num_threads, residual)")
      .def(py::init(&make_conv_call))
      .def("__call__", &ConvCall::run);
  // quantized (int8 / bf16) block-sparse matmul
  m.def("qspmm", &qspmm, "Y = X W^T + b with W an int8 or bf16 block-sparse matrix (packed by quant.py)");
  m.def("qspmm_res", &qspmm_res, "Y = act(X W^T + b + R), R with Y's shape and row stride");
  py::class_<QCall>(m, "QCall", "qspmm's fixed arguments for one layer; call(x, n, y, num_threads)")
      .def(py::init(&make_qcall))
      .def("__call__", &QCall::run);
  py::class_<QPlanesCall>(m, "QPlanesCall",
                          "qspmm_planes_res's fixed arguments for one stride-1 layer and input shape; call(x, y, "
                          "num_threads, residual)")
      .def(py::init(&make_qplanes_call))
      .def("__call__", &QPlanesCall::run);
  m.def("qspmm_planes_res", &qspmm_planes_res,
        "Y planes = act(W X + b + R): a stride-1 size-keeping convolution on contiguous NCHW float32 images");
  m.def("qspmm_im2col_res", &qspmm_im2col_res, "qspmm_im2col with a residual (Y's shape and row stride) in the store");
  m.def("qspmm_im2col", &qspmm_im2col,
        "a convolution as qspmm over the implicit im2col matrix of an NHWC image (zero padding implied)");
  m.def("qpaths", [] {
    py::list out;
    for (const auto& p : all_qpaths()) {
      py::dict d;
      d["dtype"] = p.dtype;
      d["isa"] = p.isa;
      d["kernels"] = p.names;
      d["supported"] = p.supported();
      d["planes"] = p.planes != nullptr;
      out.append(d);
    }
    return out;
  });
  m.def("active_qisa", [](const std::string& dtype) { return std::string(active_qpath(dtype).isa); });
  m.def("conv2d_input_grad", &conv2d_input_grad, "dx = conv2d_input_grad(dy, W)");
}
