/* run.h — the run state of a model: every buffer a forward pass works in, allocated between calls
 * so that g3_model_forward never allocates (and so never fails half-way through a batch, after
 * earlier layers wrote their part of it into the KV rings).
 *
 * Capacities: `tokens` per call, `keys` visible to one query, `threads`. Reserved at load for the
 * engine's normal chunk (g3_run_reserve_default: 512 tokens, min(max_seq, 4096) keys); a call that
 * needs more grows the state at the very start of g3_model_forward, before any sequence or cache
 * state is touched: all or nothing, so an allocation failure leaves the model as it was.
 */
#ifndef G3_MODEL_RUN_H
#define G3_MODEL_RUN_H

#include "kernels/matmul.h"
#include "model/model.h"

#define G3_RUN_TOKENS 512       /* gemma3/engine.py PREFILL_CHUNK */
#define G3_RUN_KEYS 4096        /* keys reserved at load; longer contexts grow on first use */
#define G3_ATTN_BLAS_MIN 32     /* queries of one sequence from which attention uses sgemm */
#define G3_ATTN_QTILE 128       /* query rows per sgemm tile (bounds the score tile) */
/* the row form of flash attention (forward.c attention_rows): calls of fewer than G3_FA_SPLIT
 * (token, KV head) items cut each query's keys into at most G3_FA_PARTS chunks of at least
 * G3_FA_CHUNK keys, merged in order */
#define G3_FA_SPLIT 8
#define G3_FA_PARTS 32
#define G3_FA_CHUNK 256

typedef struct g3_run_s {
    int64_t tokens, keys, gather_keys; /* capacities (gather_keys: 0 when tokens < 32) */
    int threads;
    float *x, *h;        /* (tokens, n_embd): residual stream; normed input / sublayer output */
    float *q, *z;        /* (tokens, n_head * head_dim): queries; attention output */
    float *k, *v;        /* (tokens, n_head_kv * head_dim): this call's keys and values */
    float *g, *u;        /* (tokens, n_ff): gate (then GeGLU output) and up projections */
    float *rope_local, *rope_global; /* (tokens, head_dim): cos | sin of each token's position */
    int64_t *pos;        /* (tokens) absolute position of each token in its sequence */
    int64_t *first;      /* (tokens) batch index of the first token of its group */
    int64_t *gend;       /* (tokens) position of the last token of its group */
    int64_t *key_hi;     /* (tokens) last key position visible to each query (images extend it) */
    int32_t *seq;        /* (tokens) sequence of each token */
    int64_t *tile_lo, *tile_hi; /* (G3_ATTN_QTILE) visible keys of a tile's rows, tile-relative */
    float *scores;       /* (threads, 2 * keys): per-thread scores + a raw copy for capture */
    float *kv;           /* (2, gather_keys, n_head_kv * head_dim): K then V gathered in
                          * position order for the sgemm path */
    float *S;            /* (min(tokens, G3_ATTN_QTILE), gather_keys): one head's score tile */
    float *fa_work;      /* (threads, fa_stride): flash work area + one item's o, m, l (or the
                          * merge's gathered parts); a row of converted K/V for the row forms */
    int64_t fa_stride;
    float *fa_part;      /* the row form's partial o, m, l: max(tokens * n_head,
                          * G3_FA_SPLIT * G3_FA_PARTS * rep) x (head_dim + 2) */
    int64_t *fa_lo, *fa_hi; /* (tokens) visible keys of each query, relative to the chunk's first */
    g3_matmul_ws mm;     /* matmul scratch for up to `tokens` rows */
} g3_run;

/* Grows m's run state to at least (tokens, keys, threads); never shrinks. */
g3_status g3_run_reserve(g3_model *m, int64_t tokens, int64_t keys, int threads, g3_err *err);
/* The load-time reservation (see above), on g3_get_threads() threads. */
g3_status g3_run_reserve_default(g3_model *m, g3_err *err);
void g3_run_free(g3_run *r);
/* Bytes the run state holds (0 if none). */
size_t g3_run_bytes(const g3_model *m);

/* Whether a call of `tokens` tokens with at most `keys` keys per query fits. */
static inline int g3_run_fits(const g3_run *r, int64_t tokens, int64_t keys, int threads)
{
    return r && tokens <= r->tokens && keys <= r->keys && threads <= r->threads &&
           (tokens < G3_ATTN_BLAS_MIN || keys <= r->gather_keys);
}

#endif
