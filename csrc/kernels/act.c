/* act.c — activations and softmax over float32 rows: tanh-GELU, GeGLU, GELU with a bias, and the
 * numerically stable softmax (reference: transformers-gemma3.md §2.6 gelu_pytorch_tanh; SigLIP's
 * MLP uses the same GELU).
 *
 *   gelu(x)    = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
 *   geglu      = gelu(gate) * up
 *   softmax(x) = exp(x - max x) / sum exp(x - max x)   (sum in double, scaled by a float 1/sum)
 *
 * The scalar functions come first and are the reference and the fallback (libm expf/tanhf). The
 * SIMD variants share ONE exp: exp(x) = 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p a degree-6
 * minimax polynomial (relative error ~2e-7, 1-2 float ulp); inputs are clamped to [-87.3, 88.7]
 * so the result stays finite. GELU is evaluated as x * sigmoid(2u) = x / (1 + exp(-2u)):
 * algebraically the tanh form without its cancellation near u = 0. kernels/dispatch.c picks one
 * level for the process; tests compare every level with the reference within float tolerance.
 */
#include <immintrin.h>
#include <math.h>

#include "kernels/ops.h"

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

/* ---- scalar reference ------------------------------------------------------------------------ */

float g3_gelu_tanh(float x)
{
    return 0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x)));
}

static double expsum_scalar(float *x, int64_t n, float m)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (x[i] = expf(x[i] - m));
    return s;
}

static float row_max(const float *x, int64_t n)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

/* x *= 1/sum: the one normalization every level shares, so levels differ only inside exp */
static void scale_row(float *x, int64_t n, double sum)
{
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++)
        x[i] *= inv;
}

static void softmax_scalar(float *x, int64_t n)
{
    const float m = row_max(x, n);
    scale_row(x, n, expsum_scalar(x, n, m));
}

static void geglu_scalar(const float *g, const float *u, float *o, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

static void gelu_bias_scalar(float *x, const float *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------------ */

#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365447504019f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* gelu(x) = x / (1 + exp(-2u)) */
__attribute__((target("avx2,fma"))) static inline __m256 gelu256(__m256 x)
{
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 t = _mm256_mul_ps(_mm256_set1_ps(-2.0f * GELU_K),
                             _mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(t)));
}

__attribute__((target("avx2,fma"))) static double expsum_avx2(float *x, int64_t n, float m)
{
    __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float l[8];
    _mm256_storeu_ps(l, acc);
    double s = ((double)l[0] + l[1] + l[2] + l[3]) + ((double)l[4] + l[5] + l[6] + l[7]);
    for (; i < n; i++)
        s += (x[i] = expf(x[i] - m));
    return s;
}

static void softmax_avx2(float *x, int64_t n)
{
    const float m = row_max(x, n);
    scale_row(x, n, expsum_avx2(x, n, m));
}

__attribute__((target("avx2,fma"))) static void geglu_avx2(const float *g, const float *u,
                                                           float *o, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu256(_mm256_loadu_ps(g + i)),
                                              _mm256_loadu_ps(u + i)));
    for (; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

__attribute__((target("avx2,fma"))) static void gelu_bias_avx2(float *x, const float *b,
                                                               int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, gelu256(_mm256_add_ps(_mm256_loadu_ps(x + i),
                                                      _mm256_loadu_ps(b + i))));
    for (; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

/* ---- AVX-512 ---------------------------------------------------------------------------------- */

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) static inline __m512 gelu512(__m512 x)
{
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(-2.0f * GELU_K),
                             _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(t)));
}

__attribute__((target("avx512f"))) static double expsum_avx512(float *x, int64_t n, float m)
{
    __m512 vm = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    double s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++)
        s += (x[i] = expf(x[i] - m));
    return s;
}

static void softmax_avx512(float *x, int64_t n)
{
    const float m = row_max(x, n);
    scale_row(x, n, expsum_avx512(x, n, m));
}

__attribute__((target("avx512f"))) static void geglu_avx512(const float *g, const float *u,
                                                             float *o, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, _mm512_mul_ps(gelu512(_mm512_loadu_ps(g + i)),
                                              _mm512_loadu_ps(u + i)));
    for (; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

__attribute__((target("avx512f"))) static void gelu_bias_avx512(float *x, const float *b,
                                                                 int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, gelu512(_mm512_add_ps(_mm512_loadu_ps(x + i),
                                                      _mm512_loadu_ps(b + i))));
    for (; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

/* ---- dispatch --------------------------------------------------------------------------------- */

void g3_act_kernels(int isa, g3_float_kernels *k)
{
    if (isa >= G3_ISA_AVX512) {
        *k = (g3_float_kernels){k->dot, k->axpy, expsum_avx512, softmax_avx512, geglu_avx512,
                                gelu_bias_avx512};
    } else if (isa == G3_ISA_AVX2) {
        *k = (g3_float_kernels){k->dot, k->axpy, expsum_avx2, softmax_avx2, geglu_avx2,
                                gelu_bias_avx2};
    } else {
        *k = (g3_float_kernels){k->dot, k->axpy, expsum_scalar, softmax_scalar, geglu_scalar,
                                gelu_bias_scalar};
    }
}
