/* rope.c — NeoX / split-halves rotary position embedding over float32 head vectors
 * (transformers-gemma3.md §2.4): pairs (i, i + d/2) rotated by theta_i = pos * inv_freq[i],
 * inv_freq[i] = freq_scale / base^(2i/d). theta in float like the reference, cos/sin in double.
 * Gemma 3 uses two bases (local 10k, global 1M with a linear scale); the caller picks the table.
 */
#include <math.h>

#include "kernels/ops.h"

void g3_rope_inv_freq(float *inv_freq, int64_t d, float base, float freq_scale)
{
    for (int64_t i = 0; i < d / 2; i++) {
        float expo = (float)(2 * i) / (float)d;
        inv_freq[i] = (1.0f / powf(base, expo)) * freq_scale;
    }
}

void g3_rope_table(float *cs, int64_t d, int64_t pos, const float *inv_freq)
{
    const int64_t h = d / 2;
    const float p = (float)pos;
    for (int64_t i = 0; i < h; i++) {
        float theta = p * inv_freq[i];
        cs[i] = (float)cos((double)theta);
        cs[h + i] = (float)sin((double)theta);
    }
}

void g3_rope_apply_f32(float *x, int64_t d, const float *cs)
{
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = x[i], b = x[i + h], c = cs[i], s = cs[h + i];
        x[i] = a * c - b * s;
        x[i + h] = b * c + a * s;
    }
}

void g3_rope_neox_f32(float *x, int64_t d, int64_t pos, const float *inv_freq)
{
    const int64_t h = d / 2;
    const float p = (float)pos;
    for (int64_t i = 0; i < h; i++) {
        float theta = p * inv_freq[i];
        float c = (float)cos((double)theta), s = (float)sin((double)theta);
        float a = x[i], b = x[i + h];
        x[i] = a * c - b * s;
        x[i + h] = b * c + a * s;
    }
}
