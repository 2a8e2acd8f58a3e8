/* model.h — Gemma 3 text decoder: configuration, bound weights, KV cache, forward pass.
 *
 * Weights are (rows, cols) matrices of any dequantizable ggml type, rows contiguous, kept where
 * the loader put them (the file mapping, or model-owned memory for converted tensors); the model
 * never copies them. Norm weights are float32 and already hold the full multiplier (1 + w).
 */
#ifndef G3_MODEL_H
#define G3_MODEL_H

#include "g3.h"
#include "kernels/matmul.h" /* g3_weight */

/* Filled only from gemma3/config.py through _core.TextConfig (csrc/python/py_roles.c): no
 * defaults live in C. */
typedef struct g3_config_s {
    int64_t n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff;
    int64_t window;      /* sliding-window keys incl. the current one (0 = no sliding layers) */
    int64_t max_seq;     /* positions the cache holds */
    float eps;           /* RMSNorm epsilon */
    float attn_scale;    /* query_pre_attn_scalar^-0.5 */
    float embd_scale;    /* sqrt(n_embd), token inputs only */
    float final_softcap; /* 0 = off */
    float rope_base_global, rope_scale_global; /* freq_scale = 1 / linear factor */
    float rope_base_local, rope_scale_local;
} g3_config;

/* Positions a local ring keeps beyond the window, so that the last G3_KV_RING_MARGIN + 1
 * positions can be dropped (a rejected speculative draft, an edited last turn) without recompute:
 * the rollback rule of g3_model_truncate. 32 slots of K and V per local layer (e.g. +6% on the
 * 270M's 512-slot rings). */
#define G3_KV_RING_MARGIN 32

typedef struct {
    int is_global;
    g3_weight q, k, v, o, gate, up, down;
    const float *attn_norm, *q_norm, *k_norm, *post_attn_norm, *ffn_norm, *post_ffn_norm;
    /* cache slots of this layer in every sequence: max_seq for global layers, a ring of
     * min(window + G3_KV_RING_MARGIN, max_seq) for local layers (the last `window` positions are
     * all it reads; the margin is history kept for rollback, model/state.h) */
    int64_t n_slots;
} g3_layer;

/* The KV cache of one sequence. Per layer, k[i] and v[i] are (n_slots, n_head_kv, head_dim)
 * elements of the model's kv_type (G3_TYPE_F32, F16, BF16 or Q8_0: a slot is n_head_kv rows of
 * g3_row_size(kv_type, head_dim) bytes, q8_0 blocks never straddle heads); keys are stored after
 * k-norm and RoPE, values raw, converted once when stored (round-to-nearest-even for f16/bf16,
 * ggml's block_q8_0 rule for q8_0) and read in that type by the attention kernels. Global layers:
 * slot = position; local layers: slot = position % n_slots, so a ring holds positions
 * n_past - n_slots .. n_past - 1. */
typedef struct {
    int64_t n_past;     /* positions cached */
    uint8_t **k, **v;   /* (n_layer) */
} g3_seq;

/* Optional per-op timing of a model's forward passes (seconds accumulated while enabled). */
enum {
    G3_PROF_EMBED, G3_PROF_NORM, G3_PROF_QKV, G3_PROF_ROPE, G3_PROF_ATTN, G3_PROF_OPROJ,
    G3_PROF_GATE_UP, G3_PROF_GEGLU, G3_PROF_DOWN, G3_PROF_LM_HEAD, G3_PROF_N
};
typedef struct {
    int enabled;
    double seconds[G3_PROF_N];
    int64_t forwards, tokens;
} g3_profile;
extern const char *const g3_prof_names[G3_PROF_N];

struct g3_run_s; /* model/run.h */

typedef struct g3_model {
    g3_config cfg;
    g3_weight tok_embd; /* (n_vocab, n_embd) */
    g3_weight output;   /* LM head; the tied embedding when the file has none */
    const float *output_norm;
    g3_layer *layers;   /* (n_layer) */
    g3_seq *seqs;       /* (n_seq) independent caches; sequence 0 is the default */
    int n_seq;
    int kv_type;        /* ggml type id of the cached K/V (G3_TYPE_F32 unless set) */
    size_t kv_head_bytes; /* bytes of one head's row: g3_row_size(kv_type, head_dim) */
    float *inv_freq_global, *inv_freq_local; /* (head_dim / 2) */
    struct g3_packed_s **packs; /* what g3_model_pack made, freed with the model */
    int n_packs;
    struct g3_run_s *run; /* forward-pass buffers (model/run.h), grown between calls only */
    g3_lora *loras;       /* (n_loras) the active low-rank deltas (model/lora.c), or NULL */
    int64_t n_loras;
    float *lora_u;        /* their scratch: (sum of ranks, G3_LORA_CHUNK) floats */
    g3_profile prof;      /* this model's per-op timings (forward.c; read by Model.profile) */
} g3_model;

/* Creates a model over cfg with layers' weights to be bound by the caller (fields of
 * m->layers[i] and m->tok_embd / output / output_norm), then g3_model_check() validates. */
g3_status g3_model_create(const g3_config *cfg, const uint8_t *is_global, g3_model **out,
                          g3_err *err);
g3_status g3_model_check(const g3_model *m, g3_err *err);
/* Repacks every matrix the decode path multiplies (layers and LM head) whose type has a packed
 * kernel on this CPU (quant/packed.h); returns the bytes it allocated in *bytes. Optional: without
 * it decoding uses the float dequantize-and-dot kernels. */
