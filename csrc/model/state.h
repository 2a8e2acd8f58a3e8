/* state.h — a sequence's KV cache as bytes (save, restore, fork) and the ring checkpoints that
 * make deep rollback cheap.
 *
 * The rollback rule (model.h's rings hold window + G3_KV_RING_MARGIN slots):
 *   - global layers keep every position, so cutting them back is just n_past = n;
 *   - a local ring of S = W + margin slots holds positions n_past - S .. n_past - 1, and position
 *     n reads n - W + 1 .. n - 1: cutting back by at most margin + 1 positions is exact and free
 *     (g3_model_truncate);
 *   - deeper, the rings of an earlier position c are gone; a "rings-only" state saved when the
 *     sequence held c positions (a checkpoint) restores them, then positions c .. n - 1 are fed
 *     again: the recompute is n - c tokens, never the whole prefix. The engine takes one every
 *     `checkpoint_interval` positions (gemma3/state.py), each the size of one sequence's rings.
 *
 * Byte layout of a state holding n positions (the model's kv_type as cached: float32, f16,
 * bf16 or q8_0 blocks, native byte order), layer by layer: K rows then V rows, each row
 * (n_head_kv, head_dim), in position order:
 *   global layers: positions 0 .. n - 1 (omitted in a rings-only state);
 *   local layers:  positions n - r .. n - 1, r = min(n, window + G3_KV_RING_MARGIN).
 * Position order (not slot order) keeps the bytes independent of max_seq.
 */
#ifndef G3_MODEL_STATE_H
#define G3_MODEL_STATE_H

#include "model/model.h"

/* Bytes of a state holding n positions (rings_only: local layers only). */
size_t g3_state_bytes(const g3_model *m, int64_t n, int rings_only);
/* Writes sequence seq's state (at its n_past) into dst, which has size bytes. */
g3_status g3_state_save(const g3_model *m, int seq, int rings_only, void *dst, size_t size,
                        g3_err *err);
/* Makes sequence seq hold the state src of n positions. A rings-only state needs the sequence to
 * hold at least n positions already (its global layers keep them) and cuts it back to n. */
g3_status g3_state_load(g3_model *m, int seq, int64_t n, int rings_only, const void *src,
                        size_t size, g3_err *err);
/* A 64-bit digest (FNV-1a) of what makes two models compute the same K/V: the configuration
 * (max_seq excluded), the layer kinds, every weight's type and shape, the first and last row of
 * each matrix and every norm vector. */
uint64_t g3_state_fingerprint(const g3_model *m);

#endif
