/* dispatch.c — CPU probe, G3_ISA, and the selected float-kernel table (see dispatch.h). */
#include "kernels/dispatch.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

g3_float_kernels g3_fk_selected;
int g3_fk_ready;

static int isa_cpu = G3_ISA_SCALAR, isa_selected = G3_ISA_SCALAR, has_vnni = 0, has_bf16 = 0;
static char isa_env[16]; /* G3_ISA as read (truncated), "" if unset */
static int isa_env_set = 0;
static g3_float_kernels tables[G3_ISA_COUNT];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int detect_cpu(void)
{
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c");
    if (!avx2)
        return G3_ISA_SCALAR;
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? G3_ISA_AVX512 : G3_ISA_AVX2;
}

static void init_once(void)
{
    isa_cpu = detect_cpu();
    isa_selected = isa_cpu;
    const char *env = getenv("G3_ISA");
    if (env) { /* keep a copy: a later setenv() may free the original */
        isa_env_set = 1;
        strncpy(isa_env, env, sizeof isa_env - 1);
    }
    if (env && strcmp(env, "scalar") == 0)
        isa_selected = G3_ISA_SCALAR;
    else if (env && strcmp(env, "avx2") == 0 && isa_selected > G3_ISA_AVX2)
        isa_selected = G3_ISA_AVX2;
    has_vnni = isa_cpu >= G3_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
    has_bf16 = isa_cpu >= G3_ISA_AVX512 && __builtin_cpu_supports("avx512bf16");
    for (int isa = 0; isa <= isa_cpu; isa++) {
        g3_vec_kernels(isa, &tables[isa]);
        g3_act_kernels(isa, &tables[isa]);
    }
    g3_fk_selected = tables[isa_selected];
    __atomic_store_n(&g3_fk_ready, 1, __ATOMIC_RELEASE);
}

void g3_dispatch_init(void) { pthread_once(&once, init_once); }

int g3_isa_cpu(void)
{
    g3_dispatch_init();
    return isa_cpu;
}

int g3_isa_selected(void)
{
    g3_dispatch_init();
    return isa_selected;
}

const char *g3_isa_env(void)
{
    g3_dispatch_init();
    return isa_env_set ? isa_env : NULL;
}

int g3_isa_vnni(void)
{
    g3_dispatch_init();
    return has_vnni && isa_selected >= G3_ISA_AVX512;
}

int g3_isa_bf16(void)
{
    g3_dispatch_init();
    return has_bf16 && isa_selected >= G3_ISA_AVX512;
}

const char *g3_isa_name(int isa)
{
    static const char *const names[G3_ISA_COUNT] = {"scalar", "avx2", "avx512"};
    return isa >= 0 && isa < G3_ISA_COUNT ? names[isa] : "none";
}

const g3_float_kernels *g3_float_kernels_isa(int isa)
{
    g3_dispatch_init();
    return isa >= 0 && isa <= isa_cpu ? &tables[isa] : NULL;
}

/* The level of the table whose entry is the selected one: measured, not assumed. */
#define PICKED(slot)                                                                               \
    do {                                                                                           \
        int l_ = 0;                                                                                \
        while (l_ < isa_cpu && tables[l_].slot != g3_fk_selected.slot)                            \
            l_++;                                                                                  \
        if (n < cap) {                                                                             \
            names[n] = #slot;                                                                      \
            isa[n++] = tables[l_].slot == g3_fk_selected.slot ? l_ : -1;                          \
        }                                                                                          \
    } while (0)

int g3_float_kernels_report(const char **names, int *isa, int cap)
{
    static const char *const scalar_only[] = {"rmsnorm", "layernorm", "rope"};
    g3_dispatch_init();
    int n = 0;
    PICKED(dot);
    PICKED(axpy);
    PICKED(expsum);
    PICKED(softmax);
    PICKED(geglu);
    PICKED(gelu_bias);
    for (size_t i = 0; i < sizeof scalar_only / sizeof scalar_only[0] && n < cap; i++, n++) {
        names[n] = scalar_only[i];
        isa[n] = G3_ISA_SCALAR;
    }
    return n;
}

/* The public float kernels (ops.h) run the selected level's variant. */
float g3_dot_f32(const float *a, const float *b, int64_t n) { return g3_fk()->dot(a, b, n); }

void g3_axpy_f32(float a, const float *x, float *y, int64_t n) { g3_fk()->axpy(a, x, y, n); }

void g3_geglu_f32(const float *gate, const float *up, float *out, int64_t n)
{
    g3_fk()->geglu(gate, up, out, n);
}

double g3_expsum_f32(float *x, int64_t n, float m) { return g3_fk()->expsum(x, n, m); }

void g3_softmax_f32(float *x, int64_t n) { g3_fk()->softmax(x, n); }

void g3_gelu_bias_f32(float *x, const float *b, int64_t n) { g3_fk()->gelu_bias(x, b, n); }
