/* traits.c — per-type facts (name, block size, bytes per block) for every ggml type id 0..42, and
 * the (de)quantization kernels used for each.
 *
 * Block sizes and bytes follow ggml's type table (reference digest §1.4). Ids that were removed from
 * the format (4, 5, 31-33, 36-38) keep their historical names with known = 0; types whose layout is
 * known but that we cannot compute with (IQ2_XXS, ...) have known = 1 and NULL kernels.
 *
 * Kernel selection: the table starts out holding the scalar references from ref.c and dot_ref.c.
 * select_kernels() runs once, on the first g3_type_get() (or g3_type_get_isa()), and is the single
 * place where ISA variants replace references: per type and slot (to_float, dot_f32), AVX-512 >
 * AVX2 > reference, as far as __builtin_cpu_supports() allows (AVX2 needs avx2+fma+f16c; AVX-512
 * needs avx512f/bw/vl/dq + f16c). A type without a variant at some level keeps the next lower one.
 *
 * The CPU level and the G3_ISA environment variable are kernels/dispatch.c's business: this table
 * builds every level the CPU runs and g3_type_get() serves the one the dispatcher selected
 * (G3_ISA=scalar: the references; G3_ISA=avx2: at most AVX2). g3_type_get_isa() returns the table of one level regardless of G3_ISA, so tests
 * and benchmarks can compare ISAs in one process; g3_type_get_ref() keeps the references reachable
 * as the oracle for tests.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "quant/blocks.h"

#define KNOWN(id, nm, bs, sz, tf, ff, dot)                                                         \
    [id] = {.name = nm, .known = 1, .blck = bs, .type_size = sz, .to_float = tf, .from_float = ff, \
            .dot_f32 = dot}
#define REMOVED(id, nm) [id] = {.name = nm, .known = 0, .blck = 0, .type_size = 0}

static const g3_type_traits ref_table[G3_TYPE_COUNT] = {
    KNOWN(G3_TYPE_F32, "F32", 1, 4, g3_dequant_f32_ref, g3_quant_f32_ref,
          g3_dot_f32_f32_ref),
    KNOWN(G3_TYPE_F16, "F16", 1, 2, g3_dequant_f16_ref, g3_quant_f16_ref,
          g3_dot_f16_f32_ref),
    KNOWN(G3_TYPE_Q4_0, "Q4_0", 32, 18, g3_dequant_q4_0_ref, g3_quant_q4_0_ref,
          g3_dot_q4_0_f32_ref),
    KNOWN(G3_TYPE_Q4_1, "Q4_1", 32, 20, g3_dequant_q4_1_ref, g3_quant_q4_1_ref,
          g3_dot_q4_1_f32_ref),
    REMOVED(4, "Q4_2"),
    REMOVED(5, "Q4_3"),
    KNOWN(G3_TYPE_Q5_0, "Q5_0", 32, 22, g3_dequant_q5_0_ref, g3_quant_q5_0_ref,
          g3_dot_q5_0_f32_ref),
    KNOWN(G3_TYPE_Q5_1, "Q5_1", 32, 24, g3_dequant_q5_1_ref, g3_quant_q5_1_ref,
          g3_dot_q5_1_f32_ref),
    KNOWN(G3_TYPE_Q8_0, "Q8_0", 32, 34, g3_dequant_q8_0_ref, g3_quant_q8_0_ref,
          g3_dot_q8_0_f32_ref),
    KNOWN(G3_TYPE_Q8_1, "Q8_1", 32, 36, NULL, g3_quant_q8_1_ref, NULL),
    KNOWN(G3_TYPE_Q2_K, "Q2_K", 256, 84, g3_dequant_q2_k_ref, NULL,
          g3_dot_q2_k_f32_ref),
    KNOWN(G3_TYPE_Q3_K, "Q3_K", 256, 110, g3_dequant_q3_k_ref, NULL,
          g3_dot_q3_k_f32_ref),
    KNOWN(G3_TYPE_Q4_K, "Q4_K", 256, 144, g3_dequant_q4_k_ref, g3_quant_q4_k_ref,
          g3_dot_q4_k_f32_ref),
    KNOWN(G3_TYPE_Q5_K, "Q5_K", 256, 176, g3_dequant_q5_k_ref, g3_quant_q5_k_ref,
          g3_dot_q5_k_f32_ref),
    KNOWN(G3_TYPE_Q6_K, "Q6_K", 256, 210, g3_dequant_q6_k_ref, g3_quant_q6_k_ref,
          g3_dot_q6_k_f32_ref),
    KNOWN(G3_TYPE_Q8_K, "Q8_K", 256, 292, NULL, g3_quant_q8_k_ref, NULL),
    KNOWN(G3_TYPE_IQ2_XXS, "IQ2_XXS", 256, 66, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ2_XS, "IQ2_XS", 256, 74, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ3_XXS, "IQ3_XXS", 256, 98, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ1_S, "IQ1_S", 256, 50, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ4_NL, "IQ4_NL", 32, 18, g3_dequant_iq4_nl_ref, g3_quant_iq4_nl_ref,
          g3_dot_iq4_nl_f32_ref),
    KNOWN(G3_TYPE_IQ3_S, "IQ3_S", 256, 110, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ2_S, "IQ2_S", 256, 82, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ4_XS, "IQ4_XS", 256, 136, g3_dequant_iq4_xs_ref, NULL,
          g3_dot_iq4_xs_f32_ref),
    KNOWN(G3_TYPE_I8, "I8", 1, 1, NULL, NULL, NULL),
    KNOWN(G3_TYPE_I16, "I16", 1, 2, NULL, NULL, NULL),
    KNOWN(G3_TYPE_I32, "I32", 1, 4, NULL, NULL, NULL),
    KNOWN(G3_TYPE_I64, "I64", 1, 8, NULL, NULL, NULL),
    KNOWN(G3_TYPE_F64, "F64", 1, 8, NULL, NULL, NULL),
    KNOWN(G3_TYPE_IQ1_M, "IQ1_M", 256, 56, NULL, NULL, NULL),
    KNOWN(G3_TYPE_BF16, "BF16", 1, 2, g3_dequant_bf16_ref, g3_quant_bf16_ref,
          g3_dot_bf16_f32_ref),
    REMOVED(31, "Q4_0_4_4"),
    REMOVED(32, "Q4_0_4_8"),
    REMOVED(33, "Q4_0_8_8"),
    KNOWN(G3_TYPE_TQ1_0, "TQ1_0", 256, 54, NULL, NULL, NULL),
    KNOWN(G3_TYPE_TQ2_0, "TQ2_0", 256, 66, NULL, NULL, NULL),
    REMOVED(36, "IQ4_NL_4_4"),
    REMOVED(37, "IQ4_NL_4_8"),
    REMOVED(38, "IQ4_NL_8_8"),
    KNOWN(G3_TYPE_MXFP4, "MXFP4", 32, 17, NULL, NULL, NULL),
    KNOWN(G3_TYPE_NVFP4, "NVFP4", 64, 36, NULL, NULL, NULL),
    KNOWN(G3_TYPE_Q1_0, "Q1_0", 128, 18, NULL, NULL, NULL),
    KNOWN(G3_TYPE_Q2_0, "Q2_0", 64, 18, NULL, NULL, NULL),
};

static const g3_type_traits unknown_type = {.name = "unknown", .known = 0};

static g3_type_traits tables[G3_ISA_COUNT][G3_TYPE_COUNT]; /* [isa][type], cumulative */
static int8_t kernel_isa[G3_ISA_COUNT][G3_TYPE_COUNT][2];   /* ISA of [..][..][to_float, dot_f32] */
static int isa_cpu = G3_ISA_SCALAR, isa_selected = G3_ISA_SCALAR; /* from the dispatcher */
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

