/* forward.c — the Gemma 3 decoder forward pass for a batch of T tokens (prefill or decode).
 *
 *   x = embed(ids) * sqrt(E)               (image/raw embedding rows are not scaled)
 *   per layer:  h = rms(x)*w_in;  q,k,v = Wq h, Wk h, Wv h;  q,k = rope(rms(q)*w_q, rms(k)*w_k)
 *               a = Wo attn(q, k, v);  x += rms(a)*w_post_attn
 *               h = rms(x)*w_ffn;  x += rms(Wdown (gelu_tanh(Wgate h) * Wup h))*w_post_ffn
 *   logits = W_out rms(x)*w_final           (tied: W_out is the embedding; softcap only if set)
 *
 * Reference: transformers-gemma3.md §2 (eager attention, float32). Local layers see the W most
 * recent positions including their own (0 <= i - j < W); global layers see every earlier one.
 * Tokens of one image (same non-negative group id) also see each other's later positions.
 *
 * Keys for a query are read from the batch's own fresh K/V when their position is in this call,
 * otherwise from the cache; the batch is written into the cache only after the layer's attention,
 * so a ring of W slots suffices even when T > W.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kernels/ops.h"
#include "model/model.h"

g3_profile g3_prof;
const char *const g3_prof_names[G3_PROF_N] = {
    "embed", "norms", "qkv_proj", "qk_norm_rope", "attention", "o_proj", "gate_up_proj", "geglu",
    "down_proj", "lm_head",
};

/* Times a statement into g3_prof when profiling is on (one branch otherwise). */
#define PROF(cat, stmt)                                                                            \
    do {                                                                                           \
        double t0_ = g3_prof.enabled ? omp_get_wtime() : 0.0;                                      \
        stmt;                                                                                      \
        if (g3_prof.enabled)                                                                       \
            g3_prof.seconds[cat] += omp_get_wtime() - t0_;                                         \
    } while (0)

typedef struct {
    float *x, *h, *q, *k, *v, *z, *g, *u, *scores;
    int64_t *key_hi; /* (T) last key position visible to each query (image groups extend it) */
    int64_t *pos;    /* (T) absolute position of each token in its sequence */
    int64_t *first;  /* (T) batch index of the first token of its group */
    int32_t *seq;    /* (T) sequence of each token */
    int64_t *gend;   /* (T) position of the last token of its group */
    int64_t max_keys; /* longest key range of any token */
    int single;       /* every token belongs to one sequence */
    float *rope_local, *rope_global; /* (T, head_dim) cos|sin of each token's position */
} scratch;

static void scratch_free(scratch *s)
{
    free(s->x);
    free(s->h);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->z);
    free(s->g);
    free(s->u);
    free(s->scores);
    free(s->key_hi);
    free(s->pos);
    free(s->first);
    free(s->seq);
    free(s->gend);
    free(s->rope_local);
    free(s->rope_global);
}

static g3_status scratch_alloc(scratch *s, const g3_config *c, int64_t T, int64_t max_keys,
                               int nt, g3_err *err)
{
    const size_t t = (size_t)T;
    memset(s, 0, sizeof *s);
    s->x = malloc(sizeof(float) * t * c->n_embd);
    s->h = malloc(sizeof(float) * t * c->n_embd);
    s->q = malloc(sizeof(float) * t * c->n_head * c->head_dim);
    s->k = malloc(sizeof(float) * t * c->n_head_kv * c->head_dim);
    s->v = malloc(sizeof(float) * t * c->n_head_kv * c->head_dim);
    s->z = malloc(sizeof(float) * t * c->n_head * c->head_dim);
    s->g = malloc(sizeof(float) * t * c->n_ff);
    s->u = malloc(sizeof(float) * t * c->n_ff);
    s->scores = malloc(sizeof(float) * (size_t)nt * (size_t)max_keys * 2); /* scores + raw copy */
    s->key_hi = malloc(sizeof(int64_t) * t);
    s->pos = malloc(sizeof(int64_t) * t);
    s->first = malloc(sizeof(int64_t) * t);
    s->seq = malloc(sizeof(int32_t) * t);
    s->gend = malloc(sizeof(int64_t) * t);
    s->rope_local = malloc(sizeof(float) * t * c->head_dim);
    s->rope_global = malloc(sizeof(float) * t * c->head_dim);
    s->max_keys = max_keys;
    if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->z || !s->g || !s->u || !s->scores ||
        !s->key_hi || !s->pos || !s->first || !s->seq || !s->gend || !s->rope_local ||
        !s->rope_global) {
        scratch_free(s);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for a %lld-token forward pass",
                       (long long)T);
    }
    return G3_OK;
}

