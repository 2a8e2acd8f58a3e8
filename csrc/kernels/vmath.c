/* vmath.c — vectorized exp for GeGLU and softmax, with run-time ISA dispatch.
 *
 * exp(x) = 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor/minimax polynomial
 * (relative error ~2e-7, i.e. about 1-2 float ulp); inputs are clamped to [-87.3, 88.7] so the
 * result stays finite (exp(-87.3) ~ 1e-38, exp(88.7) ~ 3e38).
 * GELU (tanh form) is evaluated as x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi)(x +
 * 0.044715 x^3): algebraically equal to 0.5 x (1 + tanh u) without its cancellation near u = 0.
 * The scalar functions in norm_rope_act.c stay the reference; tests compare within float tolerance.
 */
#include <immintrin.h>
#include <math.h>

#include "kernels/ops.h"

#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365447504019f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define GELU_K 0.7978845608028654f

__attribute__((target("avx512f"))) static void geglu512(const float *g, const float *u, float *o,
                                                        int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        __m512 t = _mm512_mul_ps(_mm512_set1_ps(-2.0f * GELU_K),
                                 _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x));
        __m512 gl = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(t)));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(gl, _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

__attribute__((target("avx2,fma"))) static void geglu256(const float *g, const float *u, float *o,
                                                         int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        __m256 t = _mm256_mul_ps(_mm256_set1_ps(-2.0f * GELU_K),
                                 _mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x));
        __m256 gl = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(t)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(gl, _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

/* x[i] = exp(x[i] - m), returns the sum (double accumulation of float lanes) */
__attribute__((target("avx512f"))) static double expsum512(float *x, int64_t n, float m)
{
    __m512 vm = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    int64_t i = 0;
    double s = 0.0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++)
        s += (x[i] = expf(x[i] - m));
    return s;
}

__attribute__((target("avx2,fma"))) static double expsum256(float *x, int64_t n, float m)
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

static double expsum_scalar(float *x, int64_t n, float m)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (x[i] = expf(x[i] - m));
    return s;
}

static void geglu_scalar(const float *g, const float *u, float *o, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        o[i] = g3_gelu_tanh(g[i]) * u[i];
}

typedef void (*geglu_fn)(const float *, const float *, float *, int64_t);
typedef double (*expsum_fn)(float *, int64_t, float);
static geglu_fn geglu_impl;
static expsum_fn expsum_impl;

static void pick(void)
{
    __builtin_cpu_init();
    geglu_fn g = geglu_scalar;
    expsum_fn e = expsum_scalar;
    if (__builtin_cpu_supports("avx512f")) {
        g = geglu512;
        e = expsum512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        g = geglu256;
        e = expsum256;
    }
    __atomic_store_n(&expsum_impl, e, __ATOMIC_RELAXED);
    __atomic_store_n(&geglu_impl, g, __ATOMIC_RELEASE);
}

void g3_geglu_f32(const float *gate, const float *up, float *out, int64_t n)
{
    geglu_fn f = __atomic_load_n(&geglu_impl, __ATOMIC_ACQUIRE);
    if (!f) {
        pick();
        f = geglu_impl;
    }
    f(gate, up, out, n);
}

double g3_expsum_f32(float *x, int64_t n, float m)
{
    expsum_fn f = __atomic_load_n(&expsum_impl, __ATOMIC_RELAXED);
    if (!f) {
        pick();
        f = expsum_impl;
    }
    return f(x, n, m);
}
