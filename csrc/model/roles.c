/* roles.c — the tensor role tables of the text decoder and the vision tower (see roles.h), and
 * the shape check that walks them.
 *
 * Conventions decided here, for every format (reference: llama-cpp-gemma3.md §3.2-3.3, §6.1):
 *   - RMSNorm weights bind as the full multiplier 1 + w: Hugging Face stores w (G3_CONV_ADD_ONE),
 *     llama.cpp's converter stores 1 + w; this covers q_norm / k_norm and the projector's
 *     soft_emb_norm. SigLIP's LayerNorms are plain (weight, bias) in both.
 *   - the untied LM head "output" is optional; when absent the token embedding is bound (tied).
 *   - the patch convolution (D, 3, p, p) is flattened to (D, 3 p p), the order im2col writes.
 *   - the projector computes x @ P with P (D, n_embd_text) in both formats; it binds as P^T.
 *   - older mmproj files stored fc1 under ffn_down and fc2 under ffn_up: the alternative names;
 *     a loader takes the alternative when the primary tensor's shape is not the expected one and
 *     the alternative's is (when n_ff == n_embd the layouts are indistinguishable: primary).
 */
#include "model/roles.h"

#include <stdio.h>
#include <string.h>

const char *const g3_dim_names[G3_DIM_N] = {
    [G3_DIM_ONE] = "1",
    [G3_DIM_VOCAB] = "n_vocab",
    [G3_DIM_EMBD] = "n_embd",
    [G3_DIM_QDIM] = "n_head*head_dim",
    [G3_DIM_KVDIM] = "n_head_kv*head_dim",
    [G3_DIM_HEAD] = "head_dim",
    [G3_DIM_FF] = "n_ff",
    [G3_DIM_V_EMBD] = "n_embd",
    [G3_DIM_V_FF] = "n_ff",
    [G3_DIM_V_PATCH] = "3*patch_size^2",
    [G3_DIM_V_PATCHES] = "n_patches",
    [G3_DIM_V_TEXT] = "n_embd_text",
};

#define MAT G3_ROLE_MATRIX
#define VEC G3_ROLE_VECTOR
#define ONE G3_CONV_ADD_ONE

/* ---- text decoder: fields of g3_model, then of g3_layer ---------------------------------- */
#define M(f) "g3_model." #f, offsetof(g3_model, f)
#define L(f) "g3_layer." #f, offsetof(g3_layer, f)
/* one per-layer role: key and GGUF name "blk.{i}.<gg>", HF name "{t}layers.{i}.<hf>.weight" */
#define TL(gg, hf, kind, r, c, conv, field)                                                        \
    {"blk.{i}." gg, "blk.{i}." gg ".weight", NULL, "{t}layers.{i}." hf ".weight", NULL, 1, kind, \
     0, NULL, r, c, conv, 0, L(field)}

