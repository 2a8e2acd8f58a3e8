/* dot_ref.c — scalar reference fused dequantize-and-dot with float32 activations:
 *     dot(w, x) = sum_i dequant(w)[i] * x[i],   w one row of n elements (n / blck blocks), x (n,).
 *
 * The slow, obvious version and the oracle for dot_avx2.c / dot_avx512.c: each block (or chunk of 32
 * elements for the float formats, whose "block" is one element) is decoded into a stack buffer by
 * the to_float reference of ref.c, so the weights are exactly the reference dequantization. Every
 * 32 elements are summed into a float partial, partials into a per-chunk sum, chunk sums into the
 * total: the longest chain of float32 roundings is 32 + chunk / 32 + n / chunk additions, short
 * enough for the dot tolerance of tests/tolerances.py (DOT_F32_REL). No FMA: ISO C mode keeps
 * products and sums separately rounded.
 */
#include "quant/blocks.h"

#define FLOAT_CHUNK 32 /* elements decoded at a time for F32 / F16 / BF16 */

/* Dot of n elements of a format whose blocks of `blck` elements take `bytes` bytes each, decoded
 * `step` elements at a time (step a multiple of blck, at most 256, n a multiple of blck). */
static float dot_via_dequant(g3_to_float_fn to_float, int64_t blck, size_t bytes, int64_t step,
                             const void *w, const float *x, int64_t n)
{
    const uint8_t *p = w;
    float buf[256];
    float total = 0.0f;
    for (int64_t i = 0; i < n; i += step) {
        const int64_t m = n - i < step ? n - i : step; /* the float formats' last chunk may be short */
        to_float(p, buf, m);
        float s = 0.0f;
        for (int64_t j0 = 0; j0 < m; j0 += 32) { /* 32-element partials keep chains short */
            float s32 = 0.0f;
            for (int64_t j = j0; j < m && j < j0 + 32; j++)
                s32 += buf[j] * x[i + j];
            s += s32;
        }
        total += s;
        p += (size_t)(m / blck) * bytes;
    }
    return total;
}

#define DOT_REF(name, blck, bytes, step)                                                          \
    float g3_dot_##name##_f32_ref(const void *w, const float *x, int64_t n)                       \
    {                                                                                             \
        return dot_via_dequant(g3_dequant_##name##_ref, blck, bytes, step, w, x, n);              \
    }

DOT_REF(f32, 1, 4, FLOAT_CHUNK)
DOT_REF(f16, 1, 2, FLOAT_CHUNK)
DOT_REF(bf16, 1, 2, FLOAT_CHUNK)
DOT_REF(q4_0, G3_QK4_0, sizeof(g3_block_q4_0), G3_QK4_0)
DOT_REF(q4_1, G3_QK4_1, sizeof(g3_block_q4_1), G3_QK4_1)
DOT_REF(q5_0, G3_QK5_0, sizeof(g3_block_q5_0), G3_QK5_0)
DOT_REF(q5_1, G3_QK5_1, sizeof(g3_block_q5_1), G3_QK5_1)
DOT_REF(q8_0, G3_QK8_0, sizeof(g3_block_q8_0), G3_QK8_0)
DOT_REF(iq4_nl, G3_QK4_NL, sizeof(g3_block_iq4_nl), G3_QK4_NL)
DOT_REF(q2_k, G3_QK_K, sizeof(g3_block_q2_k), G3_QK_K)
DOT_REF(q3_k, G3_QK_K, sizeof(g3_block_q3_k), G3_QK_K)
DOT_REF(q4_k, G3_QK_K, sizeof(g3_block_q4_k), G3_QK_K)
DOT_REF(q5_k, G3_QK_K, sizeof(g3_block_q5_k), G3_QK_K)
DOT_REF(q6_k, G3_QK_K, sizeof(g3_block_q6_k), G3_QK_K)
DOT_REF(iq4_xs, G3_QK_K, sizeof(g3_block_iq4_xs), G3_QK_K)
