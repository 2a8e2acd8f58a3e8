/* dispatch.h — the one place that decides which instruction set the kernels use.
 *
 * The CPU is probed once (__builtin_cpu_supports) and the environment variable G3_ISA is read once,
 * at the first question asked: G3_ISA=scalar forces the scalar references, G3_ISA=avx2 stops at AVX2,
 * anything else (or unset) takes the best level the CPU runs; it can never raise the level above
 * what the CPU supports. Levels: AVX2 = avx2+fma+f16c, AVX-512 = avx512f/bw/vl/dq + the AVX2 set.
 *
 * Every consumer asks here: the float kernels below (one table filled from the selected level), the
 * quantized traits table (quant/traits.c picks its per-type variants up to g3_isa_selected()), and
 * the packed VNNI decode kernels (g3_isa_vnni()).
 */
#ifndef G3_KERNELS_DISPATCH_H
#define G3_KERNELS_DISPATCH_H

#include "g3.h"

/* Kernel ISA levels, in increasing order of preference. */
enum { G3_ISA_SCALAR = 0, G3_ISA_AVX2 = 1, G3_ISA_AVX512 = 2, G3_ISA_COUNT = 3 };

int g3_isa_cpu(void);           /* best level this CPU runs */
int g3_isa_selected(void);      /* the level in use (lowered by G3_ISA) */
const char *g3_isa_env(void);   /* G3_ISA as read at start-up, NULL if unset */
const char *g3_isa_name(int isa); /* "scalar", "avx2", "avx512", or "none" */
/* 1 if the packed AVX-512 VNNI decode kernels may run: level AVX-512 selected and the CPU has
 * avx512vnni. */
int g3_isa_vnni(void);

/* The float kernels that have SIMD variants, one entry per operation, all from the selected level.
 * Each variant is a function of the kernel's file (vec.c, act.c), scalar reference first. */
typedef struct {
    float (*dot)(const float *a, const float *b, int64_t n);          /* vec.c */
    void (*axpy)(float a, const float *x, float *y, int64_t n);       /* vec.c */
    double (*expsum)(float *x, int64_t n, float m);                   /* act.c */
    void (*softmax)(float *x, int64_t n);                             /* act.c */
    void (*geglu)(const float *gate, const float *up, float *out, int64_t n); /* act.c */
    void (*gelu_bias)(float *x, const float *b, int64_t n);          /* act.c */
} g3_float_kernels;

/* The table of one level (NULL if the CPU cannot run it): tests compare levels in one process. */
const g3_float_kernels *g3_float_kernels_isa(int isa);

extern g3_float_kernels g3_fk_selected; /* filled once by g3_dispatch_init(); read via g3_fk() */
extern int g3_fk_ready;
void g3_dispatch_init(void);

/* The selected table: one acquire load and a branch, cheap enough for per-row kernels. */
static inline const g3_float_kernels *g3_fk(void)
{
    if (!__atomic_load_n(&g3_fk_ready, __ATOMIC_ACQUIRE))
        g3_dispatch_init();
    return &g3_fk_selected;
}

/* What was picked, kernel by kernel, for reports and tests: names[i] ran at level isa[i].
 * Includes the scalar-only kernels (rmsnorm, layernorm, rope). Returns the count (<= cap). */
int g3_float_kernels_report(const char **names, int *isa, int cap);

/* Per-ISA variant sets, defined next to their scalar references. */
void g3_vec_kernels(int isa, g3_float_kernels *k); /* vec.c: dot, axpy */
void g3_act_kernels(int isa, g3_float_kernels *k); /* act.c: expsum, softmax, geglu, gelu_bias */

#endif
