/* ops.h — single-threaded compute kernels over float32 rows. Callers (matmul, forward driver,
 * vision tower) split work into ranges and open the parallel regions; kernels never do.
 * One file per operation: vec.c (dot, axpy), norm.c, rope.c, act.c (GELU/GeGLU, exp, softmax),
 * attention.c, matmul.c; SIMD levels are chosen once by kernels/dispatch.c (G3_ISA). */
#ifndef G3_OPS_H
#define G3_OPS_H

#include "g3.h"

/* vec.c: sum_i a[i]*b[i], float accumulation in SIMD lanes (AVX-512 / AVX2+FMA / scalar) */
float g3_dot_f32(const float *a, const float *b, int64_t n);
/* y[i] += a * x[i] */
void g3_axpy_f32(float a, const float *x, float *y, int64_t n);

/* norm.c. Gemma RMSNorm: y = x / sqrt(mean(x^2) + eps) * w. The (1 + w) convention is settled by the
 * loaders: w here is always the full multiplier (GGUF stores 1 + w; HF checkpoints get 1 added at
 * load). Sum of squares in double. y may alias x. */
void g3_rmsnorm_f32(const float *x, const float *w, float *y, int64_t n, float eps);
/* SigLIP LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b, biased variance. y may alias x. */
void g3_layernorm_f32(const float *x, const float *w, const float *b, float *y, int64_t n,
                      float eps);

/* rope.c. NeoX / split-halves RoPE of one head vector x (d): pairs (i, i + d/2) rotated by
 * theta_i = (float)pos * inv_freq[i], computed in float like the reference, cos/sin in double. */
void g3_rope_neox_f32(float *x, int64_t d, int64_t pos, const float *inv_freq);
/* The same rotation split in two: cs (d) = [cos theta_i | sin theta_i] for a position, computed
 * once and applied to every head of every layer of that kind (bit-identical to the above). */
void g3_rope_table(float *cs, int64_t d, int64_t pos, const float *inv_freq);
void g3_rope_apply_f32(float *x, int64_t d, const float *cs);
/* inv_freq[i] = 1 / base^(2i/d) * freq_scale, i < d/2 (float, as in the reference). */
void g3_rope_inv_freq(float *inv_freq, int64_t d, float base, float freq_scale);

/* act.c. tanh-approximation GELU (gelu_pytorch_tanh, scalar reference) and GeGLU:
 * out = gelu(gate) * up (out may alias gate) */
float g3_gelu_tanh(float x);
void g3_geglu_f32(const float *gate, const float *up, float *out, int64_t n);
/* x[i] = gelu(x[i] + b[i]) (SigLIP's MLP: fc1 bias then GELU) */
void g3_gelu_bias_f32(float *x, const float *b, int64_t n);
/* x[i] = exp(x[i] - m) in place; returns the sum */
double g3_expsum_f32(float *x, int64_t n, float m);
/* In-place numerically stable softmax over n entries. */
void g3_softmax_f32(float *x, int64_t n);
/* The index of the largest of n >= 1 entries, the lowest on ties (a NaN is never larger). */
int32_t g3_argmax_f32(const float *l, int64_t n);

/* ---- SIMD variant sets, one per instruction-set level (kernels/dispatch.c picks one) ---------- */

/* Kernel ISA levels, in increasing order of preference. */
enum { G3_ISA_SCALAR = 0, G3_ISA_AVX2 = 1, G3_ISA_AVX512 = 2, G3_ISA_COUNT = 3 };

/* The float kernels that have SIMD variants, one entry per operation, one set per level.
 * Each variant is a function of the kernel's file (vec.c, act.c), scalar reference first. */
typedef struct {
    float (*dot)(const float *a, const float *b, int64_t n);          /* vec.c */
    void (*axpy)(float a, const float *x, float *y, int64_t n);       /* vec.c */
    double (*expsum)(float *x, int64_t n, float m);                   /* act.c */
    void (*softmax)(float *x, int64_t n);                             /* act.c */
    void (*geglu)(const float *gate, const float *up, float *out, int64_t n); /* act.c */
    void (*gelu_bias)(float *x, const float *b, int64_t n);          /* act.c */
} g3_float_kernels;

/* Per-ISA variant sets, defined next to their scalar references. */
void g3_vec_kernels(int isa, g3_float_kernels *k); /* vec.c: dot, axpy */
void g3_act_kernels(int isa, g3_float_kernels *k); /* act.c: expsum, softmax, geglu, gelu_bias */

#endif
