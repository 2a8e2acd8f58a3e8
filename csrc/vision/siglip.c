/* siglip.c — SigLIP vision tower and Gemma 3 projector forward pass (see siglip.h for the math).
 *
 * One image at a time: P = 4096 rows for the real model, so every matrix product is a large one.
 * Two modes:
 *   - f32: g3_matmul (blocks of C on our threads, single-threaded OpenBLAS in each);
 *   - bf16 (g3_vision_use_bf16): matrices converted once to packed bf16 panels, activations
 *     rounded to bf16 per product (LayerNorm writes the packed rows directly), q/k/v one product,
 *     bias / GELU / residual applied on each block of C while it is in cache (gemm_bf16.h).
 * Attention, both modes: fused per (head, block of query rows) task (kernels/attention_vision.h),
 * keys taken a block at a time with an online softmax (running max and sum per row, the partial output rescaled), so no P x P
 * score matrix exists (the old path wrote and read 64 MiB per head, twice). f32 blocks are
 * single-threaded sgemm calls inside the parallel region; bf16 blocks the bf16 kernel with keys and
 * values packed once per layer. A captured layer (attention probabilities requested) goes through
 * g3_attn_tile_f32, which writes the softmax straight into the caller's (n_head, P, P) buffer.
 * Tasks partition outputs only, so an image gets the same bits at any thread count. The row
 * kernels (LayerNorm, softmax, bias + GELU) are the shared ones in kernels/, so G3_ISA selects the
 * tower's SIMD level like the text model's.
 */
#include "vision/siglip.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/attention_vision.h"
#include "kernels/dispatch.h"
#include "kernels/gemm.h"
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

static void drop_bf16(g3_vision *v)
{
    if (v->l16)
        for (int64_t il = 0; il < v->cfg.n_layer; il++) {
            g3_vision_bf16_layer *L = &v->l16[il];
            g3_bf16_mat_free(&L->qkv);
            g3_bf16_mat_free(&L->o);
            g3_bf16_mat_free(&L->fc1);
            g3_bf16_mat_free(&L->fc2);
            free(L->qkv_b);
        }
    free(v->l16);
    v->l16 = NULL;
    g3_bf16_mat_free(&v->patch16);
    g3_bf16_mat_free(&v->proj16);
    v->bf16 = 0;
}

void g3_vision_free(g3_vision *v)
{
    if (!v)
        return;
    drop_bf16(v);
    free(v->layers);
    free(v);
}

