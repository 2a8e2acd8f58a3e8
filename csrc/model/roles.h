/* roles.h — the one table of tensor roles: for every weight the text decoder and the vision tower
 * use, its name in the weights dict (and in errors), its names in GGUF / mmproj files and in
 * Hugging Face safetensors checkpoints, its kind, its expected (rows, cols) as symbols of the
 * config, the conventions a loader applies per format, and the struct field it binds.
 *
 * Read by: the binding (csrc/python/py_model.c, py_vision.c walk it to bind), the checks
 * (g3_model_check, g3_vision_check walk it to validate shapes), and the Python loaders through
 * _core.tensor_roles() (gemma3/loader.py, gemma3/vision.py, gemma3/convert.py build their weight
 * dicts and files from it). Nowhere else is a tensor name written down.
 *
 * Name patterns: "{i}" is the layer index; in Hugging Face names "{t}" is the text model's prefix
 * (e.g. "model.language_model."), "{v}" the vision tower's, "{m}" the projector's (found by the
 * loader). Matrices are (rows, cols) with y = W x (GGUF ne = [cols, rows], HF Linear [out, in]).
 */
#ifndef G3_ROLES_H
#define G3_ROLES_H

#include <stddef.h>

#include "model/model.h"
#include "vision/siglip.h"

/* Sizes a tensor shape is made of; values come from a config (g3_text_dims, g3_vision_dims). */
typedef enum {
    G3_DIM_ONE,
    /* text decoder */
    G3_DIM_VOCAB, G3_DIM_EMBD, G3_DIM_QDIM, G3_DIM_KVDIM, G3_DIM_HEAD, G3_DIM_FF,
    /* vision tower + projector */
    G3_DIM_V_EMBD, G3_DIM_V_FF, G3_DIM_V_PATCH, G3_DIM_V_PATCHES, G3_DIM_V_TEXT,
    G3_DIM_N
} g3_dim;

/* "n_head*head_dim", ... : how a symbol is written in messages and in _core.tensor_roles() */
extern const char *const g3_dim_names[G3_DIM_N];

typedef enum { G3_ROLE_MATRIX, G3_ROLE_VECTOR } g3_role_kind;

/* Conventions a loader applies to a tensor read from one format (flags). */
enum {
    G3_CONV_ADD_ONE = 1,   /* RMSNorm stored as w: bind 1 + w (HF; GGUF files store 1 + w) */
    G3_CONV_FLATTEN = 2,   /* (rows, a, b, ...) -> (rows, a*b*...): the patch conv kernel */
    G3_CONV_TRANSPOSE = 4, /* the file holds W^T: the projector's x @ P, bound as P^T */
    G3_CONV_KEEP_F32 = 8,  /* never quantized on load (llama.cpp keeps it F32 too) */
};

typedef struct {
    const char *key;      /* weights-dict name, e.g. "blk.{i}.attn_q" */
    const char *gguf;     /* GGUF tensor name */
    const char *gguf_alt; /* older GGUF name holding this role when its shape says so, or NULL */
    const char *hf;       /* safetensors name */
    const char *hf_alt;   /* another safetensors name, or NULL */
    int per_layer;
    g3_role_kind kind;    /* matrix: g3_weight; vector: const float * of rows*cols floats */
    int optional;
    const char *tie;      /* when absent, the key of the role bound instead (tied LM head) */
    g3_dim rows, cols;    /* expected shape; a vector has rows * cols values */
    unsigned hf_conv, gguf_conv;
    const char *field;    /* "g3_layer.q": the struct field it binds, for tests and messages */
    size_t offset;        /* of that field in g3_layer / g3_model (g3_vision_layer / g3_vision) */
} g3_role;

typedef struct g3_role_table_s {
    const char *name; /* "text" | "vision" */
    const char *what; /* how messages name its tensors: "model" | "vision" */
    const g3_role *roles;
    int n;
} g3_role_table;

extern const g3_role_table g3_text_roles, g3_vision_roles;

void g3_text_dims(const g3_config *c, int64_t dims[G3_DIM_N]);
void g3_vision_dims(const g3_vision_config *c, int64_t dims[G3_DIM_N]);

/* The role's field in the struct at base (a g3_layer for per-layer roles, else the model). */
static inline g3_weight *g3_role_matrix(const g3_role *r, void *base)
{
    return (g3_weight *)((char *)base + r->offset);
}
static inline const float **g3_role_vector(const g3_role *r, void *base)
{
    return (const float **)((char *)base + r->offset);
}

/* pattern with "{i}" replaced by layer (< 0: left as is); 0, or -1 when it does not fit. */
int g3_role_name(const char *pattern, int64_t layer, char *buf, size_t n);

/* One (role, layer) slot of a table over a model's structs: the role, the struct its field lives in
 * (base: a layer for per-layer roles, else top) and the slot's name ("blk.3.attn_q"). */
typedef struct {
    const g3_role_table *t;
    void *top, *layers;
    size_t layer_size;
    int64_t n_layer;
    int j;     /* role index; start at 0 */
    int64_t i; /* layer index within a per-layer role; start at 0 */
    const g3_role *role;
    void *base;
    char name[96];
} g3_role_slot;

/* Moves to the next slot: 1 while there is one, 0 at the end, -1 if its name does not fit. Start
 * from {.t, .top, .layers, .layer_size, .n_layer} (j and i zero). Binding and checks walk the
 * table with it, so both see the same slots in the same order. */
int g3_role_next(g3_role_slot *s);

/* Walks the table over bound structs: every required role bound, every matrix of the expected
 * shape and a computable type. Errors name the tensor, the expected and the actual shape. */
g3_status g3_roles_check(const g3_role_table *t, const int64_t dims[G3_DIM_N], void *top,
                         void *layers, size_t layer_size, int64_t n_layer, g3_err *err);

#endif
