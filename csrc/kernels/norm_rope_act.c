/* norm_rope_act.c — RMSNorm, NeoX RoPE, tanh-GELU/GeGLU and softmax (reference:
 * transformers-gemma3.md §2.2, §2.4, §2.6). Float32 in and out. */
#include <math.h>

#include "kernels/ops.h"

void g3_rmsnorm_f32(const float *x, const float *w, float *y, int64_t n, float eps)
{
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] * scale * w[i];
}

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

float g3_gelu_tanh(float x)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}


void g3_softmax_f32(float *x, int64_t n)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    double sum = g3_expsum_f32(x, n, m);
    float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++)
        x[i] *= inv;
}