static const g3_role text_roles[] = {
    {"token_embd", "token_embd.weight", NULL, "{t}embed_tokens.weight", NULL, 0, MAT, 0, NULL,
     G3_DIM_VOCAB, G3_DIM_EMBD, 0, 0, M(tok_embd)},
    {"output", "output.weight", NULL, "lm_head.weight", "language_model.lm_head.weight", 0, MAT, 1,
     "token_embd", G3_DIM_VOCAB, G3_DIM_EMBD, 0, 0, M(output)},
    {"output_norm", "output_norm.weight", NULL, "{t}norm.weight", NULL, 0, VEC, 0, NULL,
     G3_DIM_EMBD, G3_DIM_ONE, ONE, 0, M(output_norm)},
    TL("attn_norm", "input_layernorm", VEC, G3_DIM_EMBD, G3_DIM_ONE, ONE, attn_norm),
    TL("attn_q", "self_attn.q_proj", MAT, G3_DIM_QDIM, G3_DIM_EMBD, 0, q),
    TL("attn_k", "self_attn.k_proj", MAT, G3_DIM_KVDIM, G3_DIM_EMBD, 0, k),
    TL("attn_v", "self_attn.v_proj", MAT, G3_DIM_KVDIM, G3_DIM_EMBD, 0, v),
    TL("attn_q_norm", "self_attn.q_norm", VEC, G3_DIM_HEAD, G3_DIM_ONE, ONE, q_norm),
    TL("attn_k_norm", "self_attn.k_norm", VEC, G3_DIM_HEAD, G3_DIM_ONE, ONE, k_norm),
    TL("attn_output", "self_attn.o_proj", MAT, G3_DIM_EMBD, G3_DIM_QDIM, 0, o),
    TL("post_attention_norm", "post_attention_layernorm", VEC, G3_DIM_EMBD, G3_DIM_ONE, ONE,
       post_attn_norm),
    TL("ffn_norm", "pre_feedforward_layernorm", VEC, G3_DIM_EMBD, G3_DIM_ONE, ONE, ffn_norm),
    TL("ffn_gate", "mlp.gate_proj", MAT, G3_DIM_FF, G3_DIM_EMBD, 0, gate),
    TL("ffn_up", "mlp.up_proj", MAT, G3_DIM_FF, G3_DIM_EMBD, 0, up),
    TL("ffn_down", "mlp.down_proj", MAT, G3_DIM_EMBD, G3_DIM_FF, 0, down),
    TL("post_ffw_norm", "post_feedforward_layernorm", VEC, G3_DIM_EMBD, G3_DIM_ONE, ONE,
       post_ffn_norm),
};
#undef M
#undef L
#undef TL

const g3_role_table g3_text_roles = {"text", "model", text_roles,
                                     (int)(sizeof text_roles / sizeof *text_roles)};

/* ---- vision tower + projector: fields of g3_vision, then of g3_vision_layer --------------- */
#define V(f) "g3_vision." #f, offsetof(g3_vision, f)
#define VL(f) "g3_vision_layer." #f, offsetof(g3_vision_layer, f)
/* a per-layer LayerNorm: "blk.{i}.<gg>.weight" and ".bias" (the weights-dict names since the
 * start), HF "{v}encoder.layers.{i}.<hf>.*" */
#define VLN(gg, hf, wf, bf)                                                                        \
    {"blk.{i}." gg ".weight", "v.blk.{i}." gg ".weight", NULL,                                     \
     "{v}encoder.layers.{i}." hf ".weight", NULL, 1, VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, 0, \
     0, VL(wf)},                                                                                   \
    {"blk.{i}." gg ".bias", "v.blk.{i}." gg ".bias", NULL, "{v}encoder.layers.{i}." hf ".bias",  \
     NULL, 1, VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0, VL(bf)}

/* a per-layer attention projection (n_embd, n_embd) keyed "blk.{i}.<gg>" and its bias
 * "blk.{i}.<gg>.bias" */
#define VATT(gg, hf, wf, bf)                                                                       \
    {"blk.{i}." gg, "v.blk.{i}." gg ".weight", NULL, "{v}encoder.layers.{i}." hf ".weight", NULL,  \
     1, MAT, 0, NULL, G3_DIM_V_EMBD, G3_DIM_V_EMBD, 0, 0, VL(wf)},                                 \
    {"blk.{i}." gg ".bias", "v.blk.{i}." gg ".bias", NULL, "{v}encoder.layers.{i}." hf ".bias",   \
     NULL, 1, VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0, VL(bf)}