/* Key or value row of kv-head g at absolute position pos of a sequence whose cache holds
 * n_past positions; fresh points at the batch rows of that sequence (see the file comment). */
static inline const float *kv_row(const g3_layer *L, const float *cache, const float *fresh,
                                  int64_t n_past, int64_t pos, int64_t g, int64_t kvw,
                                  int64_t hd)
{
    if (pos >= n_past)
        return fresh + (pos - n_past) * kvw + g * hd;
    int64_t slot = L->is_global ? pos : pos % L->n_slots;
    return cache + slot * kvw + g * hd;
}

/* Records one query row's scores/probabilities over all key positions (0 outside [lo, hi]). */
static void capture_row(const g3_layer_capture *cap, int64_t h, int64_t t, int64_t n_keys,
                        int64_t lo, int64_t hi, const float *raw, const float *prob)
{
    if (t < cap->q0 || t >= cap->q1)
        return;
    for (int64_t s = 0; s < cap->n_heads_sel; s++) {
        if (cap->heads[s] != h)
            continue;
        size_t row = ((size_t)s * (cap->q1 - cap->q0) + (t - cap->q0)) * n_keys;
        for (int64_t j = 0; j < n_keys; j++) {
            int in = j >= lo && j <= hi;
            if (cap->pattern)
                cap->pattern[row + j] = in ? prob[j - lo] : 0.0f;
            if (cap->scores)
                cap->scores[row + j] = in ? raw[j - lo] : -INFINITY;
        }
    }
}

static void attention(const g3_model *m, int64_t il, scratch *s, int64_t T, int nt,
                      const g3_layer_capture *cap)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t hd = c->head_dim, kvw = c->n_head_kv * hd, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv, max_keys = s->max_keys;
    const int want = cap && (cap->pattern || cap->scores) && cap->n_heads_sel > 0;
#pragma omp parallel for collapse(2) num_threads(nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < c->n_head; h++) {
            /* each thread's slice holds the scores, then (when capturing) a raw copy */
            float *sc = s->scores + (size_t)omp_get_thread_num() * max_keys * 2;
            const g3_seq *sq = &m->seqs[s->seq[t]];
            const int64_t p = s->pos[t], g = h / rep, n_past = sq->n_past;
            const float *fk = s->k + s->first[t] * kvw, *fv = s->v + s->first[t] * kvw;
            int64_t lo = 0, hi = s->key_hi[t];
            if (!L->is_global && p - c->window + 1 > 0)
                lo = p - c->window + 1;
            const float *q = s->q + t * qw + h * hd;
            for (int64_t j = lo; j <= hi; j++)
                sc[j - lo] = g3_dot_f32(q, kv_row(L, sq->k[il], fk, n_past, j, g, kvw, hd), hd) *
                             c->attn_scale;
            float *raw = NULL;
            if (want) {
                raw = sc + max_keys;
                memcpy(raw, sc, sizeof(float) * (hi - lo + 1));
            }
            g3_softmax_f32(sc, hi - lo + 1);
            if (want)
                capture_row(cap, h, t, n_past + T, lo, hi, raw, sc);
            float *z = s->z + t * qw + h * hd;
            memset(z, 0, sizeof(float) * hd);
            for (int64_t j = lo; j <= hi; j++)
                g3_axpy_f32(sc[j - lo], kv_row(L, sq->v[il], fv, n_past, j, g, kvw, hd), z, hd);
        }
}

#define G3_ATTN_BLAS_MIN 32 /* queries of one sequence from which attention uses sgemm */
#define G3_ATTN_QTILE 128   /* query rows per sgemm tile (bounds the score buffer) */

/* Attention of a single-sequence chunk through sgemm: the keys/values the chunk can see are
 * gathered into contiguous (n_keys, kvw) buffers (cache part unrolled in position order, then the
 * fresh rows), then per head and query tile S = Q K^T (sgemm), mask + softmax per row (OpenMP),
 * Z = P V (sgemm). BLAS is called outside OpenMP regions. Same math as attention(). */
