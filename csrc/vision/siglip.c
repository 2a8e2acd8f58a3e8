/* siglip.c — SigLIP vision tower and Gemma 3 projector forward pass (see siglip.h for the math).
 *
 * One image at a time: P = 4096 rows for the real model, so every matrix product is a BLAS-sized
 * one (g3_matmul). Attention runs head by head: S = Q_h K_h^T (sgemm, P x P), row softmax in an
 * OpenMP region, Z_h = S V_h (sgemm). The P x P score matrix of one head (64 MiB at P = 4096) is
 * the largest buffer; when a layer is captured the softmax is written straight into the caller's
 * (n_head, P, P) buffer instead. BLAS is only called outside OpenMP regions (threading.c policy).
 */
#include "vision/siglip.h"

#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/roles.h"

/* ---- row kernels: softmax over P scores and bias + GELU over the MLP width -----------------
 * The tower evaluates 16 x 4096 x 4096 exponentials and 4096 x 4304 GELUs per layer, so libm's
 * scalar expf/tanhf would cost as much as the matrix products. The scalar versions (the
 * g3_softmax_f32 / g3_gelu_tanh kernels) stay the reference and the fallback; the AVX2 and
 * AVX-512 variants use exp(x) = 2^n p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6
 * Taylor polynomial (relative error ~1e-7), and gelu_tanh(x) = x * sigmoid(2 y) with
 * y = sqrt(2/pi) (x + 0.044715 x^3), the same function as 0.5 x (1 + tanh(y)). */
typedef void (*row_fn)(float *x, const float *b, int64_t n);

static void softmax_ref(float *x, const float *b, int64_t n) { g3_softmax_f32(x, n); }

static void gelu_ref(float *x, const float *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

#define EXP_C6 (1.0f / 720)
#define EXP_C5 (1.0f / 120)
#define EXP_C4 (1.0f / 24)
#define EXP_C3 (1.0f / 6)
#define GELU_K 0.7978845608028654f

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_C6), r, _mm512_set1_ps(EXP_C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

__attribute__((target("avx512f"))) static void softmax_avx512(float *x, const float *b,
                                                               int64_t n)
{
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
    float m = _mm512_reduce_max_ps(vm);
    for (; i < n; i++)
        m = x[i] > m ? x[i] : m;
    const __m512 mv = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    double sum = _mm512_reduce_add_ps(vs);
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (i = 0; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
    for (; i < n; i++)
        x[i] *= (float)(1.0 / sum);
}

__attribute__((target("avx512f"))) static void gelu_avx512(float *x, const float *b, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(b + i));
        __m512 y = _mm512_mul_ps(_mm512_set1_ps(2.0f * GELU_K),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v),
                                                 _mm512_mul_ps(v, v), v));
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), y)); /* x / (1 + exp(-2y)) */
        _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
    }
    for (; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C6), r, _mm256_set1_ps(EXP_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

__attribute__((target("avx2,fma"))) static void softmax_avx2(float *x, const float *b, int64_t n)
{
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vs);
    double sum = 0.0;
    for (int k = 0; k < 8; k++)
        sum += lanes[k];
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (i = 0; i < n; i++)
        x[i] *= inv;
}

__attribute__((target("avx2,fma"))) static void gelu_avx2(float *x, const float *b, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(b + i));
        __m256 y = _mm256_mul_ps(_mm256_set1_ps(2.0f * GELU_K),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v),
                                                 _mm256_mul_ps(v, v), v));
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), y));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    }
    for (; i < n; i++)
        x[i] = g3_gelu_tanh(x[i] + b[i]);
}

static row_fn softmax_row, gelu_row;

/* G3_VISION_SCALAR=1 forces the reference kernels (to check the SIMD ones against them). */
static void pick_kernels(void)
{
    if (__atomic_load_n(&softmax_row, __ATOMIC_ACQUIRE))
        return;
    row_fn sm = softmax_ref, ge = gelu_ref;
    const char *env = getenv("G3_VISION_SCALAR");
    __builtin_cpu_init();
    if (env && *env && *env != '0') {
        /* keep the reference */
    } else if (__builtin_cpu_supports("avx512f")) {
        sm = softmax_avx512;
        ge = gelu_avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        sm = softmax_avx2;
        ge = gelu_avx2;
    }
    __atomic_store_n(&gelu_row, ge, __ATOMIC_RELEASE);
    __atomic_store_n(&softmax_row, sm, __ATOMIC_RELEASE);
}

