/* hooks.h — interventions: what a forward pass does to an activation at a named point.
 *
 * A point is one activation of one layer seen as a (T, W) float32 matrix whose rows are the
 * call's tokens at positions pos0 .. pos0 + T - 1 (hooked calls are single-sequence):
 *
 *   RESID_PRE, ATTN_OUT, RESID_MID, MLP_OUT, RESID_POST, FINAL   W = n_embd
 *   Q, Z                                                          W = n_head * head_dim
 *   K, V                                                          W = n_head_kv * head_dim
 *
 * (gemma3/inspect.py names them blocks.L.hook_resid_pre, ...attn.hook_q, ln_final.hook_normalized;
 * FINAL belongs to no layer, its ops carry layer -1.) Q and K are after q/k-norm and RoPE; K and
 * V are hooked before attention reads them and before they are cached; Z is the attention output
 * per head before o_proj; ATTN_OUT / MLP_OUT are what a sublayer adds to the residual (after its
 * post-norm), so writing them changes the residual.
 *
 * An op touches columns [col0, col0 + ncols) of the rows whose absolute position is listed in
 * pos (every row when pos is NULL):
 *   G3_HOOK_SET   row = scale * src_row   (src NULL: zeros)   ablation, patching
 *   G3_HOOK_ADD   row += scale * src_row                      steering
 *   G3_HOOK_CALL  fn(ctx, op index, layer, point, x, T, W, pos0) on the whole (T, W) matrix;
 *                 nonzero stops the pass (the Python binding: a Python function raised)
 * src is (n_src, ncols) row-major: not indexed, its one row applies at every position (steering,
 * mean ablation); indexed, row p applies at position p and positions p >= n_src are left unchanged
 * (a patch source covers the positions of the run it was cached from).
 *
 * Ops run in the order given; a point with no op costs one scan of the op list (a handful of
 * compares), a pass with no hooks one NULL test per point. A capture of the same point records
 * the value after its ops.
 */
#ifndef G3_MODEL_HOOKS_H
#define G3_MODEL_HOOKS_H

#include "model/model.h"

enum {
    G3_HOOK_RESID_PRE,
    G3_HOOK_Q,
    G3_HOOK_K,
    G3_HOOK_V,
    G3_HOOK_Z,
    G3_HOOK_ATTN_OUT,
    G3_HOOK_RESID_MID,
    G3_HOOK_MLP_OUT,
    G3_HOOK_RESID_POST,
    G3_HOOK_FINAL,
    G3_HOOK_N_POINTS
};
enum { G3_HOOK_SET, G3_HOOK_ADD, G3_HOOK_CALL };

/* Called on the forward's own thread, outside any parallel region. */
typedef int (*g3_hook_fn)(void *ctx, int64_t op, int64_t layer, int point, float *x, int64_t T,
                          int64_t W, int64_t pos0);

typedef struct {
    int64_t layer;        /* 0 .. n_layer - 1, or -1 with G3_HOOK_FINAL */
    int point, kind;      /* G3_HOOK_RESID_PRE .., G3_HOOK_SET .. */
    int64_t col0, ncols;  /* the columns touched, within the point's width */
    const float *src;     /* (n_src, ncols) or NULL (SET only: zeros) */
    int64_t n_src;
    int indexed;          /* 0: src's one row at every position; 1: row p at position p */
    float scale;
    const int64_t *pos;   /* (n_pos) absolute positions, or NULL: every row */
    int64_t n_pos;
} g3_hook_op;

typedef struct g3_hooks_s {
    const g3_hook_op *ops; /* (n_ops) */
    int64_t n_ops;
    g3_hook_fn fn;         /* for G3_HOOK_CALL ops */
    void *ctx;
} g3_hooks;

/* The width W of a point's (T, W) matrix. */
int64_t g3_hook_width(const g3_config *c, int point);
/* Every op within the model's layers, points and widths, with a source where it needs one. */
g3_status g3_hooks_check(const g3_config *c, const g3_hooks *h, g3_err *err);
/* Whether any op of h sits at (layer, point). */
int g3_hooks_at(const g3_hooks *h, int64_t layer, int point);
/* Runs the ops at (layer, point) on x (T, W). G3_ERR_INTERRUPTED when a callback stopped it. */
g3_status g3_hooks_apply(const g3_hooks *h, const g3_config *c, int64_t layer, int point, float *x,
                         int64_t T, int64_t pos0, g3_err *err);

#endif
