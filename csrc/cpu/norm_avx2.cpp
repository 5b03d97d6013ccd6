// The add + LayerNorm kernel of norm.cpp with 32-byte vectors (this file is compiled with -mavx2 -mfma).
#define SP_NORM_BYTES 32
#define SP_NORM_NAME f32_add_layernorm__avx2
#include "norm_impl.h"
