/* dispatch.h — the one place that decides which instruction set the kernels use.
 *
 * The CPU is probed once (__builtin_cpu_supports) and the environment variable G3_ISA is read once,
 * at the first question asked: G3_ISA=scalar forces the scalar references, G3_ISA=avx2 stops at AVX2,
 * anything else (or unset) takes the best level the CPU runs; it can never raise the level above
 * what the CPU supports. Levels: AVX2 = avx2+fma+f16c, AVX-512 = avx512f/bw/vl/dq + the AVX2 set.
 *
 * Every consumer asks here: the float kernels (one table of ops.h's variant sets, filled from the
 * selected level; the public g3_dot_f32, g3_softmax_f32, ... call through it), the
 * quantized traits table (quant/traits.c picks its per-type variants up to g3_isa_selected()), and
 * the packed VNNI decode kernels (g3_isa_vnni()).
 */
#ifndef G3_KERNELS_DISPATCH_H
#define G3_KERNELS_DISPATCH_H

#include "kernels/ops.h"


int g3_isa_cpu(void);           /* best level this CPU runs */
int g3_isa_selected(void);      /* the level in use (lowered by G3_ISA) */
const char *g3_isa_env(void);   /* G3_ISA as read at start-up, NULL if unset */
const char *g3_isa_name(int isa); /* "scalar", "avx2", "avx512", or "none" */
/* 1 if the packed AVX-512 VNNI decode kernels may run: level AVX-512 selected and the CPU has
 * avx512vnni. */
int g3_isa_vnni(void);
/* 1 if the bf16 GEMM (kernels/gemm_bf16.c) may use VDPBF16PS: level AVX-512 selected and the CPU
 * has avx512bf16. Otherwise the vision tower's bf16 mode runs its float32 path. */
int g3_isa_bf16(void);


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


#endif
