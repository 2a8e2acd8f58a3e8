/* lora.c — attaching low-rank deltas (LoRA adapters, unmerged) to a model's layer matrices:
 * W_eff x = W x + sum_d scale_d * B_d (A_d x), computed by kernels/lora.c inside every product
 * with W (decode and prefill), so adapters switch without touching the base weights.
 *
 * Which matrix a delta goes on is named by the role table's key ("blk.{i}.attn_q", ...): only the
 * per-layer matrices of the text table (q, k, v, o, gate, up, down) take deltas; the embedding
 * and LM head do not (PEFT's target_modules over the text model's projections).
 * The deltas' A and B stay the caller's (py_model.c keeps the arrays referenced); the nodes and
 * their scratch are the model's, allocated here, never during a forward pass.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/roles.h"

/* The per-layer matrix a key names. */
static g3_status find_matrix(g3_model *m, const char *key, g3_weight **out, g3_err *err)
{
    g3_role_slot s = {.t = &g3_text_roles, .top = m, .layers = m->layers,
                      .layer_size = sizeof *m->layers, .n_layer = m->cfg.n_layer};
    while (g3_role_next(&s) > 0) {
        if (strcmp(s.name, key) != 0)
            continue;
        if (s.role->kind != G3_ROLE_MATRIX || !s.role->per_layer)
            return g3_fail(err, G3_ERR_UNSUPPORTED,
                           "a LoRA delta on '%s' is not supported (only the layers' q, k, v, o, "
                           "gate, up and down projections take one)",
                           key);
        *out = g3_role_matrix(s.role, s.base);
        return G3_OK;
    }
    return g3_fail(err, G3_ERR_ARG, "the model has no matrix '%s' for a LoRA delta (%lld layers)",
                   key, (long long)m->cfg.n_layer);
}

static void detach_all(g3_model *m)
{
    for (int64_t i = 0; m->layers && i < m->cfg.n_layer; i++) {
        g3_layer *L = &m->layers[i];
        g3_weight *ws[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t j = 0; j < sizeof ws / sizeof ws[0]; j++)
            ws[j]->lora = NULL;
    }
    free(m->loras);
    free(m->lora_u);
    m->loras = NULL;
    m->lora_u = NULL;
    m->n_loras = 0;
}

g3_status g3_model_set_lora(g3_model *m, const g3_lora_spec *specs, int64_t n, g3_err *err)
{
    if (n < 0 || (n > 0 && !specs))
        return g3_fail(err, G3_ERR_ARG, "bad LoRA delta list");
    /* everything is checked and allocated before the active set changes: all or nothing */
    g3_weight **target = n ? calloc((size_t)n, sizeof *target) : NULL;
    if (n && !target)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    int64_t total_rank = 0;
    for (int64_t d = 0; d < n; d++) {
        const g3_lora_spec *sp = &specs[d];
        g3_status st = sp->key ? find_matrix(m, sp->key, &target[d], err)
                               : g3_fail(err, G3_ERR_ARG, "LoRA delta %lld has no matrix name",
                                         (long long)d);
        if (st) {
            free(target);
            return st;
        }
        const int64_t rows = target[d]->rows, cols = target[d]->cols, r = sp->rank;
        if (r < 1 || sp->a_rows != r || sp->a_cols != cols || sp->bt_rows != r ||
            sp->bt_cols != rows) {
            free(target);
            return g3_fail(err, G3_ERR_FORMAT,
                           "LoRA delta on '%s' of shape (%lld, %lld): A has shape (%lld, %lld) and "
                           "B^T (%lld, %lld), expected (rank, %lld) and (rank, %lld), rank >= 1",
                           sp->key, (long long)rows, (long long)cols, (long long)sp->a_rows,
                           (long long)sp->a_cols, (long long)sp->bt_rows, (long long)sp->bt_cols,
                           (long long)cols, (long long)rows);
        }
        if (!sp->A || !sp->Bt || !isfinite(sp->scale)) {
            free(target);
            return g3_fail(err, G3_ERR_ARG, "LoRA delta on '%s': no data, or scale %g not finite",
                           sp->key, (double)sp->scale);
        }
        total_rank += sp->rank;
    }
    g3_lora *nodes = n ? calloc((size_t)n, sizeof *nodes) : NULL;
    float *u = n ? malloc(sizeof(float) * (size_t)total_rank * G3_LORA_CHUNK) : NULL;
    if (n && (!nodes || !u)) {
        free(target);
        free(nodes);
        free(u);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for %lld LoRA deltas", (long long)n);
    }
    detach_all(m);
    float *next_u = u;
    for (int64_t d = 0; d < n; d++) {
        nodes[d] = (g3_lora){specs[d].rank, specs[d].scale, specs[d].A, specs[d].Bt, next_u, NULL};
        next_u += specs[d].rank * G3_LORA_CHUNK;
        g3_lora **tail = &target[d]->lora; /* appended: the given order is the summing order */
        while (*tail)
            tail = &(*tail)->next;
        *tail = &nodes[d];
    }
    free(target);
    m->loras = nodes;
    m->lora_u = u;
    m->n_loras = n;
    g3_model_reset(m, -1); /* cached keys/values came from the old weights */
    return G3_OK;
}
