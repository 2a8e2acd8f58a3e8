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
 *
 * Every buffer is the model's run state (model/run.h), grown if needed before anything else
 * happens: nothing here allocates, so a pass that starts runs to the end and the cache is never
 * left half-written.
 */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/ops.h"
#include "model/hooks.h"
#include "model/model.h"
#include "model/run.h"

const char *const g3_prof_names[G3_PROF_N] = {
    "embed", "norms", "qkv_proj", "qk_norm_rope", "attention", "o_proj", "gate_up_proj", "geglu",
    "down_proj", "lm_head",
};

/* Times a statement into the model's profile when it is on (one branch otherwise). */
#define PROF(cat, stmt)                                                                            \
    do {                                                                                           \
        double t0_ = m->prof.enabled ? omp_get_wtime() : 0.0;                                      \
        stmt;                                                                                      \
        if (m->prof.enabled)                                                                       \
            m->prof.seconds[cat] += omp_get_wtime() - t0_;                                         \
    } while (0)

/* The keys/values of kv head g that a query at positions [lo, hi] reads, as spans in position
 * order: the cached part in the cache's type (global layers: slot = position, one span; local
 * layers: a ring, split where it wraps) then this call's fresh float32 rows of the sequence (see
 * the file comment). With g < 0, whole rows (every head) from head 0. */
static int kv_spans(const g3_model *m, const g3_layer *L, const g3_seq *sq, int64_t il,
                    const float *fk, const float *fv, int64_t lo, int64_t hi, int64_t g,
                    g3_kv_span sp[4])
{
    const int64_t hd = m->cfg.head_dim, kvw = m->cfg.n_head_kv * hd, n_past = sq->n_past;
    const size_t row = (size_t)m->cfg.n_head_kv * m->kv_head_bytes;
    const size_t hoff = g > 0 ? (size_t)g * m->kv_head_bytes : 0;
    const int64_t foff = g > 0 ? g * hd : 0;
    int n = 0;
    const int64_t c_hi = hi < n_past - 1 ? hi : n_past - 1;
    for (int64_t j = lo; j <= c_hi && n < 3;) {
        const int64_t slot = L->is_global ? j : j % L->n_slots;
        int64_t len = c_hi - j + 1;
        if (!L->is_global && slot + len > L->n_slots)
            len = L->n_slots - slot;
        sp[n++] = (g3_kv_span){sq->k[il] + (size_t)slot * row + hoff,
                               sq->v[il] + (size_t)slot * row + hoff, len, m->kv_type, row};
        j += len;
    }
    const int64_t f0 = lo > n_past ? lo : n_past;
    if (f0 <= hi)
        sp[n++] = (g3_kv_span){fk + (f0 - n_past) * kvw + foff, fv + (f0 - n_past) * kvw + foff,
                               hi - f0 + 1, G3_TYPE_F32, sizeof(float) * (size_t)kvw};
    return n;
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

static int wants_pattern(const g3_layer_capture *cap)
{
    return cap && (cap->pattern || cap->scores) && cap->n_heads_sel > 0;
}

/* First key position a query at position p sees in layer L. */
static int64_t first_key(const g3_model *m, const g3_layer *L, int64_t p)
{
    const int64_t lo = p - m->cfg.window + 1;
    return !L->is_global && lo > 0 ? lo : 0;
}

/* Attention query row by query row, scores then mix (the observed form: a capture records every
 * row's probabilities). */
static void attention_rows_observed(const g3_model *m, int64_t il, g3_run *s, int64_t T, int nt,
                                    const g3_layer_capture *cap, int write_z)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t hd = c->head_dim, kvw = c->n_head_kv * hd, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv, keys = s->keys;
    const int want = wants_pattern(cap);
#pragma omp parallel for collapse(2) num_threads(nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < c->n_head; h++) {
            if (!write_z && !(want && t >= cap->q0 && t < cap->q1))
                continue; /* recording only: the rows the capture asked for */
            /* each thread's slice holds the scores, then (when capturing) a raw copy */
            float *sc = s->scores + (size_t)omp_get_thread_num() * keys * 2;
            float *tmp = s->fa_work + (size_t)omp_get_thread_num() * s->fa_stride;
            const g3_seq *sq = &m->seqs[s->seq[t]];
            const int64_t n_past = sq->n_past;
            const float *fk = s->k + s->first[t] * kvw, *fv = s->v + s->first[t] * kvw;
            const int64_t lo = first_key(m, L, s->pos[t]), hi = s->key_hi[t];
            g3_kv_span sp[4];
            const int nsp = kv_spans(m, L, sq, il, fk, fv, lo, hi, h / rep, sp);
            g3_attn_scores(s->q + t * qw + h * hd, hd, sp, nsp, c->attn_scale, sc, tmp);
            float *raw = NULL;
            if (want) {
                raw = sc + keys;
                memcpy(raw, sc, sizeof(float) * (hi - lo + 1));
            }
            g3_softmax_f32(sc, hi - lo + 1);
            if (want)
                capture_row(cap, h, t, n_past + T, lo, hi, raw, sc);
            if (write_z)
                g3_attn_mix(sc, sp, nsp, hd, s->z + t * qw + h * hd, tmp);
        }
}