g3_status g3_vision_create(const g3_vision_config *cfg, g3_vision **out, g3_err *err)
{
    const g3_vision_config *c = cfg;
    *out = NULL;
    if (c->image_size < 1 || c->patch_size < 1 || c->image_size % c->patch_size)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "vision image_size %lld is not a positive multiple of patch_size %lld",
                       (long long)c->image_size, (long long)c->patch_size);
    if (c->n_embd < 1 || c->n_ff < 1 || c->n_layer < 0 || c->n_head < 1 ||
        c->n_embd % c->n_head || c->n_embd_text < 1 || c->n_embd > (1 << 20) ||
        c->n_ff > (1 << 22) || c->n_layer > 1024)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "vision config: width %lld, ff %lld, %lld layers, %lld heads, text width "
                       "%lld is not a valid tower",
                       (long long)c->n_embd, (long long)c->n_ff, (long long)c->n_layer,
                       (long long)c->n_head, (long long)c->n_embd_text);
    if (!(c->eps >= 0)) /* no default here: gemma3/vision.py decides it */
        return g3_fail(err, G3_ERR_FORMAT, "vision config: eps %g is not a valid epsilon",
                       c->eps);
    const int64_t side = c->image_size / c->patch_size;
    if (side > 1024)
        return g3_fail(err, G3_ERR_UNSUPPORTED, "vision grid of %lld x %lld patches is too large",
                       (long long)side, (long long)side);
    /* as the reference: tokens_per_side = int(sqrt(mm_tokens)), kernel = side / tokens_per_side */
    int64_t tps = (int64_t)sqrt((double)c->n_mm_tokens);
    while (tps * tps > c->n_mm_tokens)
        tps--;
    while ((tps + 1) * (tps + 1) <= c->n_mm_tokens)
        tps++;
    if (c->n_mm_tokens < 1 || tps * tps != c->n_mm_tokens || side % tps)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "mm_tokens_per_image %lld must be a square whose side divides the %lld "
                       "patches per side",
                       (long long)c->n_mm_tokens, (long long)side);
    g3_vision *v = calloc(1, sizeof *v);
    if (!v || !(v->layers = calloc((size_t)(c->n_layer ? c->n_layer : 1), sizeof *v->layers))) {
        free(v);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for the vision tower");
    }
    v->cfg = *c;
    v->side = side;
    v->n_patches = side * side;
    v->pool = side / tps;
    *out = v;
    return G3_OK;
}

void g3_vision_free(g3_vision *v)
{
    if (!v)
        return;
    free(v->layers);
    free(v);
}

/* Every role of the table (model/roles.c) bound, with its expected shape. */
g3_status g3_vision_check(const g3_vision *v, g3_err *err)
{
    int64_t dims[G3_DIM_N];
    g3_vision_dims(&v->cfg, dims);
    return g3_roles_check(&g3_vision_roles, dims, (void *)v, v->layers, sizeof *v->layers,
                          v->cfg.n_layer, err);
}

/* LayerNorm of one row: y = (x - mean) / sqrt(var + eps) * w + b, biased variance, sums in
 * double (torch computes float32 with a compensated reduction; both are within a few ulps). */
static void layernorm_row(const float *x, const float *w, const float *b, float *y, int64_t n,
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

static void layernorm_rows(const float *x, const float *w, const float *b, float *y, int64_t T,
                           int64_t n, float eps, int nt)
{
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++)
        layernorm_row(x + t * n, w, b, y + t * n, n, eps);
}

static void add_bias_rows(float *y, const float *b, int64_t T, int64_t n, int nt)
{
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < n; i++)
            y[t * n + i] += b[i];
}

/* x += y + b, row by row */
static void add_resid_rows(float *x, const float *y, const float *b, int64_t T, int64_t n, int nt)
{
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < n; i++)
            x[t * n + i] += y[t * n + i] + b[i];
}

/* Patch (py, px) as a row of 3 * p * p values in (channel, row, col) order. */
static void im2col(const g3_vision *v, const float *pixels, float *cols, int nt)
{
    const int64_t p = v->cfg.patch_size, S = v->cfg.image_size, side = v->side, pp = p * p;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < v->n_patches; n++) {
        const int64_t py = n / side, px = n % side;
        float *dst = cols + n * 3 * pp;
        for (int64_t ch = 0; ch < 3; ch++)
            for (int64_t r = 0; r < p; r++)
                memcpy(dst + ch * pp + r * p, pixels + (ch * S + py * p + r) * S + px * p,
                       sizeof(float) * (size_t)p);
    }
}

typedef struct {
    float *x, *h, *q, *k, *v, *z, *f, *scores;
} vbufs;

static void vbufs_free(vbufs *b)
{
    free(b->x);
    free(b->h);
    free(b->q);
    free(b->k);
    free(b->v);
    free(b->z);
    free(b->f);
    free(b->scores);
}

/* Bidirectional multi-head attention over the P rows of q/k/v (P, D) -> z (P, D). */
static void attention(const g3_vision *v, vbufs *b, float *capture, int nt)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, hd = D / c->n_head;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < c->n_head; h++) {
        float *S = capture ? capture + (size_t)h * P * P : b->scores;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)P, (int)P, (int)hd, scale,
                    b->q + h * hd, (int)D, b->k + h * hd, (int)D, 0.0f, S, (int)P);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < P; r++)
            softmax_row(S + r * P, NULL, P);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)P, (int)hd, (int)P, 1.0f, S,
                    (int)P, b->v + h * hd, (int)D, 0.0f, b->z + h * hd, (int)D);
    }
}

