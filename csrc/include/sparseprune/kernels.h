// Kernel entry points. Every ISA path implements the same signatures; dispatch.cpp picks one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "sparseprune/formats.h"
#include "sparseprune/conv.h"

namespace sparseprune {

// Y[n, m] = sum_k X[n, k] * W[m, k] + bias[m]   (Y = X W^T + b), X is n x W.cols, Y is n x W.rows.
using SpmmFn = void (*)(const BsrView& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                        float* y, int64_t ldy, int num_threads);
// dX[n, k] = sum_m dY[n, m] * W[m, k]   (the input gradient of the above).
using SpmmTFn = void (*)(const BsrView& w, const float* dy, int64_t n, int64_t lddy, float* dx,
                         int64_t lddx, int num_threads);

// One ISA path: a row of the table in csrc/cpu/ukernels.inc.
struct IsaPath {
  const char* isa;            // "scalar", "avx2", "avx512"
  const char* spmm_name;      // micro-kernel family names, for info / tests / benchmarks
  SpmmFn spmm;
  SpmmTFn spmm_t;
  bool (*supported)();        // run-time CPU check
  // conv entry points (filled from the SP_CONV_PATH rows of ukernels.inc)
  const char* conv_name = nullptr;
  ConvFn conv = nullptr;
  ConvBwdFn conv_bwd = nullptr;
};

// Reference (scalar, obviously-correct) kernels: always built.
void f32_bsr_spmm__scalar(const BsrView&, const float*, int64_t, int64_t, const float*, float*, int64_t, int);
void f32_bsr_spmm_t__scalar(const BsrView&, const float*, int64_t, int64_t, float*, int64_t, int);
// dst[b * bsd + c * ldd + r] = src[b * bss + r * lds + c] for b < batch, r < rows, c < cols (a layout change:
// NCHW <-> NHWC is rows = channels or pixels). The fast path is picked by the caller from the active ISA.
void f32_transpose__scalar(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                           float* dst, int64_t ldd, int64_t bsd, int num_threads);

// Max pooling of `planes` contiguous h x w float32 planes (NCHW) into ho x wo planes; torch's semantics
// (NaN propagates, -inf for a window with no input element). The caller checks the geometry.
struct MaxPoolGeom {
  int64_t planes, h, w, ho, wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};
void f32_maxpool2d_nchw(const MaxPoolGeom& g, const float* x, float* y, int num_threads);

// y[i, :] = LayerNorm(a[i, :] + b[i, :]) * gamma + beta over `cols` columns, row-major, rows contiguous (b, gamma,
// beta may be null: no residual, no scale, no shift). y may alias a or b. The caller checks the extents.
// Attention for inference: o = softmax(scale * q k^T + mask) v for each (batch b, head h); element (b, h, row i,
// column d) of q lives at q[b * q_sb + h * q_sh + i * q_sr + d] (likewise k, v, o; the last dimension
// contiguous). mask_add (float, added) or mask_keep (bool, 0 = masked) or neither, element (b, h, i, j) at
// b * m_sb + h * m_sh + i * m_sr + j (zero strides broadcast). Rows with every key masked give zeros (NaN with empty_nan).
struct AttnArgs {
  const float *q, *k, *v;
  float* o;
  const float* mask_add;
  const uint8_t* mask_keep;
  int64_t batch, heads, queries, keys, dim;
  int64_t q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, v_sb, v_sh, v_sr, o_sb, o_sh, o_sr, m_sb, m_sh, m_sr;
  float scale;
  bool empty_nan;  // a query row with every key masked: NaN (softmax of all -inf, eager) instead of zeros (SDPA)
};
void f32_attention(const AttnArgs& a, int num_threads);

void f32_add_layernorm(const float* a, const float* b, const float* gamma, const float* beta, float* y, int64_t rows,
                       int64_t cols, float eps, int num_threads);

#if defined(SPARSEPRUNE_X86)
void f32_bsr_spmm__avx2(const BsrView&, const float*, int64_t, int64_t, const float*, float*, int64_t, int);
void f32_transpose__avx2(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                         float* dst, int64_t ldd, int64_t bsd, int num_threads);
void f32_bsr_spmm__avx512(const BsrView&, const float*, int64_t, int64_t, const float*, float*, int64_t, int);
void f32_transpose__avx512(const float* src, int64_t batch, int64_t rows, int64_t cols, int64_t lds, int64_t bss,
                           float* dst, int64_t ldd, int64_t bsd, int num_threads);
void f32_attention__avx2(const AttnArgs& a, int num_threads);
void f32_attention__avx512(const AttnArgs& a, int num_threads);
void f32_add_layernorm__avx2(const float* a, const float* b, const float* gamma, const float* beta, float* y,
                             int64_t rows, int64_t cols, float eps, int num_threads);
#endif

// Dispatch: the path chosen for this CPU, overridable with SPARSEPRUNE_ISA or set_isa().
const IsaPath& active_path();
const std::vector<IsaPath>& all_paths();
// Returns false when `isa` is unknown or unsupported by this CPU.
bool set_isa(const std::string& isa);
std::string cpu_features();

}  // namespace sparseprune
