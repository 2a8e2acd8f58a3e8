/* siglip.h — the Gemma 3 vision encoder: SigLIP tower + multimodal projector.
 *
 *   x   = im2col(pixels) @ Wpatch^T + bpatch + pos          (P = (S/p)^2 patches, row-major y*side+x)
 *   per layer:  x += Wo attn(LN1(x)) + bo;  x += W2 gelu_tanh(W1 LN2(x) + b1) + b2
 *   x   = LN_post(x)                                        -> "last hidden state" (P, D)
 *   t   = avgpool_k(x) over the side x side grid            (M = (side/k)^2 tokens, row-major)
 *   out = rms(t) * w_mm @ P                                  (M, n_embd_text)
 *
 * Reference: transformers-gemma3.md §3.1-3.2 (SiglipVisionModel, Gemma3MultiModalProjector),
 * llama-cpp-gemma3.md §6.3. Attention is bidirectional over the P patches, scale head_dim^-0.5;
 * LayerNorm with weight and bias; no CLS token, no pooling head.
 *
 * Conventions settled by the role table (model/roles.c) the loaders apply, not here:
 *   - Wpatch is the conv weight (D, 3, p, p) flattened to (D, 3*p*p) in (channel, row, col)
 *     order, which is the order im2col writes a patch;
 *   - w_mm is the full RMSNorm multiplier (1 + w); HF stores w, llama.cpp's mmproj 1 + w;
 *   - the projection is bound as a (n_embd_text, D) matrix, i.e. HF's (D, n_embd_text)
 *     `mm_input_projection_weight` transposed, so y = W x like every other matrix.
 */
#ifndef G3_SIGLIP_H
#define G3_SIGLIP_H

#include "kernels/gemm_bf16.h"
#include "kernels/matmul.h"

/* Filled only from gemma3/vision.py through _core.VisionConfig (csrc/python/py_roles.c). */
typedef struct g3_vision_config_s {
    int64_t image_size, patch_size; /* pixels per side; patch side */
    int64_t n_embd, n_ff, n_layer, n_head;
    int64_t n_mm_tokens;            /* tokens per image after pooling (a square) */
    int64_t n_embd_text;            /* projector output width */
    float eps;                      /* LayerNorm and projector RMSNorm epsilon */
} g3_vision_config;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* (n_embd) */
    g3_weight q, k, v, o;                       /* (n_embd, n_embd) */
    const float *q_b, *k_b, *v_b, *o_b;         /* (n_embd) */
    g3_weight fc1;                              /* (n_ff, n_embd) */
    g3_weight fc2;                              /* (n_embd, n_ff) */
    const float *fc1_b;                         /* (n_ff) */
    const float *fc2_b;                         /* (n_embd) */
} g3_vision_layer;

/* A layer's matrices in the bf16 mode: q/k/v stacked into one (3 n_embd, n_embd) product. */
typedef struct {
    g3_bf16_mat qkv, o, fc1, fc2;
    float *qkv_b; /* (3 n_embd): q_b | k_b | v_b */
} g3_vision_bf16_layer;

typedef struct {
    g3_vision_config cfg;
    int64_t side, n_patches, pool;  /* patches per side, side^2, pooling kernel */
    g3_weight patch;                /* (n_embd, 3 * patch_size^2) */
    const float *patch_b;           /* (n_embd) */
    const float *pos;               /* (n_patches, n_embd) */
    g3_vision_layer *layers;        /* (n_layer) */
    const float *post_w, *post_b;   /* (n_embd) */
    const float *mm_norm;           /* (n_embd) full multiplier 1 + w */
    g3_weight mm_proj;              /* (n_embd_text, n_embd) */
    /* bf16 mode (g3_vision_use_bf16): the matrices converted once, owned; NULL in f32 mode */
    int bf16;
    g3_bf16_mat patch16, proj16;
    g3_vision_bf16_layer *l16;      /* (n_layer) */
} g3_vision;

/* Validates cfg and allocates a tower whose weights the caller binds, then g3_vision_check(). */
g3_status g3_vision_create(const g3_vision_config *cfg, g3_vision **out, g3_err *err);
g3_status g3_vision_check(const g3_vision *v, g3_err *err);
void g3_vision_free(g3_vision *v);
/* Compute mode, after g3_vision_check. on = 1: every matrix converted to bf16 once (packed panels,
 * gemm_bf16.h); products round activations to bf16 and accumulate in float32, attention too. The
 * mode is taken only where kernels/dispatch.c offers the bf16 kernel (g3_isa_bf16()); elsewhere
 * (a CPU without avx512bf16, G3_ISA below avx512) the tower keeps its float32 path and v->bf16
 * stays 0. on = 0 drops the converted matrices. */
g3_status g3_vision_use_bf16(g3_vision *v, int on, g3_err *err);

/* Optional outputs of g3_vision_encode (NULL = not wanted). */
typedef struct {
    float *hidden;      /* (n_patches, n_embd): the tower's last hidden state (after post LN) */
    int64_t attn_layer; /* layer whose attention probabilities are recorded (< 0: none) */
    float *attn;        /* (n_head, n_patches, n_patches) */
} g3_vision_capture;

/* One image: pixels (3, image_size, image_size) channel-first float32 (already in [-1, 1])
 * -> out (n_mm_tokens, n_embd_text). Parallel inside (OpenMP + BLAS, never nested).
 * cp (NULL = none) is checked before every tower layer: a layer of the real tower (4096 patches,
 * width 1152) is ~0.2 TFLOP, one to two seconds on two cores, so an interrupt is seen that soon
 * instead of after the whole image (27 layers). */
g3_status g3_vision_encode(const g3_vision *v, const float *pixels, float *out,
                           const g3_vision_capture *cap, const g3_checkpoint *cp, g3_err *err);

#endif
