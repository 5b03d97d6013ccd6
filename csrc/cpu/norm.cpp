// LayerNorm over the last dimension of a float32 row-major matrix, optionally of the sum of two of them:
// y = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta with s = a + b (a transformer block's end: the
// residual added to the sublayer's output, then LayerNorm). One pass writes s into y and sums it, a second
// sums the squared deviations (two-pass variance: no cancellation), a third normalises in place; a row of a
// transformer (384-4096 floats) stays in L1 throughout. Each reduction keeps four vector accumulators of partial
// sums, added at the end: torch's LayerNorm differs from this only by the order of additions.

#define SP_NORM_BYTES 16
#define SP_NORM_NAME f32_add_layernorm
#include "norm_impl.h"
