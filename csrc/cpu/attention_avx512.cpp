// The attention kernel of attention.cpp with 64-byte vectors (this file is compiled with -mavx512f); the K^T
// packing uses the AVX2 transpose (AVX-512 CPUs have AVX2).
#define SP_ATTN_BYTES 64
#define SP_ATTN_NAME f32_attention__avx512
#define SP_ATTN_TRANSPOSE f32_transpose__avx2
#include "attention_impl.h"