/* Key chunk of the row form: a query's visible keys are cut into at most G3_FA_PARTS chunks of
 * at least G3_FA_CHUNK keys, merged in order. A function of the query's own key count only (not
 * of the call's size or the thread count), so a row gets the same bits whether it is decoded
 * alone or verified with others (speculative decoding's greedy equality rests on it). */
static int64_t row_chunk(int64_t nvis)
{
    int64_t ch = (nvis + G3_FA_PARTS - 1) / G3_FA_PARTS;
    ch = (ch + G3_FA_BK - 1) / G3_FA_BK * G3_FA_BK;
    return ch > G3_FA_CHUNK ? ch : G3_FA_CHUNK;
}

/* One key chunk of query row t on KV head g: o (rep, hd), m (rep), l (rep). */
static void row_chunk_flash(const g3_model *m, const g3_layer *L, int64_t il, g3_run *s, int64_t t,
                            int64_t g, int64_t ci, float *o, float *mm, float *ll, float *work)
{
    const g3_config *c = &m->cfg;
    const int64_t hd = c->head_dim, kvw = c->n_head_kv * hd, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv;
    const int64_t lo = first_key(m, L, s->pos[t]), hi = s->key_hi[t];
    const int64_t nvis = hi - lo + 1, ch = row_chunk(nvis);
    const g3_seq *sq = &m->seqs[s->seq[t]];
    const float *fk = s->k + s->first[t] * kvw, *fv = s->v + s->first[t] * kvw;
    g3_kv_span sp[4];
    const int nsp = kv_spans(m, L, sq, il, fk, fv, lo, hi, g, sp);
    const int64_t rl = 0, rh = nvis - 1;
    const int64_t j1 = (ci + 1) * ch < nvis ? (ci + 1) * ch : nvis;
    g3_attn_flash(s->q + t * qw + g * rep * hd, qw, 1, rep, hd, c->attn_scale, sp, nsp, ci * ch,
                  j1, &rl, &rh, o, mm, ll, work);
}

/* Attention of each query row (decode, speculative verify, batches of several sequences) in the
 * flash form: one pass over a KV head's rows serves all the query heads that share it, and a long
 * context is cut into fixed key chunks merged in order. A call of fewer than G3_FA_SPLIT (token,
 * KV head) items runs the chunks as items of their own (one decoded token still uses every
 * thread); a larger call runs each item's chunks in turn on one thread. Same chunks, same
 * merge: the same bits either way. */
