// Fused epilogues: an activation applied in a kernel's store, after the bias (y = act(x W^T + b)).
// The codes are part of the Python API (sparseprune.nn.ACTIVATIONS lists them in this order).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace sparseprune {

enum Act : int32_t { kActNone = 0, kActRelu = 1, kActGelu = 2, kActGeluTanh = 3, kActSilu = 4 };
constexpr int32_t kActCount = 5;

// Scalar twin of the vector epilogues (csrc/cpu/epilogue_simd.h), with PyTorch's formulas.
inline float act_scalar(float v, int32_t act) {
  switch (act) {
    case kActRelu: return v < 0.0f ? 0.0f : v;  // NaN stays NaN, as torch.relu
    case kActGelu:  // inf at +inf; NaN at -inf (-inf * 0), as PyTorch's gelu and the vector epilogues give
      return 0.5f * v * std::erfc(-v * 0.70710678118654752f);
    case kActGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(u));
    }
    case kActSilu: return v / (1.0f + std::exp(-v));
    default: return v;
  }
}

}  // namespace sparseprune