/* 2 + 4 n_layer conversions, shared out over the threads (each one single-threaded). */
g3_status g3_vision_use_bf16(g3_vision *v, int on, g3_err *err)
{
    drop_bf16(v);
    if (!on || !g3_isa_bf16())
        return G3_OK;
    const int64_t nl = v->cfg.n_layer, D = v->cfg.n_embd;
    v->l16 = calloc((size_t)(nl ? nl : 1), sizeof *v->l16);
    if (!v->l16)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for the bf16 vision tower");
    const int64_t njobs = 2 + 4 * nl;
    int failed = 0;
#pragma omp parallel for num_threads(g3_get_threads()) schedule(dynamic, 1) reduction(|:failed)
    for (int64_t j = 0; j < njobs; j++) {
        g3_err e = {{0}, 0};
        g3_status st = G3_OK;
        if (j == 0)
            st = g3_bf16_mat_from_weight(&v->patch, &v->patch16, &e);
        else if (j == 1)
            st = g3_bf16_mat_from_weight(&v->mm_proj, &v->proj16, &e);
        else {
            const int64_t il = (j - 2) / 4;
            const g3_vision_layer *L = &v->layers[il];
            g3_vision_bf16_layer *B = &v->l16[il];
            switch ((j - 2) % 4) {
            case 0: {
                const g3_weight *qkv[3] = {&L->q, &L->k, &L->v};
                st = g3_bf16_mat_from_weights(3, qkv, &B->qkv, &e);
                if (!st && !(B->qkv_b = malloc(sizeof(float) * 3 * (size_t)D)))
                    st = G3_ERR_NOMEM;
                if (!st) {
                    memcpy(B->qkv_b, L->q_b, sizeof(float) * (size_t)D);
                    memcpy(B->qkv_b + D, L->k_b, sizeof(float) * (size_t)D);
                    memcpy(B->qkv_b + 2 * D, L->v_b, sizeof(float) * (size_t)D);
                }
                break;
            }
            case 1: st = g3_bf16_mat_from_weight(&L->o, &B->o, &e); break;
            case 2: st = g3_bf16_mat_from_weight(&L->fc1, &B->fc1, &e); break;
            default: st = g3_bf16_mat_from_weight(&L->fc2, &B->fc2, &e); break;
            }
        }
        failed |= st != G3_OK;
    }
    if (failed) {
        drop_bf16(v);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory converting the vision tower to bf16");
    }
    v->bf16 = 1;
    return G3_OK;
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

/* ---- per-encode buffers -------------------------------------------------------------------- */

typedef struct {
    float *x, *h, *q, *k, *v, *z, *f;
    float *aws;          /* (threads, attn ws) */
    size_t aws_stride;
    uint32_t *act;       /* bf16: packed activations of the widest product input */
    uint32_t *kpan, *vpan; /* bf16: (n_head) packed keys / values of the layer */
    float *fkpan;          /* f32: (n_head) packed keys of the layer */
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
    free(b->aws);
    free(b->act);
    free(b->kpan);
    free(b->vpan);
    free(b->fkpan);
    g3_matmul_ws_free(&b->mm);
}

/* One image per call: the buffers live for this encode (the text model's run state is for
 * per-token work); the matmuls take their scratch from it, as in the forward pass.
 * bf16: q holds q|k|v as (P, 3D), k and v are unused. */
static g3_status vbufs_alloc(const g3_vision *v, vbufs *b, int nt, g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff, hd = D / c->n_head;
    const int64_t pp3 = 3 * c->patch_size * c->patch_size;
    const size_t pd = (size_t)P * D;
    int ok = 1;
    b->x = malloc(sizeof(float) * pd);
    b->h = malloc(sizeof(float) * (pd > (size_t)P * pp3 ? pd : (size_t)P * pp3));
    b->z = malloc(sizeof(float) * pd);
    b->f = malloc(sizeof(float) * (size_t)P * F);
    b->aws_stride = g3_attn_fused_ws_floats(hd) + 16;
    b->aws = malloc(sizeof(float) * b->aws_stride * (size_t)nt);
    if (v->bf16) {
        b->q = malloc(sizeof(float) * 3 * pd);
        int64_t kmax = D > F ? D : F;
        kmax = kmax > pp3 ? kmax : pp3;
        const int64_t mmax = P > c->n_mm_tokens ? P : c->n_mm_tokens;
        b->act = malloc(sizeof(uint32_t) * g3_bf16_act_words(mmax, kmax));
        b->kpan = malloc(sizeof(uint32_t) * g3_attn_kpan_words(P, hd) * (size_t)c->n_head);
        b->vpan = malloc(sizeof(uint32_t) * g3_attn_vpan_words(P, hd) * (size_t)c->n_head);
        ok = b->q && b->act && b->kpan && b->vpan;
    } else {
        b->q = malloc(sizeof(float) * pd);
        b->k = malloc(sizeof(float) * pd);
        b->v = malloc(sizeof(float) * pd);
        b->fkpan = malloc(sizeof(float) * g3_attn_fkey_floats(P, hd) * (size_t)c->n_head);
        ok = b->q && b->k && b->v && b->fkpan;
        g3_matmul_ws_need(&b->mm, &v->patch, P, nt);
        g3_matmul_ws_need(&b->mm, &v->mm_proj, c->n_mm_tokens, nt);
        for (int64_t il = 0; il < c->n_layer; il++) {
            const g3_vision_layer *L = &v->layers[il];
            const g3_weight *ws[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
            for (size_t j = 0; j < sizeof ws / sizeof ws[0]; j++)
                g3_matmul_ws_need(&b->mm, ws[j], P, nt);
        }
    }
    g3_status st = g3_matmul_ws_alloc(&b->mm, err);
    if (!st && (!ok || !b->x || !b->h || !b->z || !b->f || !b->aws))
        st = g3_fail(err, G3_ERR_NOMEM, "out of memory encoding an image (%lld patches)",
                     (long long)P);
    if (st) {
        vbufs_free(b);
        return st;
    }
    return G3_OK;
}

/* Bidirectional multi-head attention over the P rows of q/k/v (row strides ldq, ldk) -> z (P, D).
 * capture: the layer's probabilities are wanted, so each head is one P x P tile written there. */
static g3_status attention(const g3_vision *v, vbufs *b, const float *q, const float *k,
                           const float *vv, int64_t ldq, int64_t ldk, float *capture, int nt,
                           g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const int64_t P = v->n_patches, D = c->n_embd, H = c->n_head, hd = D / H;
    const float scale = 1.0f / sqrtf((float)hd);
    if (capture) {
        int64_t *lo = calloc((size_t)P, sizeof *lo), *hi = malloc(sizeof *hi * (size_t)P);
        if (!lo || !hi) {
            free(lo);
            free(hi);
            return g3_fail(err, G3_ERR_NOMEM, "out of memory capturing vision attention");
        }
        for (int64_t r = 0; r < P; r++)
            hi[r] = P - 1;
        for (int64_t h = 0; h < H; h++)
            g3_attn_tile_f32(q + h * hd, ldq, k + h * hd, vv + h * hd, ldk, P, P, hd, scale, lo,
                             hi, capture + (size_t)h * P * P, P, b->z + h * hd, D, nt, NULL);
        free(lo);
        free(hi);
        return G3_OK;
    }
    const int use16 = v->bf16;
    const size_t kw = g3_attn_kpan_words(P, hd), vw = g3_attn_vpan_words(P, hd);
    const int64_t npk = (P + G3_BF16_NR - 1) / G3_BF16_NR;
    const size_t fw = g3_attn_fkey_floats(P, hd);
    if (!use16) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < H * npk; t++)
            g3_attn_pack_keys_f32(k + t / npk * hd, ldk, P, hd, t % npk, b->fkpan + t / npk * fw);
    } else {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t t = 0; t < H * (npk + 1); t++) {
            const int64_t h = t / (npk + 1), j = t % (npk + 1);
            if (j == npk) /* the head's values, transposed */
                g3_attn_pack_values(vv + h * hd, ldk, P, hd, b->vpan + h * vw);
            else
                g3_attn_pack_keys(k + h * hd, ldk, P, hd, j, b->kpan + h * kw);
        }
    }
    const int64_t nqb = (P + G3_ATTN_QB - 1) / G3_ATTN_QB;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < H * nqb; t++) {
        const int64_t h = t / nqb, r0 = t % nqb * G3_ATTN_QB;
        float *ws = b->aws + (size_t)omp_get_thread_num() * b->aws_stride;
        g3_attn_fused_rows(q + r0 * ldq + h * hd, ldq, k + h * hd, vv + h * hd, ldk,
                  use16 ? b->kpan + h * kw : NULL, use16 ? b->vpan + h * vw : NULL,
                  use16 ? NULL : b->fkpan + h * fw, P, hd,
                  P - r0 < G3_ATTN_QB ? P - r0 : G3_ATTN_QB, scale, b->z + r0 * D + h * hd, D, ws);
    }
    return G3_OK;
}