static const g3_role vision_roles[] = {
    {"patch_embd", "v.patch_embd.weight", NULL, "{v}embeddings.patch_embedding.weight", NULL, 0,
     MAT, 0, NULL, G3_DIM_V_EMBD, G3_DIM_V_PATCH, G3_CONV_FLATTEN | G3_CONV_KEEP_F32,
     G3_CONV_FLATTEN, V(patch)},
    {"patch_embd.bias", "v.patch_embd.bias", NULL, "{v}embeddings.patch_embedding.bias", NULL, 0,
     VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0, V(patch_b)},
    {"position_embd", "v.position_embd.weight", NULL, "{v}embeddings.position_embedding.weight",
     NULL, 0, VEC, 0, NULL, G3_DIM_V_PATCHES, G3_DIM_V_EMBD, 0, 0, V(pos)},
    VATT("attn_q", "self_attn.q_proj", q, q_b),
    VATT("attn_k", "self_attn.k_proj", k, k_b),
    VATT("attn_v", "self_attn.v_proj", v, v_b),
    VATT("attn_out", "self_attn.out_proj", o, o_b),
    /* fc1 / fc2: current mmproj names ffn_up / ffn_down, older files the other way round */
    {"blk.{i}.ffn_up", "v.blk.{i}.ffn_up.weight", "v.blk.{i}.ffn_down.weight",
     "{v}encoder.layers.{i}.mlp.fc1.weight", NULL, 1, MAT, 0, NULL, G3_DIM_V_FF, G3_DIM_V_EMBD, 0,
     0, VL(fc1)},
    {"blk.{i}.ffn_up.bias", "v.blk.{i}.ffn_up.bias", "v.blk.{i}.ffn_down.bias",
     "{v}encoder.layers.{i}.mlp.fc1.bias", NULL, 1, VEC, 0, NULL, G3_DIM_V_FF, G3_DIM_ONE, 0, 0,
     VL(fc1_b)},
    {"blk.{i}.ffn_down", "v.blk.{i}.ffn_down.weight", "v.blk.{i}.ffn_up.weight",
     "{v}encoder.layers.{i}.mlp.fc2.weight", NULL, 1, MAT, 0, NULL, G3_DIM_V_EMBD, G3_DIM_V_FF, 0,
     0, VL(fc2)},
    {"blk.{i}.ffn_down.bias", "v.blk.{i}.ffn_down.bias", "v.blk.{i}.ffn_up.bias",
     "{v}encoder.layers.{i}.mlp.fc2.bias", NULL, 1, VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0,
     VL(fc2_b)},
    VLN("ln1", "layer_norm1", ln1_w, ln1_b),
    VLN("ln2", "layer_norm2", ln2_w, ln2_b),
    {"post_ln.weight", "v.post_ln.weight", NULL, "{v}post_layernorm.weight", NULL, 0, VEC, 0, NULL,
     G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0, V(post_w)},
    {"post_ln.bias", "v.post_ln.bias", NULL, "{v}post_layernorm.bias", NULL, 0, VEC, 0, NULL,
     G3_DIM_V_EMBD, G3_DIM_ONE, 0, 0, V(post_b)},
    {"mm.soft_emb_norm", "mm.soft_emb_norm.weight", NULL, "{m}mm_soft_emb_norm.weight", NULL, 0,
     VEC, 0, NULL, G3_DIM_V_EMBD, G3_DIM_ONE, ONE, 0, V(mm_norm)},
    {"mm.input_projection", "mm.input_projection.weight", NULL, "{m}mm_input_projection_weight",
     NULL, 0, MAT, 0, NULL, G3_DIM_V_TEXT, G3_DIM_V_EMBD, G3_CONV_TRANSPOSE, G3_CONV_TRANSPOSE,
     V(mm_proj)},
};
#undef V
#undef VL
#undef VLN
#undef VATT
#undef MAT
#undef VEC
#undef ONE

const g3_role_table g3_vision_roles = {"vision", "vision", vision_roles,
                                       (int)(sizeof vision_roles / sizeof *vision_roles)};

void g3_text_dims(const g3_config *c, int64_t d[G3_DIM_N])
{
    memset(d, 0, sizeof(int64_t) * G3_DIM_N);
    d[G3_DIM_ONE] = 1;
    d[G3_DIM_VOCAB] = c->n_vocab;
    d[G3_DIM_EMBD] = c->n_embd;
    d[G3_DIM_QDIM] = c->n_head * c->head_dim;
    d[G3_DIM_KVDIM] = c->n_head_kv * c->head_dim;
    d[G3_DIM_HEAD] = c->head_dim;
    d[G3_DIM_FF] = c->n_ff;
}

