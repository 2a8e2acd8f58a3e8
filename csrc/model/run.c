/* run.c — allocation of the run state (layout in run.h). */
#include "model/run.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"


void g3_run_free(g3_run *r)
{
    if (!r)
        return;
    float *fl[] = {r->x, r->h, r->q, r->z, r->k, r->v, r->g, r->u, r->rope_local, r->rope_global,
                   r->scores, r->kv, r->S, r->fa_work, r->fa_part};
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++)
        free(fl[i]);
    free(r->pos);
    free(r->first);
    free(r->gend);
    free(r->key_hi);
    free(r->seq);
    free(r->tile_lo);
    free(r->tile_hi);
    free(r->fa_lo);
    free(r->fa_hi);
    g3_matmul_ws_free(&r->mm);
    free(r);
}

static int64_t fa_stride(const g3_config *c)
{
    const int64_t hd = c->head_dim, rep = c->n_head / c->n_head_kv;
    const int64_t item = g3_attn_flash_work(hd) + G3_FA_ROWS * (hd + 2);
    /* the row form of a large call keeps a query's chunk results (merge) and runs the kernel
     * (item) in one thread's stride */
    const int64_t merge = G3_FA_PARTS * rep * (hd + 2);
    return item + merge;
}

static size_t fa_part_floats(const g3_config *c, int64_t tokens)
{
    const int64_t rep = c->n_head / c->n_head_kv;
    const int64_t a = tokens * c->n_head, b = (int64_t)G3_FA_SPLIT * G3_FA_PARTS * rep;
    return (size_t)(a > b ? a : b) * (size_t)(c->head_dim + 2);
}

static size_t run_bytes(const g3_run *r, const g3_config *c)
{
    const size_t t = (size_t)r->tokens, kvw = (size_t)(c->n_head_kv * c->head_dim);
    const size_t qt = r->tokens < G3_ATTN_QTILE ? t : G3_ATTN_QTILE;
    size_t f = t * (2 * c->n_embd + 2 * c->n_head * c->head_dim + 2 * kvw + 2 * c->n_ff +
                    2 * c->head_dim);
    f += (size_t)r->threads * 2 * r->keys + 2 * (size_t)r->gather_keys * kvw +
         qt * (size_t)r->gather_keys + r->mm.tile_floats + r->mm.rows_floats;
    f += (size_t)r->threads * (size_t)r->fa_stride + fa_part_floats(c, r->tokens);
    return sizeof(float) * f + t * (6 * sizeof(int64_t) + sizeof(int32_t)) +
           2 * G3_ATTN_QTILE * sizeof(int64_t) + r->mm.xq_bytes;
}

size_t g3_run_bytes(const g3_model *m) { return m->run ? run_bytes(m->run, &m->cfg) : 0; }

g3_status g3_run_reserve(g3_model *m, int64_t tokens, int64_t keys, int threads, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const g3_run *o = m->run;
    if (g3_run_fits(o, tokens, keys, threads))
        return G3_OK;
    if (o) { /* never shrink: a decode step after a long prefill keeps the prefill's room */
        tokens = tokens > o->tokens ? tokens : o->tokens;
        keys = keys > o->keys ? keys : o->keys;
        threads = threads > o->threads ? threads : o->threads;
    }
    tokens = tokens < 1 ? 1 : tokens;
    keys = keys < 1 ? 1 : keys;
    threads = threads < 1 ? 1 : threads;
    g3_run *r = calloc(1, sizeof *r);
    if (!r)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for the run state");
    r->tokens = tokens;
    r->keys = keys;
    r->threads = threads;
    r->gather_keys = tokens >= G3_ATTN_BLAS_MIN ? keys : 0;
    const size_t t = (size_t)tokens, kvw = (size_t)(c->n_head_kv * c->head_dim);
    const size_t qw = (size_t)(c->n_head * c->head_dim);
    const size_t qt = tokens < G3_ATTN_QTILE ? t : G3_ATTN_QTILE;
    r->x = malloc(sizeof(float) * t * c->n_embd);
    r->h = malloc(sizeof(float) * t * c->n_embd);
    r->q = malloc(sizeof(float) * t * qw);
    r->z = malloc(sizeof(float) * t * qw);
    r->k = malloc(sizeof(float) * t * kvw);
    r->v = malloc(sizeof(float) * t * kvw);
    r->g = malloc(sizeof(float) * t * c->n_ff);
    r->u = malloc(sizeof(float) * t * c->n_ff);
    r->rope_local = malloc(sizeof(float) * t * c->head_dim);
    r->rope_global = malloc(sizeof(float) * t * c->head_dim);
    r->pos = malloc(sizeof(int64_t) * t);
    r->first = malloc(sizeof(int64_t) * t);
    r->gend = malloc(sizeof(int64_t) * t);
    r->key_hi = malloc(sizeof(int64_t) * t);
    r->seq = malloc(sizeof(int32_t) * t);
    r->tile_lo = malloc(sizeof(int64_t) * G3_ATTN_QTILE);
    r->tile_hi = malloc(sizeof(int64_t) * G3_ATTN_QTILE);
    r->scores = malloc(sizeof(float) * (size_t)threads * 2 * (size_t)keys);
    r->fa_stride = fa_stride(c);
    r->fa_work = malloc(sizeof(float) * (size_t)threads * (size_t)r->fa_stride);
    r->fa_part = malloc(sizeof(float) * fa_part_floats(c, tokens));
    r->fa_lo = malloc(sizeof(int64_t) * t);
    r->fa_hi = malloc(sizeof(int64_t) * t);
    if (r->gather_keys) {
        r->kv = malloc(sizeof(float) * 2 * (size_t)r->gather_keys * kvw);
        r->S = malloc(sizeof(float) * qt * (size_t)r->gather_keys);
    }
    for (int64_t i = 0; i < c->n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        const g3_weight *ws[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t j = 0; j < sizeof ws / sizeof ws[0]; j++)
            g3_matmul_ws_need(&r->mm, ws[j], tokens, threads);
    }
    g3_matmul_ws_need(&r->mm, &m->output, tokens, threads);
    g3_status st = g3_matmul_ws_alloc(&r->mm, err);
    if (!st && (!r->x || !r->h || !r->q || !r->z || !r->k || !r->v || !r->g || !r->u ||
                !r->rope_local || !r->rope_global || !r->pos || !r->first || !r->gend ||
                !r->key_hi || !r->seq || !r->tile_lo || !r->tile_hi || !r->scores ||
                !r->fa_work || !r->fa_part || !r->fa_lo || !r->fa_hi ||
                (r->gather_keys && (!r->kv || !r->S))))
        st = g3_fail(err, G3_ERR_NOMEM,
                     "out of memory for the run state of %lld tokens over %lld keys (%zu bytes)",
                     (long long)tokens, (long long)keys, run_bytes(r, c));
    if (st) {
        g3_run_free(r); /* the old state, and so the model, is untouched */
        return st;
    }
    g3_run_free(m->run);
    m->run = r;
    return G3_OK;
}

g3_status g3_run_reserve_default(g3_model *m, g3_err *err)
{
    const int64_t max_seq = m->cfg.max_seq;
    return g3_run_reserve(m, max_seq < G3_RUN_TOKENS ? max_seq : G3_RUN_TOKENS,
                          max_seq < G3_RUN_KEYS ? max_seq : G3_RUN_KEYS, g3_get_threads(), err);
}
