/* model.c — model lifetime, weight checks and the KV cache (layout documented in model.h). */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/ops.h"
#include "model/roles.h"
#include "model/run.h"
#include "quant/packed.h"

g3_status g3_model_create(const g3_config *cfg, const uint8_t *is_global, g3_model **out,
                          g3_err *err)
{
    *out = NULL;
    if (cfg->n_layer < 1 || cfg->n_embd < 1 || cfg->n_head < 1 || cfg->n_head_kv < 1 ||
        cfg->head_dim < 2 || cfg->head_dim % 2 || cfg->n_ff < 1 || cfg->n_vocab < 1 ||
        cfg->max_seq < 1 || cfg->window < 0)
        return g3_fail(err, G3_ERR_FORMAT,
                       "invalid model configuration (layers %lld, width %lld, heads %lld/%lld, "
                       "head_dim %lld, ffn %lld, vocab %lld, max_seq %lld, window %lld)",
                       (long long)cfg->n_layer, (long long)cfg->n_embd, (long long)cfg->n_head,
                       (long long)cfg->n_head_kv, (long long)cfg->head_dim, (long long)cfg->n_ff,
                       (long long)cfg->n_vocab, (long long)cfg->max_seq, (long long)cfg->window);
    if (cfg->n_head % cfg->n_head_kv)
        return g3_fail(err, G3_ERR_FORMAT,
                       "attention heads (%lld) must be a multiple of key/value heads (%lld)",
                       (long long)cfg->n_head, (long long)cfg->n_head_kv);
    /* the floats have no defaults here (gemma3/config.py decides them): only what makes the
     * forward pass meaningless is refused */
    if (!(cfg->eps >= 0) || !(cfg->attn_scale > 0) || !(cfg->embd_scale > 0) ||
        !(cfg->final_softcap >= 0) || !(cfg->rope_base_global > 0) ||
        !(cfg->rope_scale_global > 0) || !(cfg->rope_base_local > 0) ||
        !(cfg->rope_scale_local > 0))
        return g3_fail(err, G3_ERR_FORMAT,
                       "invalid model configuration (eps %g, attn_scale %g, embd_scale %g, "
                       "final_softcap %g, rope global base %g scale %g, local base %g scale %g)",
                       cfg->eps, cfg->attn_scale, cfg->embd_scale, cfg->final_softcap,
                       cfg->rope_base_global, cfg->rope_scale_global, cfg->rope_base_local,
                       cfg->rope_scale_local);
    g3_model *m = calloc(1, sizeof *m);
    if (!m)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    m->cfg = *cfg;
    m->layers = calloc((size_t)cfg->n_layer, sizeof *m->layers);
    m->inv_freq_global = malloc(sizeof(float) * (size_t)(cfg->head_dim / 2));
    m->inv_freq_local = malloc(sizeof(float) * (size_t)(cfg->head_dim / 2));
    if (!m->layers || !m->inv_freq_global || !m->inv_freq_local) {
        g3_model_free(m);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }
    for (int64_t i = 0; i < cfg->n_layer; i++)
        m->layers[i].is_global = cfg->window == 0 || is_global[i];
    m->kv_type = G3_TYPE_F32;
    m->kv_head_bytes = sizeof(float) * (size_t)cfg->head_dim;
    g3_rope_inv_freq(m->inv_freq_global, cfg->head_dim, cfg->rope_base_global,
                     cfg->rope_scale_global);
    g3_rope_inv_freq(m->inv_freq_local, cfg->head_dim, cfg->rope_base_local,
                     cfg->rope_scale_local);
    *out = m;
    return G3_OK;
}

/* Every role of the table (model/roles.c) bound, with its expected shape. */
g3_status g3_model_check(const g3_model *m, g3_err *err)
{
    int64_t dims[G3_DIM_N];
    g3_text_dims(&m->cfg, dims);
    return g3_roles_check(&g3_text_roles, dims, (void *)m, m->layers, sizeof *m->layers,
                          m->cfg.n_layer, err);
}

static void seq_free(const g3_model *m, g3_seq *q)
{
    if (q->k)
        for (int64_t i = 0; i < m->cfg.n_layer; i++)
            free(q->k[i]);
    if (q->v)
        for (int64_t i = 0; i < m->cfg.n_layer; i++)
            free(q->v[i]);
    free(q->k);
    free(q->v);
    memset(q, 0, sizeof *q);
}

