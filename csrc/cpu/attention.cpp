// Scaled dot-product attention for inference, float32: O = softmax(scale * Q K^T + mask) V per (batch, head),
// reading Q, K, V and writing O through strides, so a transformer's projections ((batch, tokens, heads *
// dim) rows) are read in place and the output lands in the layout the output projection reads: no head
// transposes, no copies. One (batch, head) per task: K^T packed once (zero-padded to whole tiles), then
// for each 4 query rows a register-tiled Q K^T, the row softmax (vectorised exp) and a register-tiled P V,
// the 1 / sum applied at the store. The mask is additive (float) or keep / drop (bool), broadcast through
// strides; a row with no key left gives zeros (torch's scaled_dot_product_attention does the same).
#define SP_ATTN_BYTES 16
#define SP_ATTN_NAME f32_attention
#define SP_ATTN_TRANSPOSE f32_transpose__scalar
#include "attention_impl.h"