static void attention_rows(const g3_model *m, int64_t il, g3_run *s, int64_t T, int nt)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t hd = c->head_dim, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv, nkv = c->n_head_kv;
    const int64_t part = rep * (hd + 2); /* o, m, l of one chunk of one (token, kv head) */
    const int64_t gathered = (int64_t)G3_FA_PARTS * part; /* a thread's merge inputs */
    if (T * nkv < G3_FA_SPLIT) {
#pragma omp parallel for collapse(3) num_threads(nt) schedule(dynamic, 1)
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < nkv; g++)
                for (int64_t ci = 0; ci < G3_FA_PARTS; ci++) {
                    const int64_t nvis = s->key_hi[t] - first_key(m, L, s->pos[t]) + 1;
                    if (ci * row_chunk(nvis) >= nvis)
                        continue;
                    float *o = s->fa_part + ((size_t)(t * nkv + g) * G3_FA_PARTS + ci) * part;
                    row_chunk_flash(m, L, il, s, t, g, ci, o, o + rep * hd, o + rep * hd + rep,
                                    s->fa_work + (size_t)omp_get_thread_num() * s->fa_stride +
                                        gathered);
                }
        /* merge: chunk c's o, m, l are strided by `part`; gather them for the merge in order */
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < nkv; g++) {
                const int64_t nvis = s->key_hi[t] - first_key(m, L, s->pos[t]) + 1;
                const int nc = (int)((nvis + row_chunk(nvis) - 1) / row_chunk(nvis));
                const float *base = s->fa_part + (size_t)(t * nkv + g) * G3_FA_PARTS * part;
                float *w = s->fa_work + (size_t)omp_get_thread_num() * s->fa_stride;
                float *o = w, *mm = o + (size_t)nc * rep * hd, *ll = mm + nc * rep;
                for (int ci = 0; ci < nc; ci++) {
                    const float *p = base + ci * part;
                    memcpy(o + (size_t)ci * rep * hd, p, sizeof(float) * (size_t)(rep * hd));
                    memcpy(mm + ci * rep, p + rep * hd, sizeof(float) * (size_t)rep);
                    memcpy(ll + ci * rep, p + rep * hd + rep, sizeof(float) * (size_t)rep);
                }
                g3_attn_flash_merge(nc, o, mm, ll, 1, rep, hd, s->z + t * qw + g * rep * hd, qw);
            }
        return;
    }
#pragma omp parallel for collapse(2) num_threads(nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < nkv; g++) {
            const int64_t nvis = s->key_hi[t] - first_key(m, L, s->pos[t]) + 1;
            const int nc = (int)((nvis + row_chunk(nvis) - 1) / row_chunk(nvis));
            float *w = s->fa_work + (size_t)omp_get_thread_num() * s->fa_stride;
            float *o = w, *mm = o + (size_t)nc * rep * hd, *ll = mm + nc * rep;
            for (int ci = 0; ci < nc; ci++)
                row_chunk_flash(m, L, il, s, t, g, ci, o + (size_t)ci * rep * hd, mm + ci * rep,
                                ll + ci * rep, w + gathered);
            g3_attn_flash_merge(nc, o, mm, ll, 1, rep, hd, s->z + t * qw + g * rep * hd, qw);
        }
}

typedef struct {
    const g3_layer_capture *cap;
    int64_t h, t0, k0, n_keys;
} tile_capture;

static void tile_capture_row(void *ctx, int64_t r, int64_t lo, int64_t hi, const float *raw,
                             const float *prob)
{
    const tile_capture *tc = ctx;
    capture_row(tc->cap, tc->h, tc->t0 + r, tc->n_keys, tc->k0 + lo, tc->k0 + hi, raw, prob);
}

/* Attention of a single-sequence chunk through sgemm (the observed form of the chunk path): the
 * keys/values the chunk can see are gathered into contiguous float32 (n_keys, kvw) buffers (cache
 * part unrolled in position order and converted from the cache's type, then the fresh rows), then
 * per head and query tile g3_attn_tile_f32. Same math as attention_rows_observed(). */