static g3_status attention_blas(const g3_model *m, int64_t il, scratch *s, int64_t T, int nt,
                                const g3_layer_capture *cap, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const g3_seq *sq = &m->seqs[s->seq[0]];
    const int64_t hd = c->head_dim, kvw = c->n_head_kv * hd, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv, n_past = sq->n_past, p0 = s->pos[0];
    /* first key any query of the chunk can see */
    int64_t k0 = 0;
    if (!L->is_global && p0 - c->window + 1 > 0)
        k0 = p0 - c->window + 1;
    const int64_t nk = n_past + T - k0;
    const int64_t qt = T < G3_ATTN_QTILE ? T : G3_ATTN_QTILE;
    const int want = cap && (cap->pattern || cap->scores) && cap->n_heads_sel > 0;
    float *K = malloc(sizeof(float) * (size_t)(nk * kvw * 2));
    float *S = malloc(sizeof(float) * (size_t)(qt * nk));
    float *raw_all = want ? malloc(sizeof(float) * (size_t)(nt * nk)) : NULL; /* per thread */
    if (!K || !S || (want && !raw_all)) {
        free(K);
        free(S);
        free(raw_all);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for attention over %lld keys",
                       (long long)nk);
    }
    float *V = K + nk * kvw;
    for (int64_t j = k0; j < n_past + T; j++) {
        memcpy(K + (j - k0) * kvw, kv_row(L, sq->k[il], s->k, n_past, j, 0, kvw, hd),
               sizeof(float) * kvw);
        memcpy(V + (j - k0) * kvw, kv_row(L, sq->v[il], s->v, n_past, j, 0, kvw, hd),
               sizeof(float) * kvw);
    }
    for (int64_t h = 0; h < c->n_head; h++) {
        const int64_t g = h / rep;
        for (int64_t t0 = 0; t0 < T; t0 += qt) {
            const int64_t nq = t0 + qt < T ? qt : T - t0;
            int64_t ncol = 0; /* keys past the tile's last visible one are never computed */
            for (int64_t t = t0; t < t0 + nq; t++)
                ncol = s->key_hi[t] - k0 + 1 > ncol ? s->key_hi[t] - k0 + 1 : ncol;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)ncol, (int)hd,
                        c->attn_scale, s->q + t0 * qw + h * hd, (int)qw, K + g * hd, (int)kvw,
                        0.0f, S, (int)nk);
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t r = 0; r < nq; r++) {
                const int64_t t = t0 + r, p = s->pos[t];
                int64_t lo = 0, hi = s->key_hi[t];
                if (!L->is_global && p - c->window + 1 > 0)
                    lo = p - c->window + 1;
                float *row = S + r * nk;
                float *vis = row + (lo - k0);
                const int64_t n = hi - lo + 1;
                float *raw = NULL;
                if (want) { /* the scores before softmax, for hook_attn_scores */
                    raw = raw_all + (size_t)omp_get_thread_num() * nk;
                    memcpy(raw, vis, sizeof(float) * n);
                }
                g3_softmax_f32(vis, n);
                if (want)
                    capture_row(cap, h, t, n_past + T, lo, hi, raw, vis);
                for (int64_t j = 0; j < lo - k0; j++)
                    row[j] = 0.0f;
                for (int64_t j = hi - k0 + 1; j < ncol; j++)
                    row[j] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)hd, (int)ncol,
                        1.0f, S, (int)nk, V + g * hd, (int)kvw, 0.0f, s->z + t0 * qw + h * hd,
                        (int)qw);
        }
    }
    free(K);
    free(S);
    free(raw_all);
    return G3_OK;
}

static void store_kv(const g3_model *m, int64_t il, const scratch *s, int64_t T)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t kvw = c->n_head_kv * c->head_dim;
    for (int64_t t = 0; t < T; t++) {
        const g3_seq *sq = &m->seqs[s->seq[t]];
        const int64_t pos = s->pos[t];
        if (!L->is_global && s->gend[t] - pos >= L->n_slots)
            continue; /* overwritten later in this same call: in a ring only the last survive */
        int64_t slot = L->is_global ? pos : pos % L->n_slots;
        memcpy(sq->k[il] + slot * kvw, s->k + t * kvw, sizeof(float) * kvw);
        memcpy(sq->v[il] + slot * kvw, s->v + t * kvw, sizeof(float) * kvw);
    }
}