void g3_vision_dims(const g3_vision_config *c, int64_t d[G3_DIM_N])
{
    memset(d, 0, sizeof(int64_t) * G3_DIM_N);
    const int64_t side = c->patch_size > 0 ? c->image_size / c->patch_size : 0;
    d[G3_DIM_ONE] = 1;
    d[G3_DIM_V_EMBD] = c->n_embd;
    d[G3_DIM_V_FF] = c->n_ff;
    d[G3_DIM_V_PATCH] = 3 * c->patch_size * c->patch_size;
    d[G3_DIM_V_PATCHES] = side * side;
    d[G3_DIM_V_TEXT] = c->n_embd_text;
}

int g3_role_name(const char *pattern, int64_t layer, char *buf, size_t n)
{
    const char *at = layer >= 0 ? strstr(pattern, "{i}") : NULL;
    int len = at ? snprintf(buf, n, "%.*s%lld%s", (int)(at - pattern), pattern, (long long)layer,
                            at + 3)
                 : snprintf(buf, n, "%s", pattern);
    return len < 0 || (size_t)len >= n ? -1 : 0;
}

int g3_role_next(g3_role_slot *s)
{
    for (; s->j < s->t->n; s->j++, s->i = 0) {
        const g3_role *r = &s->t->roles[s->j];
        if (s->i < (r->per_layer ? s->n_layer : 1)) {
            s->role = r;
            s->base = r->per_layer ? (char *)s->layers + (size_t)s->i * s->layer_size : s->top;
            const int fits = g3_role_name(r->key, r->per_layer ? s->i : -1, s->name,
                                          sizeof s->name) == 0;
            s->i++;
            return fits ? 1 : -1;
        }
    }
    return 0;
}

static g3_status check_matrix(const g3_role_table *t, const g3_role *r, const char *name,
                              const g3_weight *w, const int64_t *dims, g3_err *err)
{
    const int64_t rows = dims[r->rows], cols = dims[r->cols];
    if (w->rows != rows || w->cols != cols)
        return g3_fail(err, G3_ERR_FORMAT,
                       "%s tensor '%s' has shape (%lld, %lld), expected (%s, %s) = (%lld, %lld)",
                       t->what, name, (long long)w->rows, (long long)w->cols,
                       g3_dim_names[r->rows], g3_dim_names[r->cols], (long long)rows,
                       (long long)cols);
    const g3_type_traits *tt = g3_type_get(w->type);
    if (!tt->to_float)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "%s tensor '%s' has type %s, which this version cannot compute with",
                       t->what, name, tt->name);
    if (w->row_bytes != g3_row_size(w->type, cols))
        return g3_fail(err, G3_ERR_FORMAT, "%s tensor '%s': bad row size", t->what, name);
    return G3_OK;
}

g3_status g3_roles_check(const g3_role_table *t, const int64_t dims[G3_DIM_N], void *top,
                         void *layers, size_t layer_size, int64_t n_layer, g3_err *err)
{
    g3_role_slot s = {.t = t, .top = top, .layers = layers, .layer_size = layer_size,
                      .n_layer = n_layer};
    int more;
    while ((more = g3_role_next(&s)) > 0) {
        const g3_role *r = s.role;
        const int bound = r->kind == G3_ROLE_MATRIX ? g3_role_matrix(r, s.base)->data != NULL
                                                    : *g3_role_vector(r, s.base) != NULL;
        if (!bound) {
            if (r->optional)
                continue;
            return g3_fail(err, G3_ERR_FORMAT, "missing %s tensor '%s'", t->what, s.name);
        }
        if (r->kind == G3_ROLE_MATRIX) {
            g3_status st = check_matrix(t, r, s.name, g3_role_matrix(r, s.base), dims, err);
            if (st)
                return st;
        }
    }
    return more < 0 ? g3_fail(err, G3_ERR_FORMAT, "%s tensor name too long", t->what) : G3_OK;
}