static void attention_tiles_observed(const g3_model *m, int64_t il, g3_run *s, int64_t T, int nt,
                                     const g3_layer_capture *cap)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const g3_seq *sq = &m->seqs[s->seq[0]];
    const int64_t hd = c->head_dim, kvw = c->n_head_kv * hd, qw = c->n_head * hd;
    const int64_t rep = c->n_head / c->n_head_kv, n_past = sq->n_past;
    /* first key any query of the chunk can see */
    const int64_t k0 = first_key(m, L, s->pos[0]);
    const int64_t nk = n_past + T - k0;
    const int64_t qt = T < G3_ATTN_QTILE ? T : G3_ATTN_QTILE;
    float *K = s->kv, *V = s->kv + s->gather_keys * kvw;
    g3_kv_span sp[4];
    const int nsp = kv_spans(m, L, sq, il, s->k, s->v, k0, n_past + T - 1, -1, sp);
    for (int i = 0, row = 0; i < nsp; row += (int)sp[i].n, i++) {
        /* whole rows: every head (q8_0 blocks lie back to back across heads) */
        const g3_kv_span whole = sp[i];
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t j = 0; j < whole.n; j++) {
            g3_kv_row(&whole, 0, j, kvw, K + (row + j) * kvw);
            g3_kv_row(&whole, 1, j, kvw, V + (row + j) * kvw);
        }
    }
    tile_capture tc = {cap, 0, 0, k0, n_past + T};
    const g3_attn_observer obs = {tile_capture_row, &tc, s->scores, 2 * s->keys};
    for (int64_t h = 0; h < c->n_head; h++) {
        const int64_t g = h / rep;
        for (int64_t t0 = 0; t0 < T; t0 += qt) {
            const int64_t nq = t0 + qt < T ? qt : T - t0;
            int64_t ncol = 0; /* keys past the tile's last visible one are never computed */
            for (int64_t r = 0; r < nq; r++) {
                const int64_t t = t0 + r, p = s->pos[t];
                s->tile_lo[r] = first_key(m, L, p) - k0;
                s->tile_hi[r] = s->key_hi[t] - k0;
                ncol = s->tile_hi[r] + 1 > ncol ? s->tile_hi[r] + 1 : ncol;
            }
            tc.h = h;
            tc.t0 = t0;
            g3_attn_tile_f32(s->q + t0 * qw + h * hd, qw, K + g * hd, V + g * hd, kvw, nq, ncol,
                             hd, c->attn_scale, s->tile_lo, s->tile_hi, s->S, nk,
                             s->z + t0 * qw + h * hd, qw, nt, wants_pattern(cap) ? &obs : NULL);
        }
    }
}

/* Attention of a single-sequence chunk in the flash form (g3_attn_flash): items of (KV head,
 * block of G3_FA_ROWS / rep query positions), each reading the K/V rows it can see once, in the
 * cache's type, for all the query heads of its KV head; no score row longer than one key block. */
static void attention_tiles(const g3_model *m, int64_t il, g3_run *s, int64_t T, int nt)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const g3_seq *sq = &m->seqs[s->seq[0]];
    const int64_t hd = c->head_dim, qw = c->n_head * hd, nkv = c->n_head_kv;
    const int64_t rep = c->n_head / nkv, n_past = sq->n_past;
    const int64_t k0 = first_key(m, L, s->pos[0]);
    const int64_t qb = G3_FA_ROWS / rep, nblk = (T + qb - 1) / qb;
    for (int64_t t = 0; t < T; t++) {
        s->fa_lo[t] = first_key(m, L, s->pos[t]) - k0;
        s->fa_hi[t] = s->key_hi[t] - k0;
    }
#pragma omp parallel for collapse(2) num_threads(nt) schedule(dynamic, 1)
    for (int64_t g = 0; g < nkv; g++)
        for (int64_t b = 0; b < nblk; b++) {
            const int64_t t0 = b * qb, nq = t0 + qb < T ? qb : T - t0;
            g3_kv_span sp[4];
            const int nsp = kv_spans(m, L, sq, il, s->k, s->v, k0, n_past + T - 1, g, sp);
            float *w = s->fa_work + (size_t)omp_get_thread_num() * s->fa_stride;
            float *o = w + g3_attn_flash_work(hd), *mm = o + G3_FA_ROWS * hd;
            float *ll = mm + G3_FA_ROWS;
            g3_attn_flash(s->q + t0 * qw + g * rep * hd, qw, nq, rep, hd, c->attn_scale, sp, nsp,
                          0, n_past + T - k0, s->fa_lo + t0, s->fa_hi + t0, o, mm, ll, w);
            g3_attn_flash_merge(1, o, mm, ll, nq, rep, hd, s->z + t0 * qw + g * rep * hd, qw);
        }
}

