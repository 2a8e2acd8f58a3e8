/* attention_vision.h — fused bidirectional attention for the vision tower (head size 72 over
 * 4,096 patches in SigLIP): for query rows q_i and all P keys/values of one head,
 *
 *   z_i = sum_j softmax_j(scale q_i . k_j) v_j
 *
 * computed a block of G3_ATTN_KB keys at a time with an online softmax: per row a running max m
 * and sum l; a block's scores become exp(s - m_new), the partial output and l are rescaled by
 * exp(m_old - m_new), z = O / l at the end. No (P x P) score matrix is ever formed: a task's
 * scratch is G3_ATTN_QB x G3_ATTN_KB floats (192 KiB), L2-resident.
 *
 * Two block forms, same algorithm:
 *   - float32: a 12 x 32 FMA micro-kernel (scalar reference + AVX-512) over the head's keys packed
 *     once per layer (g3_attn_pack_keys_f32: panels of 32 keys, transposed) and the values read
 *     where they lie;
 *   - bf16: q, k, v and the probabilities rounded to bf16, products by the bf16 kernel
 *     (gemm_bf16.h) with the head's keys and values packed once per layer
 *     (g3_attn_pack_keys / g3_attn_pack_values), float32 softmax and accumulation.
 * Row helpers (scale + max) have a scalar reference and an AVX-512 variant (same result: max is
 * exact, the scaling one rounding either way), picked by the selected ISA level.
 * Callers run tasks (head, block of query rows) in their own parallel region: a task writes only
 * its rows of z, so the result has the same bits at any thread count.
 */
#ifndef G3_KERNELS_ATTENTION_VISION_H
#define G3_KERNELS_ATTENTION_VISION_H

#include "g3.h"

#define G3_ATTN_QB 192 /* query rows per task (16 bf16 micro-kernel tiles) */
#define G3_ATTN_KB 256 /* keys per block (a multiple of the bf16 panel width, even) */

/* Scratch floats of one task. */
size_t g3_attn_fused_ws_floats(int64_t hd);
/* Words of a head's packed keys / values for P keys of hd values. */
size_t g3_attn_kpan_words(int64_t P, int64_t hd);
size_t g3_attn_vpan_words(int64_t P, int64_t hd);
/* Packs keys [r0, r0 + 32) (one panel; fewer at the end) of K (P, hd) at stride ldk. */
void g3_attn_pack_keys(const float *K, int64_t ldk, int64_t P, int64_t hd, int64_t panel,
                       uint32_t *kpan);
/* Packs the values (P, hd) of a head, transposed (hd outputs over P inputs). */
void g3_attn_pack_values(const float *V, int64_t ldk, int64_t P, int64_t hd, uint32_t *vpan);

/* Floats of a head's float32 packed keys; packs key panel `panel` (32 keys) of K (P, hd). */
size_t g3_attn_fkey_floats(int64_t P, int64_t hd);
void g3_attn_pack_keys_f32(const float *K, int64_t ldk, int64_t P, int64_t hd, int64_t panel,
                           float *kpan);

/* nq <= G3_ATTN_QB query rows (Q at the first, stride ldq) over the P keys of one head (K, V
 * at stride ldk) -> z (nq, hd) at stride ldz. kpan/vpan: the head's packed keys and values for
 * the bf16 form, NULL for float32 (then fkpan: the head's float32 packed keys). ws: g3_attn_fused_ws_floats(hd) floats. Single-threaded. */
void g3_attn_fused_rows(const float *Q, int64_t ldq, const float *K, const float *V, int64_t ldk,
                        const uint32_t *kpan, const uint32_t *vpan, const float *fkpan, int64_t P,
                        int64_t hd, int64_t nq, float scale, float *z, int64_t ldz, float *ws);

/* One head, all P query rows (tests): packs keys/values itself when bf16 (and the bf16 kernel
 * runs here, else float32). Returns G3_ERR_NOMEM if its scratch cannot be had. */
g3_status g3_attn_fused_head(const float *Q, const float *K, const float *V, int64_t P,
                             int64_t hd, float scale, float *z, int bf16);

#endif