typedef struct {
    int type;
    g3_to_float_fn to_float;
    g3_dot_f32_fn dot_f32;
} isa_variant;

#define VARIANT(id, name, isa) {id, g3_dequant_##name##_##isa, g3_dot_##name##_f32_##isa}
/* F32's to_float stays the reference memcpy: nothing to decode. */
#define VARIANTS(isa)                                                                             \
    {                                                                                             \
        {G3_TYPE_F32, NULL, g3_dot_f32_f32_##isa}, VARIANT(G3_TYPE_F16, f16, isa),                \
            VARIANT(G3_TYPE_BF16, bf16, isa), VARIANT(G3_TYPE_Q4_0, q4_0, isa),                   \
            VARIANT(G3_TYPE_Q5_0, q5_0, isa), VARIANT(G3_TYPE_Q8_0, q8_0, isa),                   \
            VARIANT(G3_TYPE_Q4_K, q4_k, isa), VARIANT(G3_TYPE_Q6_K, q6_k, isa),                   \
    }

static const isa_variant avx2_variants[] = VARIANTS(avx2);
static const isa_variant avx512_variants[] = VARIANTS(avx512);

static void overlay(int isa, const isa_variant *v, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (v[i].to_float) {
            tables[isa][v[i].type].to_float = v[i].to_float;
            kernel_isa[isa][v[i].type][0] = (int8_t)isa;
        }
        if (v[i].dot_f32) {
            tables[isa][v[i].type].dot_f32 = v[i].dot_f32;
            kernel_isa[isa][v[i].type][1] = (int8_t)isa;
        }
    }
}