/* The call's K/V rows into the cache, converted once to its type (per position: n_head_kv heads;
 * q8_0 blocks of 32 never straddle two heads since head_dim % 32 == 0). */
static void store_kv(const g3_model *m, int64_t il, const g3_run *s, int64_t T, int nt)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t kvw = c->n_head_kv * c->head_dim;
    const size_t row = (size_t)c->n_head_kv * m->kv_head_bytes;
    const g3_from_float_fn conv = g3_type_get(m->kv_type)->from_float;
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const g3_seq *sq = &m->seqs[s->seq[t]];
        const int64_t pos = s->pos[t];
        if (!L->is_global && s->gend[t] - pos >= L->n_slots)
            continue; /* overwritten later in this same call: in a ring only the last survive */
        const int64_t slot = L->is_global ? pos : pos % L->n_slots;
        uint8_t *dk = sq->k[il] + (size_t)slot * row, *dv = sq->v[il] + (size_t)slot * row;
        if (m->kv_type == G3_TYPE_F32) {
            memcpy(dk, s->k + t * kvw, sizeof(float) * kvw);
            memcpy(dv, s->v + t * kvw, sizeof(float) * kvw);
        } else {
            conv(s->k + t * kvw, dk, kvw);
            conv(s->v + t * kvw, dv, kvw);
        }
    }
}

/* q/k RMSNorm per head, then RoPE with the layer kind's frequencies. */
static void qk_norm_rope(const g3_model *m, const g3_layer *L, g3_run *s, int64_t T, int nt)
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

/* x += y, row by row (the hooked form of add_normed: norm, hook, then add) */
static void add_rows(float *x, const float *y, int64_t T, int64_t n, int nt)
{
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < n; i++)
            x[t * n + i] += y[t * n + i];
}

/* Runs the interventions at one point of layer il (none: one NULL test). */
#define HOOK(point, buf)                                                                           \
    do {                                                                                           \
        if (hk && (st = g3_hooks_apply(hk, c, il, point, buf, T, s->pos[0], err)))                 \
            return st;                                                                             \
    } while (0)