/* LayerNorm of every row of x straight into packed bf16 activations (one tile per task). */
static void layernorm_pack(const float *x, const float *w, const float *bias, uint32_t *act,
                           float *tmp, int64_t T, int64_t n, float eps, int nt)
{
    const int64_t MR = G3_BF16_MR, ntile = (T + MR - 1) / MR;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < ntile; t++) {
        const int64_t r0 = t * MR, r1 = r0 + MR < T ? r0 + MR : T;
        for (int64_t r = r0; r < r1; r++)
            g3_layernorm_f32(x + r * n, w, bias, tmp + r * n, n, eps);
        g3_bf16_pack_rows(tmp, n, n, r0, r1, T, act, (n + 1) / 2);
    }
}

static g3_status layer_forward_f32(const g3_vision *v, int64_t il, vbufs *b, float *capture,
                                   int nt, g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const g3_vision_layer *L = &v->layers[il];
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff;
    g3_status st;
    layernorm_rows(b->x, L->ln1_w, L->ln1_b, b->h, P, D, c->eps, nt);
    const g3_weight *qkv[3] = {&L->q, &L->k, &L->v};
    float *const out[3] = {b->q, b->k, b->v};
    if ((st = g3_matmul_multi(3, qkv, b->h, P, out, &b->mm, err)))
        return st;
    add_bias_rows(b->q, L->q_b, P, D, nt);
    add_bias_rows(b->k, L->k_b, P, D, nt);
    add_bias_rows(b->v, L->v_b, P, D, nt);
    if ((st = attention(v, b, b->q, b->k, b->v, D, D, capture, nt, err)))
        return st;
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

static g3_status layer_forward_bf16(const g3_vision *v, int64_t il, vbufs *b, float *capture,
                                    int nt, g3_err *err)
{
    const g3_vision_config *c = &v->cfg;
    const g3_vision_layer *L = &v->layers[il];
    const g3_vision_bf16_layer *B = &v->l16[il];
    const int64_t P = v->n_patches, D = c->n_embd, F = c->n_ff;
    g3_status st;
    layernorm_pack(b->x, L->ln1_w, L->ln1_b, b->act, b->h, P, D, c->eps, nt);
    const g3_bf16_epi qkv = {B->qkv_b, 0, 0}, resid_o = {L->o_b, 0, 1},
                      up = {L->fc1_b, 1, 0}, resid_2 = {L->fc2_b, 0, 1};
    g3_bf16_gemm(b->act, P, &B->qkv, b->q, 3 * D, &qkv, nt);
    if ((st = attention(v, b, b->q, b->q + D, b->q + 2 * D, 3 * D, 3 * D, capture, nt, err)))
        return st;
    g3_bf16_pack_act(b->z, P, D, D, b->act, nt);
    g3_bf16_gemm(b->act, P, &B->o, b->x, D, &resid_o, nt); /* x += z Wo^T + bo */
    layernorm_pack(b->x, L->ln2_w, L->ln2_b, b->act, b->h, P, D, c->eps, nt);
    g3_bf16_gemm(b->act, P, &B->fc1, b->f, F, &up, nt); /* gelu(h W1^T + b1) */
    g3_bf16_pack_act(b->f, P, F, F, b->act, nt);
    g3_bf16_gemm(b->act, P, &B->fc2, b->x, D, &resid_2, nt); /* x += f W2^T + b2 */
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
    const int64_t pp3 = 3 * c->patch_size * c->patch_size;
    if (v->bf16) {
        g3_bf16_pack_act(b.h, P, pp3, pp3, b.act, nt);
        g3_bf16_gemm(b.act, P, &v->patch16, b.x, D, NULL, nt);
    } else if ((st = g3_matmul(&v->patch, b.h, P, b.x, &b.mm, err)))
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
        if ((st = v->bf16 ? layer_forward_bf16(v, il, &b, ca, nt, err)
                          : layer_forward_f32(v, il, &b, ca, nt, err)))
            goto done;
    }
    layernorm_rows(b.x, v->post_w, v->post_b, b.x, P, D, c->eps, nt);
    if (cap && cap->hidden)
        memcpy(cap->hidden, b.x, sizeof(float) * pd);
    pool_norm(v, b.x, b.h, nt);
    if (v->bf16) {
        g3_bf16_pack_act(b.h, c->n_mm_tokens, D, D, b.act, nt);
        g3_bf16_gemm(b.act, c->n_mm_tokens, &v->proj16, out, c->n_embd_text, NULL, nt);
    } else
        st = g3_matmul(&v->mm_proj, b.h, c->n_mm_tokens, out, &b.mm, err);
done:
    vbufs_free(&b);
    return st;
}