static void select_kernels(void)
{
    for (int t = 0; t < G3_TYPE_COUNT; t++) {
        tables[G3_ISA_SCALAR][t] = ref_table[t];
        kernel_isa[G3_ISA_SCALAR][t][0] = (int8_t)(ref_table[t].to_float ? G3_ISA_SCALAR : -1);
        kernel_isa[G3_ISA_SCALAR][t][1] = (int8_t)(ref_table[t].dot_f32 ? G3_ISA_SCALAR : -1);
    }
    for (int isa = 1; isa < G3_ISA_COUNT; isa++) { /* each level starts from the one below */
        memcpy(tables[isa], tables[isa - 1], sizeof tables[isa]);
        memcpy(kernel_isa[isa], kernel_isa[isa - 1], sizeof kernel_isa[isa]);
    }
    isa_cpu = g3_isa_cpu();
    if (isa_cpu >= G3_ISA_AVX2) {
        overlay(G3_ISA_AVX2, avx2_variants, sizeof avx2_variants / sizeof avx2_variants[0]);
        overlay(G3_ISA_AVX512, avx2_variants, sizeof avx2_variants / sizeof avx2_variants[0]);
    }
    if (isa_cpu >= G3_ISA_AVX512)
        overlay(G3_ISA_AVX512, avx512_variants, sizeof avx512_variants / sizeof avx512_variants[0]);
    isa_selected = g3_isa_selected();
}

const g3_type_traits *g3_type_get(int type)
{
    if (type < 0 || type >= G3_TYPE_COUNT)
        return &unknown_type;
    pthread_once(&table_once, select_kernels);
    return &tables[isa_selected][type];
}

const g3_type_traits *g3_type_get_isa(int type, int isa)
{
    pthread_once(&table_once, select_kernels);
    if (isa < 0 || isa > isa_cpu)
        return NULL;
    if (type < 0 || type >= G3_TYPE_COUNT)
        return &unknown_type;
    return &tables[isa][type];
}

int g3_type_kernel_isa(int type, int which)
{
    pthread_once(&table_once, select_kernels);
    if (type < 0 || type >= G3_TYPE_COUNT || which < 0 || which > 1)
        return -1;
    return kernel_isa[isa_selected][type][which];
}

const g3_type_traits *g3_type_get_ref(int type)
{
    if (type < 0 || type >= G3_TYPE_COUNT)
        return &unknown_type;
    return &ref_table[type];
}

size_t g3_row_size(int type, int64_t n)
{
    const g3_type_traits *t = g3_type_get(type);
    if (!t->known || n < 0 || n % t->blck != 0)
        return 0;
    if ((uint64_t)(n / t->blck) > SIZE_MAX / t->type_size)
        return 0; /* would not fit in memory anyway */
    return (size_t)(n / t->blck) * t->type_size;
}