g3_status g3_model_pack(g3_model *m, size_t *bytes, g3_err *err);
/* Opt-in: the packed prefill GEMM quantizes activations to `digits` base-256 digits per
 * 32-block, 2 (16 bits) or 1 (8 bits), instead of 3 (24 bits, the default; any other value)
 * (kernels/matmul.h); faster, logits within benchmarks/results/prefill.md's figures, not the
 * reference tolerances. */
void g3_model_set_prefill_digits(g3_model *m, int digits);
/* Sets the number of sequences with a KV cache (>= 1; lazily-touched zeroed memory). Existing
 * sequences keep their contents. */
g3_status g3_model_set_n_seq(g3_model *m, int n, g3_err *err);
void g3_model_free(g3_model *m);
/* Sets the type the KV cache stores (G3_TYPE_F32, F16, BF16, or Q8_0 when head_dim % 32 == 0)
 * before the first g3_model_set_n_seq; later, every sequence is reallocated empty. */
g3_status g3_model_set_kv_type(g3_model *m, int type, g3_err *err);
/* Bytes one sequence's cache takes for a configuration and K/V type (0 if the type cannot hold
 * heads of head_dim): every layer's slots x n_head_kv x the type's head row, K and V. */
size_t g3_kv_cache_bytes(const g3_config *c, const uint8_t *is_global, int type);
void g3_model_reset(g3_model *m, int seq); /* seq < 0: every sequence */
/* Drops cached positions >= n of a sequence when its local rings still hold what position n
 * will read (positions >= n - window + 1): n >= n_past - 1 - G3_KV_RING_MARGIN, or nothing
 * has wrapped yet. Returns 1 on success, 0 if not (model/state.h: restore a ring checkpoint and
 * recompute from there instead). */
int g3_model_truncate(g3_model *m, int seq, int64_t n);
size_t g3_model_cache_bytes(const g3_model *m); /* of one sequence */
int64_t g3_model_ring_slots(const g3_config *c); /* slots of a local layer's ring */
/* Makes sequence dst hold the same cached context as src (copies the used slots). */
g3_status g3_model_copy_seq(g3_model *m, int src, int dst, g3_err *err);

/* Optional capture of one layer's internals, into caller-owned buffers (NULL = not captured).
 * Attention maps cover the selected heads and query rows [q0, q1) of the batch, over every key
 * position 0 .. n_past + T - 1: pattern holds probabilities (exactly 0 where masked), scores the
 * scaled pre-softmax logits (-inf where masked). */
typedef struct {
    float *pattern, *scores;          /* (n_heads_sel, q1 - q0, n_past + T) */
    const int32_t *heads;             /* (n_heads_sel) query heads to record */
    int64_t n_heads_sel, q0, q1;
    float *q, *z;                     /* (T, n_head, head_dim): post norm+RoPE query; attn output */
    float *k, *v;                     /* (T, n_head_kv, head_dim): post norm+RoPE key; value */
    float *resid_pre, *resid_mid, *resid_post; /* (T, n_embd) */
    float *attn_out, *mlp_out;        /* (T, n_embd): what each sublayer adds to the residual */
} g3_layer_capture;

typedef struct {
    g3_layer_capture *layers; /* (n_layer) or NULL */
    float *final_norm;        /* (T, n_embd) the residual after the final norm, or NULL */
} g3_capture;

/* Input of one forward call: T tokens in n_groups contiguous groups; group g holds group_len[g]
 * tokens of sequence group_seq[g], at its positions n_past .. n_past + len - 1 (each sequence at
 * most once per call). NULL group arrays mean one group: sequence 0, all T tokens. */
typedef struct {
    int64_t n_tokens;
    const int32_t *ids;   /* (T) */
    const float *embd;    /* optional (T, n_embd): rows used where embd_mask[t] != 0, unscaled;
                           * a run of equal non-zero mask values is one image: bidirectional */
    const uint8_t *embd_mask;
    int64_t n_groups;
    const int32_t *group_seq; /* (n_groups) */
    const int64_t *group_len; /* (n_groups) */
    int logits_mode;      /* 0: none, 1: last token of each group, 2: every token, 3: every
                           * token's arg-max only (greedy; g3_matmul_argmax) into argmax */
    float *logits;        /* (n_groups or T, n_vocab); scratch in mode 3 */
    int32_t *argmax;      /* mode 3: (T) the index g3_argmax_f32 gives on each row's logits */
    const g3_capture *capture; /* optional; single-group calls only */
    const struct g3_hooks_s *hooks; /* optional interventions (model/hooks.h); single-group */
} g3_batch;

g3_status g3_model_forward(g3_model *m, const g3_batch *b, g3_err *err);
/* The input rules of a forward call for one sequence's n tokens at position n_past (room in the
 * cache, token ids in the vocabulary unless mask[t] != 0), as g3_model_forward applies them. */
g3_status g3_model_check_tokens(const g3_model *m, int64_t n_past, const int32_t *ids,
                                const uint8_t *mask, int64_t n, g3_err *err);

/* model/lora.c. One low-rank delta to attach: W += scale * B A on the per-layer matrix `key` of the
 * role table ("blk.3.attn_q", ... "blk.3.ffn_down"). A (rank, cols) and Bt = B^T (rank, rows)
 * float32, row-major, kept alive by the caller while attached (the model does not copy them). */
typedef struct {
    const char *key;
    int64_t rank;
    float scale;
    const float *A, *Bt;
    int64_t a_rows, a_cols, bt_rows, bt_cols; /* the arrays' shapes, checked against the matrix */
} g3_lora_spec;

/* Replaces the active deltas by specs[0..n) (n = 0: none), all or nothing; deltas on the same
 * matrix are summed in the given order. Every sequence's KV cache is emptied: it was computed
 * with other weights. */
g3_status g3_model_set_lora(g3_model *m, const g3_lora_spec *specs, int64_t n, g3_err *err);

#endif