static g3_status seq_alloc(const g3_model *m, g3_seq *q, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const size_t row = (size_t)c->n_head_kv * m->kv_head_bytes;
    memset(q, 0, sizeof *q);
    q->k = calloc((size_t)c->n_layer, sizeof *q->k);
    q->v = calloc((size_t)c->n_layer, sizeof *q->v);
    if (!q->k || !q->v)
        goto nomem;
    for (int64_t i = 0; i < c->n_layer; i++) {
        /* calloc: pages are touched only as positions are written */
        q->k[i] = calloc((size_t)m->layers[i].n_slots, row);
        q->v[i] = calloc((size_t)m->layers[i].n_slots, row);
        if (!q->k[i] || !q->v[i])
            goto nomem;
    }
    return G3_OK;
nomem:
    seq_free(m, q);
    return g3_fail(err, G3_ERR_NOMEM,
                   "cannot allocate a KV cache of %zu bytes; lower max_seq_len",
                   g3_model_cache_bytes(m));
}

g3_status g3_model_set_n_seq(g3_model *m, int n, g3_err *err)
{
    if (n < 1 || n > 4096)
        return g3_fail(err, G3_ERR_ARG, "the number of sequences must be 1..4096, got %d", n);
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        g3_layer *L = &m->layers[i];
        const g3_config *c = &m->cfg;
        L->n_slots = L->is_global ? c->max_seq : g3_model_ring_slots(c);
    }
    if (n < m->n_seq) {
        for (int s = n; s < m->n_seq; s++)
            seq_free(m, &m->seqs[s]);
        m->n_seq = n;
        return G3_OK;
    }
    g3_seq *grown = realloc(m->seqs, sizeof *grown * (size_t)n);
    if (!grown)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    m->seqs = grown;
    for (int s = m->n_seq; s < n; s++) {
        g3_status st = seq_alloc(m, &m->seqs[s], err);
        if (st)
            return st;
        m->n_seq = s + 1;
    }
    return G3_OK;
}

int64_t g3_model_ring_slots(const g3_config *c)
{
    const int64_t n = c->window + G3_KV_RING_MARGIN;
    return n < c->max_seq ? n : c->max_seq;
}

size_t g3_kv_cache_bytes(const g3_config *c, const uint8_t *is_global, int type)
{
    if (!g3_kv_type_ok(type, c->head_dim))
        return 0;
    const size_t head = g3_row_size(type, c->head_dim);
    size_t total = 0;
    for (int64_t i = 0; i < c->n_layer; i++) {
        const int glob = c->window == 0 || is_global[i];
        int64_t slots = glob ? c->max_seq : g3_model_ring_slots(c);
        total += 2 * head * (size_t)slots * (size_t)c->n_head_kv;
    }
    return total;
}

size_t g3_model_cache_bytes(const g3_model *m)
{
    const g3_config *c = &m->cfg;
    size_t total = 0;
    for (int64_t i = 0; i < c->n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        int64_t slots = L->is_global ? c->max_seq : g3_model_ring_slots(c);
        total += 2 * m->kv_head_bytes * (size_t)slots * (size_t)c->n_head_kv;
    }
    return total;
}

g3_status g3_model_set_kv_type(g3_model *m, int type, g3_err *err)
{
    if (!g3_kv_type_ok(type, m->cfg.head_dim))
        return g3_fail(err, G3_ERR_ARG,
                       "a KV cache cannot be stored as type %d with head_dim %lld (f32, f16 and "
                       "bf16 always; q8_0 needs head_dim divisible by 32)",
                       type, (long long)m->cfg.head_dim);
    if (type == m->kv_type)
        return G3_OK;
    const int n = m->n_seq;
    for (int s = 0; s < m->n_seq; s++)
        seq_free(m, &m->seqs[s]);
    m->n_seq = 0;
    m->kv_type = type;
    m->kv_head_bytes = g3_row_size(type, m->cfg.head_dim);
    return n ? g3_model_set_n_seq(m, n, err) : G3_OK;
}

