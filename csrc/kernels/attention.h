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

/* n key/value rows, row j at k + j * stride (values likewise); a query's keys are the
 * concatenation of its spans, in position order. */
typedef struct {
    const float *k, *v;
    int64_t n;
} g3_kv_span;

/* sc[j] = scale * q . k_j over the spans (sum of n keys). */
void g3_attn_scores_f32(const float *q, int64_t hd, const g3_kv_span *sp, int nsp, int64_t stride,
                        float scale, float *sc);
/* z (hd) = sum_j p[j] v_j over the spans (z is overwritten). */
void g3_attn_mix_f32(const float *p, const g3_kv_span *sp, int nsp, int64_t stride, int64_t hd,
                     float *z);

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