/* q/k RMSNorm per head, then RoPE with the layer kind's frequencies. */
static void qk_norm_rope(const g3_model *m, const g3_layer *L, scratch *s, int64_t T, int nt)
{
    const g3_config *c = &m->cfg;
    const int64_t hd = c->head_dim;
    const float *tab = L->is_global ? s->rope_global : s->rope_local; /* (T, hd) */
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = tab + t * hd;
        for (int64_t h = 0; h < c->n_head; h++) {
            float *q = s->q + (t * c->n_head + h) * hd;
            g3_rmsnorm_f32(q, L->q_norm, q, hd, c->eps);
            g3_rope_apply_f32(q, hd, cs);
        }
        for (int64_t h = 0; h < c->n_head_kv; h++) {
            float *k = s->k + (t * c->n_head_kv + h) * hd;
            g3_rmsnorm_f32(k, L->k_norm, k, hd, c->eps);
            g3_rope_apply_f32(k, hd, cs);
        }
    }
}

/* x += rms(y) * w, row by row */
static void add_normed(float *x, float *y, const float *w, int64_t T, int64_t n, float eps,
                       int nt)
{
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        g3_rmsnorm_f32(y + t * n, w, y + t * n, n, eps);
        for (int64_t i = 0; i < n; i++)
            x[t * n + i] += y[t * n + i];
    }
}

static void norm_rows(const float *x, const float *w, float *y, int64_t T, int64_t n, float eps,
                      int nt)
{
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++)
        g3_rmsnorm_f32(x + t * n, w, y + t * n, n, eps);
}

static void save(float *dst, const float *src, int64_t n)
{
    if (dst)
        memcpy(dst, src, sizeof(float) * (size_t)n);
}

/* g = gelu(g) * u over n values, flat so a single decoded token still uses every thread */
static void geglu_rows(float *g, const float *u, int64_t n, int nt)
{
    const int64_t chunk = 512;
#pragma omp parallel for num_threads(nt) if(n > 8192) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += chunk)
        g3_geglu_f32(g + i0, u + i0, g + i0, i0 + chunk < n ? chunk : n - i0);
}

static g3_status layer_forward(g3_model *m, int64_t il, scratch *s, int64_t T, int nt,
                               const g3_layer_capture *cap, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t E = c->n_embd, F = c->n_ff;
    const int64_t nq = T * c->n_head * c->head_dim, nkv = T * c->n_head_kv * c->head_dim;
    g3_status st = G3_OK;
    if (cap)
        save(cap->resid_pre, s->x, T * E);
    PROF(G3_PROF_NORM, norm_rows(s->x, L->attn_norm, s->h, T, E, c->eps, nt));
    const g3_weight *qkv[3] = {&L->q, &L->k, &L->v};
    float *qkv_out[3] = {s->q, s->k, s->v};
    PROF(G3_PROF_QKV, st = g3_matmul_multi(3, qkv, s->h, T, qkv_out, err));
    if (st)
        return st;
    PROF(G3_PROF_ROPE, qk_norm_rope(m, L, s, T, nt));
    if (s->single && T >= G3_ATTN_BLAS_MIN)
        PROF(G3_PROF_ATTN, st = attention_blas(m, il, s, T, nt, cap, err));
    else
        PROF(G3_PROF_ATTN, attention(m, il, s, T, nt, cap));
    if (st)
        return st;
    PROF(G3_PROF_ATTN, store_kv(m, il, s, T));
    if (cap) {
        save(cap->q, s->q, nq);
        save(cap->k, s->k, nkv);
        save(cap->v, s->v, nkv);
        save(cap->z, s->z, nq);
    }
    PROF(G3_PROF_OPROJ, st = g3_matmul(&L->o, s->z, T, s->h, err));
    if (st)
        return st;
    PROF(G3_PROF_NORM, add_normed(s->x, s->h, L->post_attn_norm, T, E, c->eps, nt));
    if (cap) {
        save(cap->attn_out, s->h, T * E);
        save(cap->resid_mid, s->x, T * E);
    }
    PROF(G3_PROF_NORM, norm_rows(s->x, L->ffn_norm, s->h, T, E, c->eps, nt));
    const g3_weight *gu[2] = {&L->gate, &L->up};
    float *gu_out[2] = {s->g, s->u};
    PROF(G3_PROF_GATE_UP, st = g3_matmul_multi(2, gu, s->h, T, gu_out, err));
    if (st)
        return st;
    PROF(G3_PROF_GEGLU, geglu_rows(s->g, s->u, T * F, nt));
    PROF(G3_PROF_DOWN, st = g3_matmul(&L->down, s->g, T, s->h, err));
    if (st)
        return st;
    PROF(G3_PROF_NORM, add_normed(s->x, s->h, L->post_ffn_norm, T, E, c->eps, nt));
    if (cap) {
        save(cap->mlp_out, s->h, T * E);
        save(cap->resid_post, s->x, T * E);
    }
    return G3_OK;
}