g3_status g3_model_copy_seq(g3_model *m, int src, int dst, g3_err *err)
{
    if (src < 0 || src >= m->n_seq || dst < 0 || dst >= m->n_seq)
        return g3_fail(err, G3_ERR_ARG, "sequences %d and %d must be in 0..%d", src, dst,
                       m->n_seq - 1);
    if (src == dst)
        return G3_OK;
    const g3_seq *a = &m->seqs[src];
    g3_seq *b = &m->seqs[dst];
    const size_t row = (size_t)m->cfg.n_head_kv * m->kv_head_bytes;
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        int64_t used = a->n_past < m->layers[i].n_slots ? a->n_past : m->layers[i].n_slots;
        memcpy(b->k[i], a->k[i], (size_t)used * row);
        memcpy(b->v[i], a->v[i], (size_t)used * row);
    }
    b->n_past = a->n_past;
    return G3_OK;
}

void g3_model_reset(g3_model *m, int seq)
{
    for (int s = 0; s < m->n_seq; s++)
        if (seq < 0 || s == seq)
            m->seqs[s].n_past = 0;
}

int g3_model_truncate(g3_model *m, int seq, int64_t n)
{
    if (seq < 0 || seq >= m->n_seq)
        return 0;
    g3_seq *q = &m->seqs[seq];
    if (n < 0 || n > q->n_past)
        return 0;
    /* a ring of S slots holds positions n_past - S .. n_past - 1; a query at position n reads
     * n - W + 1 .. n - 1 (W = window), so the cut is safe when n - W + 1 >= n_past - S (or
     * nothing has wrapped yet): with S = W + margin, any n >= n_past - 1 - margin */
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        const g3_layer *L = &m->layers[i];
        const int64_t need = n - m->cfg.window + 1 > 0 ? n - m->cfg.window + 1 : 0;
        if (!L->is_global && q->n_past > L->n_slots && need < q->n_past - L->n_slots)
            return 0;
    }
    q->n_past = n;
    return 1;
}

void g3_model_free(g3_model *m)
{
    if (!m)
        return;
    g3_model_set_lora(m, NULL, 0, NULL); /* frees the deltas (before the layers they hang on) */
    for (int s = 0; s < m->n_seq; s++)
        seq_free(m, &m->seqs[s]);
    free(m->seqs);
    for (int i = 0; i < m->n_packs; i++)
        g3_packed_free(m->packs[i]);
    free(m->packs);
    free(m->layers);
    free(m->inv_freq_global);
    free(m->inv_freq_local);
    g3_run_free(m->run);
    free(m);
}

void g3_model_set_prefill_digits(g3_model *m, int digits)
{
    const int d = digits == 1 || digits == 2 ? digits : 0; /* 0: the default, 24 bits */
    for (int64_t i = 0; i < m->cfg.n_layer; i++) {
        g3_layer *L = &m->layers[i];
        g3_weight *lw[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int j = 0; j < 7; j++)
            lw[j]->prefill_digits = d;
    }
    m->output.prefill_digits = d;
}

g3_status g3_model_pack(g3_model *m, size_t *bytes, g3_err *err)
{
    *bytes = 0;
    if (m->packs)
        return G3_OK;
    const int64_t n = 7 * m->cfg.n_layer + 1;
    m->packs = calloc((size_t)n, sizeof *m->packs);
    if (!m->packs)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i <= m->cfg.n_layer; i++) {
        g3_layer *L = i < m->cfg.n_layer ? &m->layers[i] : NULL;
        g3_weight *ws[7] = {&m->output};
        int nw = 1;
        if (L) {
            g3_weight *lw[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            memcpy(ws, lw, sizeof lw);
            nw = 7;
        }
        for (int j = 0; j < nw; j++) {
            g3_weight *w = ws[j];
            if (w->packed || !g3_pack_supported(w->type))
                continue;
            g3_packed *P;
            /* the LM head's row bounds serve greedy decoding (g3_matmul_argmax) */
            g3_status st = g3_pack(w->type, w->data, w->rows, w->cols, w->row_bytes,
                                   g3_get_threads(), w == &m->output, &P, err);
            if (st)
                return st;
            m->packs[m->n_packs++] = P;
            w->packed = P;
            *bytes += (size_t)P->groups * P->group_bytes +
                      (P->row_bound ? sizeof(float) * (size_t)P->rows : 0);
        }
    }
    return G3_OK;
}
