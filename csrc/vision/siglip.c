/* siglip.c — SigLIP vision tower and Gemma 3 projector forward pass (see siglip.h for the math).
 *
 * One image at a time: P = 4096 rows for the real model, so every matrix product is a BLAS-sized
 * one (g3_matmul). Attention runs head by head as one P x P tile of g3_attn_tile_f32: S = Q_h K_h^T
 * (sgemm), row softmax in an OpenMP region, Z_h = S V_h (sgemm). The P x P score matrix of one head
 * (64 MiB at P = 4096) is the largest buffer; when a layer is captured the softmax is written
 * straight into the caller's (n_head, P, P) buffer instead. BLAS is only called outside OpenMP
 * regions. The row kernels (LayerNorm, softmax, bias + GELU) are the shared ones in kernels/, so
 * G3_ISA selects the tower's SIMD level like the text model's.
 */
#include "vision/siglip.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/ops.h"
#include "model/roles.h"

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

static void layernorm_rows(const float *x, const float *w, const float *b, float *y, int64_t T,
                           int64_t n, float eps, int nt)
{
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++)
        g3_layernorm_f32(x + t * n, w, b, y + t * n, n, eps);
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
    int64_t *lo, *hi; /* (P) visible keys of every query row: all of them */
    g3_matmul_ws mm;
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
    free(b->lo);
    free(b->hi);
    g3_matmul_ws_free(&b->mm);
}

/* One image per call: the buffers live for this encode (the text model's run state is for
 * per-token work); the matmuls take their scratch from it, as in the forward pass. */
static g3_status vbufs_alloc(const g3_vision *v, vbufs *b, int nt, g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff;
    const int64_t pp3 = 3 * c->patch_size * c->patch_size;
    const size_t pd = (size_t)P * D;
    b->x = malloc(sizeof(float) * pd);
    b->h = malloc(sizeof(float) * (pd > (size_t)P * pp3 ? pd : (size_t)P * pp3));
    b->q = malloc(sizeof(float) * pd);
    b->k = malloc(sizeof(float) * pd);
    b->v = malloc(sizeof(float) * pd);
    b->z = malloc(sizeof(float) * pd);
    b->f = malloc(sizeof(float) * (size_t)P * F);
    b->scores = malloc(sizeof(float) * (size_t)P * P);
    b->lo = calloc((size_t)P, sizeof(int64_t)); /* every query sees every patch */
    b->hi = malloc(sizeof(int64_t) * (size_t)P);
    g3_matmul_ws_need(&b->mm, &v->patch, P, nt);
    g3_matmul_ws_need(&b->mm, &v->mm_proj, c->n_mm_tokens, nt);
    for (int64_t il = 0; il < c->n_layer; il++) {
        const g3_vision_layer *L = &v->layers[il];
        const g3_weight *ws[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (size_t j = 0; j < sizeof ws / sizeof ws[0]; j++)
            g3_matmul_ws_need(&b->mm, ws[j], P, nt);
    }
    g3_status st = g3_matmul_ws_alloc(&b->mm, err);
    if (!st && (!b->x || !b->h || !b->q || !b->k || !b->v || !b->z || !b->f || !b->scores ||
                !b->lo || !b->hi))
        st = g3_fail(err, G3_ERR_NOMEM, "out of memory encoding an image (%lld patches)",
                     (long long)P);
    if (st) {
        vbufs_free(b);
        return st;
    }
    for (int64_t r = 0; r < P; r++)
        b->hi[r] = P - 1;
    return G3_OK;
}

/* Bidirectional multi-head attention over the P rows of q/k/v (P, D) -> z (P, D), one head at a
 * time as a single (P x P) tile. */
static void attention(const g3_vision *v, vbufs *b, float *capture, int nt)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, hd = D / c->n_head;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < c->n_head; h++) {
        float *S = capture ? capture + (size_t)h * P * P : b->scores;
        g3_attn_tile_f32(b->q + h * hd, D, b->k + h * hd, b->v + h * hd, D, P, P, hd, scale,
                         b->lo, b->hi, S, P, b->z + h * hd, D, nt, NULL);
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
    if ((st = g3_matmul(&L->q, b->h, P, b->q, &b->mm, err)) ||
        (st = g3_matmul(&L->k, b->h, P, b->k, &b->mm, err)) ||
        (st = g3_matmul(&L->v, b->h, P, b->v, &b->mm, err)))
        return st;
    add_bias_rows(b->q, L->q_b, P, D, nt);
    add_bias_rows(b->k, L->k_b, P, D, nt);
    add_bias_rows(b->v, L->v_b, P, D, nt);
    attention(v, b, capture, nt);
    if ((st = g3_matmul(&L->o, b->z, P, b->h, &b->mm, err)))
        return st;
    add_resid_rows(b->x, b->h, L->o_b, P, D, nt);
    layernorm_rows(b->x, L->ln2_w, L->ln2_b, b->h, P, D, c->eps, nt);
    if ((st = g3_matmul(&L->fc1, b->h, P, b->f, &b->mm, err)))
        return st;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < P; t++)
        g3_gelu_bias_f32(b->f + t * F, L->fc1_b, F);
    if ((st = g3_matmul(&L->fc2, b->f, P, b->h, &b->mm, err)))
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
    const int64_t P = v->n_patches, D = c->n_embd;
    const int nt = g3_get_threads();
    const size_t pd = (size_t)P * D;
    vbufs b = {0};
    g3_status st = vbufs_alloc(v, &b, nt, err);
    if (st)
        return st;
    im2col(v, pixels, b.h, nt);
    if ((st = g3_matmul(&v->patch, b.h, P, b.x, &b.mm, err)))
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
    st = g3_matmul(&v->mm_proj, b.h, c->n_mm_tokens, out, &b.mm, err);
done:
    vbufs_free(&b);
    return st;
}