/* The input rules of feeding n tokens to a sequence holding n_past positions, decided here for
 * every caller: the positions fit (n_past + n <= max_seq_len) and every token id that is not
 * replaced by an embedding (mask[t] != 0; mask may be NULL) lies in the vocabulary. check_batch
 * applies it to each group of every call (C trusts no caller); gemma3/engine.py calls it once on
 * a whole prompt, through _core.Model.check_feed, before feeding it in several calls. */
g3_status g3_model_check_tokens(const g3_model *m, int64_t n_past, const int32_t *ids,
                                const uint8_t *mask, int64_t n, g3_err *err)
{
    const g3_config *c = &m->cfg;
    if (n_past < 0 || n < 0 || n > c->max_seq - n_past)
        return g3_fail(err, G3_ERR_ARG,
                       "context overflow: %lld positions are cached and %lld more were given, "
                       "but max_seq_len is %lld",
                       (long long)n_past, (long long)n, (long long)c->max_seq);
    for (int64_t t = 0; t < n; t++) {
        if (mask && mask[t])
            continue;
        if (ids[t] < 0 || ids[t] >= c->n_vocab)
            return g3_fail(err, G3_ERR_ARG,
                           "token id %d at index %lld is out of range for a vocabulary of %lld",
                           ids[t], (long long)t, (long long)c->n_vocab);
    }
    return G3_OK;
}

static g3_status check_batch(const g3_model *m, const g3_batch *b, g3_err *err)
{
    if (b->n_tokens < 1)
        return g3_fail(err, G3_ERR_ARG, "a forward pass needs at least one token");
    const int64_t ng = b->group_len ? b->n_groups : 1;
    if (ng < 1 || (b->group_len && !b->group_seq))
        return g3_fail(err, G3_ERR_ARG, "a batch needs at least one group");
    if (b->capture && ng != 1)
        return g3_fail(err, G3_ERR_ARG, "capture works on single-sequence calls only");
    const uint8_t *mask = b->embd ? b->embd_mask : NULL;
    int64_t total = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int32_t sq = b->group_seq ? b->group_seq[g] : 0;
        const int64_t len = b->group_len ? b->group_len[g] : b->n_tokens;
        if (sq < 0 || sq >= m->n_seq)
            return g3_fail(err, G3_ERR_ARG, "sequence %d does not exist (%d allocated)", sq,
                           m->n_seq);
        for (int64_t h = 0; h < g; h++)
            if (b->group_seq[h] == sq)
                return g3_fail(err, G3_ERR_ARG, "sequence %d appears twice in one batch", sq);
        if (len < 1)
            return g3_fail(err, G3_ERR_ARG, "group %lld is empty", (long long)g);
        if (len > b->n_tokens - total)
            return g3_fail(err, G3_ERR_ARG, "group lengths exceed the %lld tokens given",
                           (long long)b->n_tokens);
        g3_status st = g3_model_check_tokens(m, m->seqs[sq].n_past, b->ids + total,
                                             mask ? mask + total : NULL, len, err);
        if (st)
            return st;
        total += len;
    }
    if (total != b->n_tokens)
        return g3_fail(err, G3_ERR_ARG, "group lengths add up to %lld, not %lld tokens",
                       (long long)total, (long long)b->n_tokens);
    return G3_OK;
}