/* x += rms(y) * w with the sublayer output hooked between the norm and the add when asked. */
static g3_status add_sublayer(g3_model *m, g3_run *s, const float *w, int64_t il, int point,
                              int64_t T, int nt, const g3_hooks *hk, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const int64_t E = c->n_embd;
    g3_status st = G3_OK;
    if (!hk || !g3_hooks_at(hk, il, point)) {
        PROF(G3_PROF_NORM, add_normed(s->x, s->h, w, T, E, c->eps, nt));
        return G3_OK;
    }
    PROF(G3_PROF_NORM, norm_rows(s->h, w, s->h, T, E, c->eps, nt));
    HOOK(point, s->h);
    add_rows(s->x, s->h, T, E, nt);
    return G3_OK;
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

static g3_status layer_forward(g3_model *m, int64_t il, g3_run *s, int64_t T, int nt, int single,
                               const g3_layer_capture *cap, const g3_hooks *hk, g3_err *err)
{
    const g3_config *c = &m->cfg;
    const g3_layer *L = &m->layers[il];
    const int64_t E = c->n_embd, F = c->n_ff;
    const int64_t nq = T * c->n_head * c->head_dim, nkv = T * c->n_head_kv * c->head_dim;
    g3_status st = G3_OK;
    HOOK(G3_HOOK_RESID_PRE, s->x);
    if (cap)
        save(cap->resid_pre, s->x, T * E);
    PROF(G3_PROF_NORM, norm_rows(s->x, L->attn_norm, s->h, T, E, c->eps, nt));
    const g3_weight *qkv[3] = {&L->q, &L->k, &L->v};
    float *qkv_out[3] = {s->q, s->k, s->v};
    PROF(G3_PROF_QKV, st = g3_matmul_multi(3, qkv, s->h, T, qkv_out, &s->mm, err));
    if (st)
        return st;
    PROF(G3_PROF_ROPE, qk_norm_rope(m, L, s, T, nt));
    HOOK(G3_HOOK_Q, s->q);
    HOOK(G3_HOOK_K, s->k);
    HOOK(G3_HOOK_V, s->v);
    /* z always comes from the flash forms, so a capture never changes a bit of the pass; an
     * observer (a capture of attention maps) also gets whole score rows from the two-pass row
     * form, for the rows it asked for. Only more query heads per KV head than a flash item holds
     * take the two-pass forms for z. */
    if (c->n_head / c->n_head_kv > G3_FA_ROWS) {
        if (single && T >= G3_ATTN_BLAS_MIN)
            PROF(G3_PROF_ATTN, attention_tiles_observed(m, il, s, T, nt, cap));
        else
            PROF(G3_PROF_ATTN, attention_rows_observed(m, il, s, T, nt, cap, 1));
    } else {
        if (single && T >= G3_ATTN_BLAS_MIN)
            PROF(G3_PROF_ATTN, attention_tiles(m, il, s, T, nt));
        else
            PROF(G3_PROF_ATTN, attention_rows(m, il, s, T, nt));
        if (wants_pattern(cap))
            PROF(G3_PROF_ATTN, attention_rows_observed(m, il, s, T, nt, cap, 0));
    }
    PROF(G3_PROF_ATTN, store_kv(m, il, s, T, nt));
    if (cap) {
        save(cap->q, s->q, nq);
        save(cap->k, s->k, nkv);
        save(cap->v, s->v, nkv);
    }
    HOOK(G3_HOOK_Z, s->z); /* sees this layer's captures (gemma3/hooks.py rewrites z from them) */
    if (cap)
        save(cap->z, s->z, nq);
    PROF(G3_PROF_OPROJ, st = g3_matmul(&L->o, s->z, T, s->h, &s->mm, err));
    if (st)
        return st;
    if ((st = add_sublayer(m, s, L->post_attn_norm, il, G3_HOOK_ATTN_OUT, T, nt, hk, err)))
        return st;
    HOOK(G3_HOOK_RESID_MID, s->x);
    if (cap) {
        save(cap->attn_out, s->h, T * E);
        save(cap->resid_mid, s->x, T * E);
    }
    PROF(G3_PROF_NORM, norm_rows(s->x, L->ffn_norm, s->h, T, E, c->eps, nt));
    const g3_weight *gu[2] = {&L->gate, &L->up};
    float *gu_out[2] = {s->g, s->u};
    PROF(G3_PROF_GATE_UP, st = g3_matmul_multi(2, gu, s->h, T, gu_out, &s->mm, err));
    if (st)
        return st;
    PROF(G3_PROF_GEGLU, geglu_rows(s->g, s->u, T * F, nt));
    PROF(G3_PROF_DOWN, st = g3_matmul(&L->down, s->g, T, s->h, &s->mm, err));
    if (st)
        return st;
    if ((st = add_sublayer(m, s, L->post_ffn_norm, il, G3_HOOK_MLP_OUT, T, nt, hk, err)))
        return st;
    HOOK(G3_HOOK_RESID_POST, s->x);
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
    if (b->hooks && ng != 1)
        return g3_fail(err, G3_ERR_ARG, "hooks work on single-sequence calls only");
    g3_status hst = b->hooks ? g3_hooks_check(&m->cfg, b->hooks, err) : G3_OK;
    if (hst)
        return hst;
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
static void plan_tokens(const g3_model *m, const g3_batch *b, g3_run *s)
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
    /* the only place a forward pass may fail for want of memory: before it touches anything */
    if (!g3_run_fits(m->run, T, max_keys, nt) &&
        (st = g3_run_reserve(m, T, max_keys, nt, err)))
        return st;
    g3_run *s = m->run;
    plan_tokens(m, b, s);
    const int single = ng == 1;
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        g3_rope_table(s->rope_local + t * c->head_dim, c->head_dim, s->pos[t], m->inv_freq_local);
        g3_rope_table(s->rope_global + t * c->head_dim, c->head_dim, s->pos[t],
                      m->inv_freq_global);
    }

    double t_embed = m->prof.enabled ? omp_get_wtime() : 0.0;
#pragma omp parallel for num_threads(nt) if(T > 1) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *x = s->x + t * E;
        if (b->embd && b->embd_mask && b->embd_mask[t]) {
            memcpy(x, b->embd + t * E, sizeof(float) * E);
        } else {
            g3_weight_row(&m->tok_embd, b->ids[t], x);
            for (int64_t i = 0; i < E; i++)
                x[i] *= c->embd_scale;
        }
    }
    if (m->prof.enabled) {
        m->prof.seconds[G3_PROF_EMBED] += omp_get_wtime() - t_embed;
        m->prof.forwards++;
        m->prof.tokens += T;
    }
    /* From here on no step can fail for lack of memory; a matmul reports an error only if the run
     * state was sized wrongly (a bug), and then the cache may hold part of this batch. */
    /* A hook that stops the pass (a Python callback raised) also leaves part of this batch in the
     * cache, with n_past unchanged: the caller resets the sequence (gemma3/engine.py: the
     * Engine.hooked flag makes the next prompt start from an empty cache). */
    const g3_capture *cap = b->capture;
    const g3_hooks *hk = b->hooks;
    for (int64_t i = 0; i < c->n_layer && !st; i++)
        st = layer_forward(m, i, s, T, nt, single, cap && cap->layers ? &cap->layers[i] : NULL,
                           hk, err);
    /* hooked final norm: every row normed into h and hooked, the LM head reads h */
    const int final_hook = hk && g3_hooks_at(hk, -1, G3_HOOK_FINAL);
    if (!st && final_hook) {
        norm_rows(s->x, m->output_norm, s->h, T, E, c->eps, nt);
        st = g3_hooks_apply(hk, c, -1, G3_HOOK_FINAL, s->h, T, s->pos[0], err);
    }
    if (!st && cap && cap->final_norm) {
        if (final_hook)
            save(cap->final_norm, s->h, T * E);
        else
            norm_rows(s->x, m->output_norm, cap->final_norm, T, E, c->eps, nt);
    }
    if (!st && b->logits_mode) {
        int64_t n = T;
        float *rows = final_hook ? s->h : s->x;
        if (b->logits_mode == 1) { /* the last token of every group */
            n = 0;
            for (int64_t t = 0; t < T; t++)
                if (t + 1 == T || s->first[t + 1] != s->first[t])
                    memmove(rows + (n++) * E, rows + t * E, sizeof(float) * E);
        }
        if (!final_hook)
            PROF(G3_PROF_LM_HEAD, norm_rows(s->x, m->output_norm, s->h, n, E, c->eps, nt));
        /* the soft-cap can tie rows the raw logits order: its arg-max needs every capped row */
        if (b->logits_mode == 3 && !(c->final_softcap > 0))
            PROF(G3_PROF_LM_HEAD,
                 st = g3_matmul_argmax(&m->output, s->h, n, b->argmax, b->logits, NULL, &s->mm,
                                      err));
        else
            PROF(G3_PROF_LM_HEAD, st = g3_matmul(&m->output, s->h, n, b->logits, &s->mm, err));
        if (!st && c->final_softcap > 0) {
            const float cap_v = c->final_softcap;
            for (int64_t i = 0; i < n * c->n_vocab; i++)
                b->logits[i] = cap_v * tanhf(b->logits[i] / cap_v);
            for (int64_t t = 0; b->logits_mode == 3 && t < n; t++)
                b->argmax[t] = g3_argmax_f32(b->logits + t * c->n_vocab, c->n_vocab);
        }
    }
    if (!st)
        for (int64_t g = 0; g < ng; g++)
            m->seqs[b->group_seq ? b->group_seq[g] : 0].n_past +=
                b->group_len ? b->group_len[g] : T;
    return st;
}
