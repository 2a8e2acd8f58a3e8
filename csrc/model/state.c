/* state.c — a sequence's KV state as bytes and its restore (layout, rollback rule: state.h). */
#include "model/state.h"

#include <string.h>

static int64_t kept(const g3_model *m, const g3_layer *L, int64_t n)
{
    if (L->is_global)
        return n;
    const int64_t r = m->cfg.window + G3_KV_RING_MARGIN;
    return n < r ? n : r;
}

size_t g3_state_bytes(const g3_model *m, int64_t n, int rings_only)
{
    const size_t row = m->kv_head_bytes * (size_t)m->cfg.n_head_kv;
    size_t total = 0;
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        if (!(rings_only && L->is_global))
            total += 2 * row * (size_t)kept(m, L, n);
    }
    return total;
}

/* Copies positions [p0, p1) of one layer's cache buffer to (save) or from (load) a contiguous
 * run of rows, splitting where a ring wraps. */
static void copy_rows(const g3_layer *L, uint8_t *cache, uint8_t *rows, int64_t p0, int64_t p1,
                      size_t kvw, int save)
{
    for (int64_t p = p0; p < p1;) {
        const int64_t slot = L->is_global ? p : p % L->n_slots;
        int64_t len = p1 - p;
        if (!L->is_global && slot + len > L->n_slots)
            len = L->n_slots - slot;
        uint8_t *c = cache + (size_t)slot * kvw, *r = rows + (size_t)(p - p0) * kvw;
        memcpy(save ? r : c, save ? c : r, (size_t)len * kvw);
        p += len;
    }
}

static g3_status check_seq(const g3_model *m, int seq, g3_err *err)
{
    if (seq < 0 || seq >= m->n_seq)
        return g3_fail(err, G3_ERR_ARG, "sequence %d is not in 0..%d", seq, m->n_seq - 1);
    return G3_OK;
}

/* Walks the layers copying between the cache of sequence seq and buf (save: cache -> buf). */
static void transfer(const g3_model *m, const g3_seq *q, int64_t n, int rings_only, uint8_t *buf,
                     int save)
{
    const size_t kvw = m->kv_head_bytes * (size_t)m->cfg.n_head_kv;
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        if (rings_only && L->is_global)
            continue;
        const int64_t r = kept(m, L, n);
        copy_rows(L, q->k[i], buf, n - r, n, kvw, save);
        buf += (size_t)r * kvw;
        copy_rows(L, q->v[i], buf, n - r, n, kvw, save);
        buf += (size_t)r * kvw;
    }
}

g3_status g3_state_save(const g3_model *m, int seq, int rings_only, void *dst, size_t size,
                        g3_err *err)
{
    g3_status st = check_seq(m, seq, err);
    if (st)
        return st;
    const g3_seq *q = &m->seqs[seq];
    const size_t need = g3_state_bytes(m, q->n_past, rings_only);
    if (size != need)
        return g3_fail(err, G3_ERR_ARG,
                       "a state of %lld positions is %zu bytes, got a buffer of %zu",
                       (long long)q->n_past, need, size);
    transfer(m, q, q->n_past, rings_only, dst, 1);
    return G3_OK;
}

g3_status g3_state_load(g3_model *m, int seq, int64_t n, int rings_only, const void *src,
                        size_t size, g3_err *err)
{
    g3_status st = check_seq(m, seq, err);
    if (st)
        return st;
    g3_seq *q = &m->seqs[seq];
    if (n < 0 || n > m->cfg.max_seq)
        return g3_fail(err, G3_ERR_ARG,
                       "a state of %lld positions does not fit a cache of %lld (max_seq_len)",
                       (long long)n, (long long)m->cfg.max_seq);
    if (rings_only && n > q->n_past)
        return g3_fail(err, G3_ERR_ARG,
                       "ring checkpoint at position %lld is past the %lld cached positions",
                       (long long)n, (long long)q->n_past);
    const size_t need = g3_state_bytes(m, n, rings_only);
    if (size != need)
        return g3_fail(err, G3_ERR_ARG, "a state of %lld positions is %zu bytes, got %zu",
                       (long long)n, need, size);
    /* cast: the walk is shared with save, which writes the other way */
    transfer(m, q, n, rings_only, (uint8_t *)(uintptr_t)src, 0);
    q->n_past = n;
    return G3_OK;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t fnv_weight(uint64_t h, const g3_weight *w)
{
    int64_t meta[3] = {w->type, w->rows, w->cols};
    h = fnv(h, meta, sizeof meta);
    if (!w->data || w->rows < 1)
        return h;
    const size_t nb = w->row_bytes < 4096 ? w->row_bytes : 4096;
    h = fnv(h, w->data, nb);
    return fnv(h, w->data + (size_t)(w->rows - 1) * w->row_bytes, nb);
}

static uint64_t fnv_norm(uint64_t h, const float *v, int64_t n)
{
    return v ? fnv(h, v, sizeof(float) * (size_t)n) : fnv(h, "-", 1);
}

uint64_t g3_state_fingerprint(const g3_model *m)
{
    const g3_config *c = &m->cfg;
    uint64_t h = 0xcbf29ce484222325ull;
    const int64_t ints[] = {c->n_vocab, c->n_embd, c->n_layer, c->n_head, c->n_head_kv,
                            c->head_dim, c->n_ff, c->window, G3_KV_RING_MARGIN};
    const float floats[] = {c->eps, c->attn_scale, c->embd_scale, c->final_softcap,
                            c->rope_base_global, c->rope_scale_global, c->rope_base_local,
                            c->rope_scale_local};
    h = fnv(h, ints, sizeof ints);
    h = fnv(h, floats, sizeof floats);
    h = fnv_weight(h, &m->tok_embd);
    h = fnv_weight(h, &m->output);
    h = fnv_norm(h, m->output_norm, c->n_embd);
    for (int64_t i = 0; i < c->n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        h = fnv(h, &L->is_global, sizeof L->is_global);
        const g3_weight *ws[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int j = 0; j < 7; j++)
            h = fnv_weight(h, ws[j]);
        h = fnv_norm(h, L->attn_norm, c->n_embd);
        h = fnv_norm(h, L->q_norm, c->head_dim);
        h = fnv_norm(h, L->k_norm, c->head_dim);
        h = fnv_norm(h, L->post_attn_norm, c->n_embd);
        h = fnv_norm(h, L->ffn_norm, c->n_embd);
        h = fnv_norm(h, L->post_ffn_norm, c->n_embd);
    }
    return h;
}
