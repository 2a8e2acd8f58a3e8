/* norm.c — row normalizations over float32 (scalar; they are a few hundred flops per row and never
 * the bottleneck).
 *
 *   RMSNorm   (Gemma, transformers-gemma3.md §2.2): y = x / sqrt(mean(x^2) + eps) * w
 *   LayerNorm (SigLIP, §3.1):                       y = (x - mean) / sqrt(var + eps) * w + b
 *
 * The Gemma (1 + w) convention is settled by the loaders: w here is always the full multiplier.
 * Sums in double (torch reduces float32 with a compensated sum; both agree within a few ulps).
 */
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

void g3_layernorm_f32(const float *x, const float *w, const float *b, float *y, int64_t n,
                      float eps)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += x[i];
    const double mean = s / (double)n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = x[i] - mean;
        ss += d * d;
    }
    const float inv = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    const float m = (float)mean;
    for (int64_t i = 0; i < n; i++)
        y[i] = (x[i] - m) * inv * w[i] + b[i];
}
