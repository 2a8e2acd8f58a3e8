/* attention.h — scaled dot-product attention kernels over float32 (transformers-gemma3.md §2.5,
 * eager attention): for one query q (hd) and keys/values k_j, v_j (hd),
 *
 *   s_j = scale * q . k_j,   p = softmax(s) over the visible keys,   z = sum_j p_j v_j
 *
 * Two forms: per query row over key spans (decode and batched rows; keys read where they lie, e.g.
 * a KV ring, through up to a few contiguous spans), and a tile of query rows over contiguous keys
 * through sgemm (prefill chunks). Both use the dispatcher's dot/axpy/softmax, so G3_ISA governs
 * them. Where keys live (cache slots, ring wrap, the batch's fresh rows) is the caller's business.
 */
#ifndef G3_KERNELS_ATTENTION_H
#define G3_KERNELS_ATTENTION_H

#include "g3.h"

/* n key/value rows of one head, row j at k + j * stride bytes (values likewise), stored as
 * `type`: G3_TYPE_F32, F16, BF16 or Q8_0 (a KV cache of that type, or a batch's fresh float32
 * rows). A query's keys are the concatenation of its spans, in position order. */
typedef struct {
    const void *k, *v;
    int64_t n;
    int type;
    size_t stride;
} g3_kv_span;

/* Whether K/V rows can be stored as `type` with heads of hd elements (0 if not). */
int g3_kv_type_ok(int type, int64_t hd);
/* One head's row j of a span (keys: which = 0, values: 1) as hd floats (conversion exact for
 * f16/bf16, d * q for q8_0). */
void g3_kv_row(const g3_kv_span *sp, int which, int64_t j, int64_t hd, float *dst);

/* sc[j] = scale * q . k_j over the spans (sum of n keys). tmp: hd floats of scratch. */
void g3_attn_scores(const float *q, int64_t hd, const g3_kv_span *sp, int nsp, float scale,
                    float *sc, float *tmp);
/* z (hd) = sum_j p[j] v_j over the spans (z is overwritten). tmp: hd floats of scratch. */
void g3_attn_mix(const float *p, const g3_kv_span *sp, int nsp, int64_t hd, float *z, float *tmp);

/* ---- tiled online-softmax attention (flash form) -----------------------------------------------
 * One work item: the query rows of nq positions x rep heads that share one KV head (grouped-query:
 * each K/V row is read once for all of them), over keys [j0, j1) of the spans (indices relative to
 * the spans' first key). Query position t sees keys [lo[t], hi[t]]; row r = t * rep + h has its
 * query at Q + t * ldq + h * hd. Keys are taken G3_FA_BK at a time: S = scale Q K^T for the
 * block (one position: dot products against each key row where it lies, converted row by row
 * when not float32; several: K converted and transposed into the work area, g3_attn_blocks),
 * then the running max m, sum l and the unnormalized output o are updated:
 *   m' = max(m, max_j s_j),  o = o e^(m - m') + sum_j e^(s_j - m') v_j,  l = l e^(m - m') + ...
 * No score row longer than one block exists. Results: o (rows, hd), m, l (rows) of this key range;
 * g3_attn_flash_merge combines ranges in a fixed order, so splitting the keys of a long context
 * into fixed chunks (decided from the shapes, never from the thread count) keeps the bits. */
#define G3_FA_BK 64    /* keys per block */
#define G3_FA_ROWS 128 /* query rows (positions x rep) per work item at most */
/* The two block products, scalar reference / AVX2 / AVX-512 (chosen at the dispatcher's level,
 * g3_isa_selected()): s (rows, 64) = scale * q (rows, d) kt (d, 64); o (rows, d) += p (rows, 64,
 * first nb used) v (nb, d). Products fused (fmaf) in d / key order, so every level gives the
 * same bits. */
typedef struct {
    void (*qk)(const float *q, int64_t rows, int64_t d, const float *kt, float scale, float *s);
    void (*pv)(const float *p, int64_t rows, int64_t nb, const float *v, int64_t d, float *o);
} g3_attn_blocks;
/* The set of one level, NULL if this CPU cannot run it (tests compare levels). */
const g3_attn_blocks *g3_attn_blocks_isa(int isa);
/* floats of work area one call needs */
int64_t g3_attn_flash_work(int64_t hd);
void g3_attn_flash(const float *Q, int64_t ldq, int64_t nq, int64_t rep, int64_t hd, float scale,
                   const g3_kv_span *sp, int nsp, int64_t j0, int64_t j1, const int64_t *lo,
                   const int64_t *hi, float *o, float *m, float *l, float *work);
/* z row r (at Z + t * ldz + h * hd) = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c over the
 * nc parts, part c's arrays at o + c * rows * hd, m + c * rows, l + c * rows (rows = nq * rep);
 * a row that saw no key gets zeros. */
void g3_attn_flash_merge(int nc, const float *o, const float *m, const float *l, int64_t nq,
                         int64_t rep, int64_t hd, float *Z, int64_t ldz);

/* Sees row r's raw scores and probabilities over its visible keys [lo, hi] (tile-relative), to
 * record them (capture). raw is per-thread scratch of at least ncol floats. */
typedef struct {
    void (*row)(void *ctx, int64_t r, int64_t lo, int64_t hi, const float *raw, const float *prob);
    void *ctx;
    float *raw;         /* (threads, raw_stride) */
    int64_t raw_stride;
} g3_attn_observer;

/* One head over a tile of nq query rows and ncol contiguous keys:
 *   S = scale Q K^T (sgemm), row r: softmax over keys [lo[r], hi[r]], 0 elsewhere, Z = S V (sgemm).
 * Q (nq, hd) at row stride ldq; K, V (ncol, hd) at row stride ldk; S (nq, lds >= ncol) scratch;
 * Z (nq, hd) at row stride ldz. The softmax runs in an OpenMP region of nt threads; BLAS is called
 * outside it. obs may be NULL. */
void g3_attn_tile_f32(const float *Q, int64_t ldq, const float *K, const float *V, int64_t ldk,
                      int64_t nq, int64_t ncol, int64_t hd, float scale, const int64_t *lo,
                      const int64_t *hi, float *S, int64_t lds, float *Z, int64_t ldz, int nt,
                      const g3_attn_observer *obs);

#endif
