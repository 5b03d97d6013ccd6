// The attention kernel of attention.cpp with 32-byte vectors (this file is compiled with -mavx2 -mfma).
#define SP_ATTN_BYTES 32
#define SP_ATTN_NAME f32_attention__avx2
#define SP_ATTN_TRANSPOSE f32_transpose__avx2
#include "attention_impl.h"