/* Per-token sequence, position, group start and last visible key. */
static void plan_tokens(const g3_model *m, const g3_batch *b, scratch *s)
{
    const int64_t ng = b->group_len ? b->n_groups : 1, T = b->n_tokens;
    int64_t t = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int32_t sq = b->group_seq ? b->group_seq[g] : 0;
        const int64_t len = b->group_len ? b->group_len[g] : T, start = t;
        for (int64_t i = 0; i < len; i++, t++) {
            s->seq[t] = sq;
            s->first[t] = start;
            s->pos[t] = m->seqs[sq].n_past + i;
        }
    }
    for (t = T - 1; t >= 0; t--)
        s->gend[t] = t + 1 < T && s->first[t + 1] == s->first[t] ? s->gend[t + 1] : s->pos[t];
    /* a run of tokens with the same non-zero embd_mask value is one image: bidirectional */
    for (t = T - 1; t >= 0; t--) {
        int in_img = b->embd && b->embd_mask && b->embd_mask[t];
        int next_same = t + 1 < T && in_img && s->first[t + 1] == s->first[t] &&
                        b->embd_mask[t + 1] == b->embd_mask[t];
        s->key_hi[t] = next_same ? s->key_hi[t + 1] : s->pos[t];
    }
}

g3_status g3_model_forward(g3_model *m, const g3_batch *b, g3_err *err)
{
    const g3_config *c = &m->cfg;
    g3_status st = check_batch(m, b, err);
    if (st)
        return st;
    const int64_t T = b->n_tokens, E = c->n_embd, ng = b->group_len ? b->n_groups : 1;
    const int nt = g3_get_threads();
    int64_t max_keys = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int32_t sq = b->group_seq ? b->group_seq[g] : 0;
        int64_t k = m->seqs[sq].n_past + (b->group_len ? b->group_len[g] : T);
        max_keys = k > max_keys ? k : max_keys;
    }
    scratch s;
    if ((st = scratch_alloc(&s, c, T, max_keys, nt, err)))
        return st;
    plan_tokens(m, b, &s);
    s.single = ng == 1;
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        g3_rope_table(s.rope_local + t * c->head_dim, c->head_dim, s.pos[t], m->inv_freq_local);
        g3_rope_table(s.rope_global + t * c->head_dim, c->head_dim, s.pos[t], m->inv_freq_global);
    }

    double t_embed = g3_prof.enabled ? omp_get_wtime() : 0.0;
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *x = s.x + t * E;
        if (b->embd && b->embd_mask && b->embd_mask[t]) {
            memcpy(x, b->embd + t * E, sizeof(float) * E);
        } else {
            g3_weight_row(&m->tok_embd, b->ids[t], x);
            for (int64_t i = 0; i < E; i++)
                x[i] *= c->embd_scale;
        }
    }
    if (g3_prof.enabled) {
        g3_prof.seconds[G3_PROF_EMBED] += omp_get_wtime() - t_embed;
        g3_prof.forwards++;
        g3_prof.tokens += T;
    }
    const g3_capture *cap = b->capture;
    for (int64_t i = 0; i < c->n_layer && !st; i++)
        st = layer_forward(m, i, &s, T, nt, cap && cap->layers ? &cap->layers[i] : NULL, err);
    if (!st && cap && cap->final_norm)
        norm_rows(s.x, m->output_norm, cap->final_norm, T, E, c->eps, nt);
    if (!st && b->logits_mode) {
        int64_t n = T;
        if (b->logits_mode == 1) { /* the last token of every group */
            n = 0;
            for (int64_t t = 0; t < T; t++)
                if (t + 1 == T || s.first[t + 1] != s.first[t])
                    memcpy(s.x + (n++) * E, s.x + t * E, sizeof(float) * E);
        }
        PROF(G3_PROF_LM_HEAD, norm_rows(s.x, m->output_norm, s.h, n, E, c->eps, nt);
             st = g3_matmul(&m->output, s.h, n, b->logits, err));
        if (!st && c->final_softcap > 0) {
            const float cap_v = c->final_softcap;
            for (int64_t i = 0; i < n * c->n_vocab; i++)
                b->logits[i] = cap_v * tanhf(b->logits[i] / cap_v);
        }
    }
    if (!st) {
        for (int64_t g = 0; g < ng; g++)
            m->seqs[b->group_seq ? b->group_seq[g] : 0].n_past +=
                b->group_len ? b->group_len[g] : T;
    } else if (st == G3_ERR_NOMEM) {
        /* a layer may have written part of this batch into the local rings, overwriting
         * positions the cached context still needs: start over rather than compute garbage */
        for (int64_t g = 0; g < ng; g++)
            g3_model_reset(m, b->group_seq ? b->group_seq[g] : 0);
        size_t len = strlen(err->msg);
        snprintf(err->msg + len, sizeof err->msg - len, " (the KV cache was cleared)");
    }
    scratch_free(&s);
    return st;
}
