/* hooks.c — the built-in interventions of hooks.h, applied to a (T, W) activation:
 *
 *   SET  x[t, col0:col0+n] = scale * src[r]      ADD  x[t, col0:col0+n] += scale * src[r]
 *
 * with r = 0 for a broadcast source, r = the row's absolute position for an indexed one. Reference: the NumPy
 * twins are the Python objects gemma3.hooks.ablate_heads / steer / patch, whose __call__ does the
 * same thing to an array; tests/test_hooks.py runs both ways and compares.
 */
#include "model/hooks.h"

#include <string.h>

static const char *const point_names[G3_HOOK_N_POINTS] = {
    "hook_resid_pre", "attn.hook_q",    "attn.hook_k",    "attn.hook_v",
    "attn.hook_z",    "hook_attn_out",  "hook_resid_mid", "hook_mlp_out",
    "hook_resid_post", "ln_final.hook_normalized",
};

int64_t g3_hook_width(const g3_config *c, int point)
{
    switch (point) {
    case G3_HOOK_Q:
    case G3_HOOK_Z:
        return c->n_head * c->head_dim;
    case G3_HOOK_K:
    case G3_HOOK_V:
        return c->n_head_kv * c->head_dim;
    default:
        return c->n_embd;
    }
}

g3_status g3_hooks_check(const g3_config *c, const g3_hooks *h, g3_err *err)
{
    if (h->n_ops < 0 || (h->n_ops && !h->ops))
        return g3_fail(err, G3_ERR_ARG, "hooks: %lld ops without an op array",
                       (long long)h->n_ops);
    for (int64_t i = 0; i < h->n_ops; i++) {
        const g3_hook_op *o = &h->ops[i];
        if (o->point < 0 || o->point >= G3_HOOK_N_POINTS)
            return g3_fail(err, G3_ERR_ARG, "hook %lld: unknown point %d", (long long)i, o->point);
        const char *name = point_names[o->point];
        if (o->point == G3_HOOK_FINAL ? o->layer != -1 : o->layer < 0 || o->layer >= c->n_layer)
            return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): layer %lld out of range (%lld layers)",
                           (long long)i, name, (long long)o->layer, (long long)c->n_layer);
        if (o->kind == G3_HOOK_CALL) {
            if (!h->fn)
                return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): a callback op without a function",
                               (long long)i, name);
            continue;
        }
        if (o->kind != G3_HOOK_SET && o->kind != G3_HOOK_ADD)
            return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): unknown kind %d", (long long)i, name,
                           o->kind);
        const int64_t W = g3_hook_width(c, o->point);
        if (o->col0 < 0 || o->ncols < 1 || o->ncols > W - o->col0)
            return g3_fail(err, G3_ERR_ARG,
                           "hook %lld (%s): columns [%lld, %lld) outside the width %lld",
                           (long long)i, name, (long long)o->col0,
                           (long long)(o->col0 + o->ncols), (long long)W);
        if ((!o->src && o->kind == G3_HOOK_ADD) || (o->src && o->n_src < 1))
            return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): no source rows", (long long)i, name);
        if (o->src && !o->indexed && o->n_src != 1)
            return g3_fail(err, G3_ERR_ARG,
                           "hook %lld (%s): a source for every position has one row, not %lld",
                           (long long)i, name, (long long)o->n_src);
        if (o->n_pos < 0 || (o->n_pos && !o->pos))
            return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): %lld positions without an array",
                           (long long)i, name, (long long)o->n_pos);
        for (int64_t k = 0; o->pos && k < o->n_pos; k++)
            if (o->pos[k] < 0)
                return g3_fail(err, G3_ERR_ARG, "hook %lld (%s): negative position %lld",
                               (long long)i, name, (long long)o->pos[k]);
    }
    return G3_OK;
}

int g3_hooks_at(const g3_hooks *h, int64_t layer, int point)
{
    for (int64_t i = 0; i < h->n_ops; i++)
        if (h->ops[i].layer == layer && h->ops[i].point == point)
            return 1;
    return 0;
}

/* One built-in op on the row of position p (row t of x). */
static void apply_row(const g3_hook_op *o, float *x, int64_t W, int64_t t, int64_t p)
{
    const float *src = NULL;
    if (o->src) {
        const int64_t r = o->indexed ? p : 0;
        if (r >= o->n_src)
            return; /* the source does not hold this position */
        src = o->src + r * o->ncols;
    }
    float *row = x + t * W + o->col0;
    const float a = o->scale;
    if (o->kind == G3_HOOK_ADD) {
        for (int64_t j = 0; j < o->ncols; j++)
            row[j] += a * src[j];
    } else if (src) {
        for (int64_t j = 0; j < o->ncols; j++)
            row[j] = a * src[j];
    } else {
        memset(row, 0, sizeof(float) * (size_t)o->ncols);
    }
}

g3_status g3_hooks_apply(const g3_hooks *h, const g3_config *c, int64_t layer, int point, float *x,
                         int64_t T, int64_t pos0, g3_err *err)
{
    const int64_t W = g3_hook_width(c, point);
    for (int64_t i = 0; i < h->n_ops; i++) {
        const g3_hook_op *o = &h->ops[i];
        if (o->layer != layer || o->point != point)
            continue;
        if (o->kind == G3_HOOK_CALL) {
            if (h->fn(h->ctx, i, layer, point, x, T, W, pos0))
                return g3_fail(err, G3_ERR_INTERRUPTED, "stopped by the hook at layer %lld, %s",
                               (long long)layer, point_names[point]);
        } else if (!o->pos) {
            for (int64_t t = 0; t < T; t++)
                apply_row(o, x, W, t, pos0 + t);
        } else {
            for (int64_t k = 0; k < o->n_pos; k++)
                if (o->pos[k] >= pos0 && o->pos[k] - pos0 < T)
                    apply_row(o, x, W, o->pos[k] - pos0, o->pos[k]);
        }
    }
    return G3_OK;
}