static g3_status layer_forward(const g3_vision *v, int64_t il, vbufs *b, float *capture, int nt,
                               g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const g3_vision_layer *L = &v->layers[il];
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff;
    g3_status st;
    layernorm_rows(b->x, L->ln1_w, L->ln1_b, b->h, P, D, c->eps, nt);
    if ((st = g3_matmul(&L->q, b->h, P, b->q, err)) ||
        (st = g3_matmul(&L->k, b->h, P, b->k, err)) ||
        (st = g3_matmul(&L->v, b->h, P, b->v, err)))
        return st;
    add_bias_rows(b->q, L->q_b, P, D, nt);
    add_bias_rows(b->k, L->k_b, P, D, nt);
    add_bias_rows(b->v, L->v_b, P, D, nt);
    attention(v, b, capture, nt);
    if ((st = g3_matmul(&L->o, b->z, P, b->h, err)))
        return st;
    add_resid_rows(b->x, b->h, L->o_b, P, D, nt);
    layernorm_rows(b->x, L->ln2_w, L->ln2_b, b->h, P, D, c->eps, nt);
    if ((st = g3_matmul(&L->fc1, b->h, P, b->f, err)))
        return st;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < P; t++)
        gelu_row(b->f + t * F, L->fc1_b, F);
    if ((st = g3_matmul(&L->fc2, b->f, P, b->h, err)))
        return st;
    add_resid_rows(b->x, b->h, L->fc2_b, P, D, nt);
    return G3_OK;
}

/* avg-pool k x k blocks of the side x side grid (P, D) -> (M, D), then the projector RMSNorm. */
static void pool_norm(const g3_vision *v, const float *x, float *t, int nt)
{
    const int64_t D = v->cfg.n_embd, k = v->pool, side = v->side, tps = side / k;
    const float inv = 1.0f / (float)(k * k);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t m = 0; m < tps * tps; m++) {
        const int64_t r = m / tps, cc = m % tps;
        float *dst = t + m * D;
        memset(dst, 0, sizeof(float) * (size_t)D);
        for (int64_t i = 0; i < k; i++)
            for (int64_t j = 0; j < k; j++) {
                const float *src = x + ((r * k + i) * side + cc * k + j) * D;
                for (int64_t e = 0; e < D; e++)
                    dst[e] += src[e];
            }
        for (int64_t e = 0; e < D; e++)
            dst[e] *= inv;
        g3_rmsnorm_f32(dst, v->mm_norm, dst, D, v->cfg.eps);
    }
}

g3_status g3_vision_encode(const g3_vision *v, const float *pixels, float *out,
                           const g3_vision_capture *cap, const g3_checkpoint *cp, g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff;
    const int64_t pp3 = 3 * c->patch_size * c->patch_size;
    const int nt = g3_get_threads();
    const size_t pd = (size_t)P * D;
    pick_kernels();
    vbufs b = {0};
    b.x = malloc(sizeof(float) * pd);
    b.h = malloc(sizeof(float) * (pd > (size_t)P * pp3 ? pd : (size_t)P * pp3));
    b.q = malloc(sizeof(float) * pd);
    b.k = malloc(sizeof(float) * pd);
    b.v = malloc(sizeof(float) * pd);
    b.z = malloc(sizeof(float) * pd);
    b.f = malloc(sizeof(float) * (size_t)P * F);
    b.scores = malloc(sizeof(float) * (size_t)P * P);
    if (!b.x || !b.h || !b.q || !b.k || !b.v || !b.z || !b.f || !b.scores) {
        vbufs_free(&b);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory encoding an image (%lld patches)",
                       (long long)P);
    }
    g3_status st;
    im2col(v, pixels, b.h, nt);
    if ((st = g3_matmul(&v->patch, b.h, P, b.x, err)))
        goto done;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < P; t++)
        for (int64_t e = 0; e < D; e++)
            b.x[t * D + e] += v->patch_b[e] + v->pos[t * D + e];
    for (int64_t il = 0; il < c->n_layer; il++) {
        if (cp && cp->check(cp->ctx)) {
            st = g3_fail(err, G3_ERR_INTERRUPTED, "interrupted before vision layer %lld",
                         (long long)il);
            goto done;
        }
        float *ca = cap && cap->attn && cap->attn_layer == il ? cap->attn : NULL;
        if ((st = layer_forward(v, il, &b, ca, nt, err)))
            goto done;
    }
    layernorm_rows(b.x, v->post_w, v->post_b, b.x, P, D, c->eps, nt);
    if (cap && cap->hidden)
        memcpy(cap->hidden, b.x, sizeof(float) * pd);
    pool_norm(v, b.x, b.h, nt);
    st = g3_matmul(&v->mm_proj, b.h, c->n_mm_tokens, out, err);
done:
    vbufs_free(&b);
    return st;
}
