/* dot_avx512.c — AVX-512 (F, BW, VL, DQ) + F16C dequantization and fused dequantize-and-dot with
 * float32 activations:
 *     to_float: y[i] = dequant(w)[i];   dot: sum_i dequant(w)[i] * x[i],   w (n / blck blocks), x (n,).
 *
 * Same structure as dot_avx2.c with 16-float vectors: a decoder per format yields weights computed
 * exactly as ref.c does (multiply, then a separate subtract for the mins; never an FMA there), and a
 * sink stores them (to_float, bit-identical to the reference) or FMAs them with x into four
 * independent accumulators (dot). A 32-element block is two vectors, so the Q8_0 / Q4_0 / Q5_0 dot
 * loops take 2 blocks (64 values) per iteration to feed all four accumulators. The 5th bit of Q5_0
 * is applied with a byte mask register straight from qh.
 * Only selected (traits.c) when the CPU has avx512f, avx512bw, avx512vl, avx512dq and f16c.
 */
#include <immintrin.h>
#include <string.h>

#include "quant/blocks.h"

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))
#define INL                                                                                       \
    static inline __attribute__((always_inline,                                                   \
                                 target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

/* ---- sink: store (to_float) or accumulate (dot) 16 weights at element offset o ------------------ */

typedef struct {
    float *dst;       /* to_float output, (n,) */
    const float *x;   /* dot activations, (n,) */
    __m512 acc[4];    /* dot partial sums, one dependency chain each */
} sink;

INL void put16(sink *s, int dot, int64_t o, int k, __m512 w)
{
    if (dot)
        s->acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(s->x + o), s->acc[k]);
    else
        _mm512_storeu_ps(s->dst + o, w);
}

INL float sink_sum(const sink *s)
{
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s->acc[0], s->acc[1]),
                                              _mm512_add_ps(s->acc[2], s->acc[3])));
}

INL sink sink_dot(const float *x)
{
    sink s = {.dst = NULL, .x = x};
    for (int k = 0; k < 4; k++)
        s.acc[k] = _mm512_setzero_ps();
    return s;
}

INL float half(uint16_t h) { return _cvtsh_ss(h); }

INL __m512 i8_to_ps(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
INL __m512 u8_to_ps(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)); }

/* ---- block decoders (k: first of the two accumulators a 32-element block uses) ------------------ */

INL void q8_0_block(const g3_block_q8_0 *b, sink *s, int dot, int64_t o, int k)
{
    const __m512 d = _mm512_set1_ps(half(b->d));
    put16(s, dot, o, k, _mm512_mul_ps(d, i8_to_ps(_mm_loadu_si128((const __m128i *)b->qs))));
    put16(s, dot, o + 16, k + 1,
          _mm512_mul_ps(d, i8_to_ps(_mm_loadu_si128((const __m128i *)(b->qs + 16)))));
}

/* Every weight of a 4-bit block is one of 16 values, so the 16 products d*(k-8) or (d*sc)*k - dmin*m
 * are formed once per block or sub-block, exactly as the reference forms them, and the nibbles
 * index them with vpermps: no per-element convert, multiply or subtract (Q4_0, Q4_K dot). */
INL __m512 levels16(void)
{
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

INL __m512i nib_lo(__m128i q) { return _mm512_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(0x0F))); }
INL __m512i nib_hi(__m128i q)
{
    return _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F)));
}

INL void q4_0_block(const g3_block_q4_0 *b, sink *s, int dot, int64_t o, int k)
{
    /* table[k] = d * (float)(k - 8) */
    const __m512 t = _mm512_mul_ps(_mm512_set1_ps(half(b->d)),
                                   _mm512_sub_ps(levels16(), _mm512_set1_ps(8.0f)));
    const __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
    put16(s, dot, o, k, _mm512_permutexvar_ps(nib_lo(q), t));          /* elements 0..15 */
    put16(s, dot, o + 16, k + 1, _mm512_permutexvar_ps(nib_hi(q), t)); /* 16..31 */
}

INL void q5_0_block(const g3_block_q5_0 *b, sink *s, int dot, int64_t o, int k)
{
    /* a 32-entry vpermt2ps table measured ~2% slower here: convert and multiply instead */
    const __m512 d = _mm512_set1_ps(half(b->d));
    const __m128i m4 = _mm_set1_epi8(0x0F), c16 = _mm_set1_epi8(16);
    uint32_t qh;
    memcpy(&qh, b->qh, 4);
    const __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
    const __m128i nlo = _mm_and_si128(q, m4), nhi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
    /* (nibble | 16*bit) - 16: subtract 16 only where the 5th bit is clear */
    const __m128i lo = _mm_mask_sub_epi8(nlo, (__mmask16)~qh, nlo, c16);
    const __m128i hi = _mm_mask_sub_epi8(nhi, (__mmask16)~(qh >> 16), nhi, c16);
    put16(s, dot, o, k, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))));
    put16(s, dot, o + 16, k + 1, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))));
}

INL void q4_k_block(const g3_block_q4_k *b, sink *s, int dot, int64_t o)
{
    const float d = half(b->d), dmin = half(b->dmin);
    const __m512 lv = levels16();
    for (int c = 0; c < 4; c++, o += 64) {
        const uint8_t *q = b->qs + 32 * c;
        uint8_t sc0, m0, sc1, m1;
        g3_get_scale_min_k4(2 * c, b->scales, &sc0, &m0);
        g3_get_scale_min_k4(2 * c + 1, b->scales, &sc1, &m1);
        const __m128i qa = _mm_loadu_si128((const __m128i *)q);
        const __m128i qb = _mm_loadu_si128((const __m128i *)(q + 16));
        if (!dot) { /* storing, the direct form measured faster (the tables only pay off in dot) */
            const __m512 d0 = _mm512_set1_ps(d * (float)sc0);
            const __m512 mm0 = _mm512_set1_ps(dmin * (float)m0);
            const __m512 d1 = _mm512_set1_ps(d * (float)sc1);
            const __m512 mm1 = _mm512_set1_ps(dmin * (float)m1);
            __m512i v[4] = {nib_lo(qa), nib_lo(qb), nib_hi(qa), nib_hi(qb)};
            for (int g = 0; g < 4; g++) {
                const __m512 f = _mm512_cvtepi32_ps(v[g]);
                put16(s, 0, o + 16 * g, 0,
                      g < 2 ? _mm512_sub_ps(_mm512_mul_ps(d0, f), mm0)
                            : _mm512_sub_ps(_mm512_mul_ps(d1, f), mm1));
            }
            continue;
        }
        /* tables of (d*sc)*k - dmin*m for the two sub-blocks of this chunk */
        const __m512 t0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)sc0), lv),
                                        _mm512_set1_ps(dmin * (float)m0));
        const __m512 t1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)sc1), lv),
                                        _mm512_set1_ps(dmin * (float)m1));
        put16(s, dot, o, 0, _mm512_permutexvar_ps(nib_lo(qa), t0));
        put16(s, dot, o + 16, 1, _mm512_permutexvar_ps(nib_lo(qb), t0));
        put16(s, dot, o + 32, 2, _mm512_permutexvar_ps(nib_hi(qa), t1));
        put16(s, dot, o + 48, 3, _mm512_permutexvar_ps(nib_hi(qb), t1));
    }
}

/* As in dot_avx2.c: per half h and l-chunk lc of 16, group g (0..3) of 32 takes its low 4 bits from
 * ql[l] / ql[l+32] (low, low, high, high nibble), its high 2 bits from qh[l] bits 2g..2g+1, and the
 * scale scales[8*h + lc + 2*g]: each 16-element vector has a single scale. */
INL void q6_k_block(const g3_block_q6_k *b, sink *s, int dot, int64_t o)
{
    const float d = half(b->d);
    const __m128i m4 = _mm_set1_epi8(0x0F), m30 = _mm_set1_epi8(0x30), c32 = _mm_set1_epi8(32);
    for (int h = 0; h < 2; h++, o += 128) {
        for (int lc = 0; lc < 2; lc++) {
            const __m128i A = _mm_loadu_si128((const __m128i *)(b->ql + 64 * h + 16 * lc));
            const __m128i B = _mm_loadu_si128((const __m128i *)(b->ql + 64 * h + 32 + 16 * lc));
            const __m128i H = _mm_loadu_si128((const __m128i *)(b->qh + 32 * h + 16 * lc));
            __m128i q[4];
            q[0] = _mm_or_si128(_mm_and_si128(A, m4), _mm_and_si128(_mm_slli_epi16(H, 4), m30));
            q[1] = _mm_or_si128(_mm_and_si128(B, m4), _mm_and_si128(_mm_slli_epi16(H, 2), m30));
            q[2] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(A, 4), m4), _mm_and_si128(H, m30));
            q[3] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(B, 4), m4),
                                _mm_and_si128(_mm_srli_epi16(H, 2), m30));
            for (int g = 0; g < 4; g++) {
                const __m512 ds = _mm512_set1_ps(d * (float)b->scales[8 * h + lc + 2 * g]);
                put16(s, dot, o + 32 * g + 16 * lc, g,
                      _mm512_mul_ps(ds, i8_to_ps(_mm_sub_epi8(q[g], c32))));
            }
        }
    }
}

/* ---- block-format kernels ---------------------------------------------------------------------- */

/* 32-element blocks: two per iteration (accumulators 0-1 and 2-3), then the odd one. */
#define SMALL_BLOCK_KERNELS(name, btype, blck)                                                    \
    TGT void g3_dequant_##name##_avx512(const void *src, float *dst, int64_t n)                   \
    {                                                                                             \
        const btype *b = src;                                                                     \
        sink s = {.dst = dst};                                                                    \
        for (int64_t i = 0; i < n / (blck); i++)                                                  \
            name##_block(b + i, &s, 0, i * (blck), 0);                                            \
    }                                                                                             \
    TGT float g3_dot_##name##_f32_avx512(const void *w, const float *x, int64_t n)                \
    {                                                                                             \
        const btype *b = w;                                                                       \
        const int64_t nb = n / (blck);                                                            \
        sink s = sink_dot(x);                                                                     \
        int64_t i = 0;                                                                            \
        for (; i + 2 <= nb; i += 2) {                                                             \
            name##_block(b + i, &s, 1, i * (blck), 0);                                            \
            name##_block(b + i + 1, &s, 1, (i + 1) * (blck), 2);                                  \
        }                                                                                         \
        if (i < nb)                                                                               \
            name##_block(b + i, &s, 1, i * (blck), 0);                                            \
        return sink_sum(&s);                                                                      \
    }

SMALL_BLOCK_KERNELS(q8_0, g3_block_q8_0, G3_QK8_0)
SMALL_BLOCK_KERNELS(q4_0, g3_block_q4_0, G3_QK4_0)
SMALL_BLOCK_KERNELS(q5_0, g3_block_q5_0, G3_QK5_0)

#define SUPER_BLOCK_KERNELS(name, btype)                                                          \
    TGT void g3_dequant_##name##_avx512(const void *src, float *dst, int64_t n)                   \
    {                                                                                             \
        const btype *b = src;                                                                     \
        sink s = {.dst = dst};                                                                    \
        for (int64_t i = 0; i < n / G3_QK_K; i++)                                                 \
            name##_block(b + i, &s, 0, i * G3_QK_K);                                              \
    }                                                                                             \
    TGT float g3_dot_##name##_f32_avx512(const void *w, const float *x, int64_t n)                \
    {                                                                                             \
        const btype *b = w;                                                                       \
        sink s = sink_dot(x);                                                                     \
        for (int64_t i = 0; i < n / G3_QK_K; i++)                                                 \
            name##_block(b + i, &s, 1, i * G3_QK_K);                                              \
        return sink_sum(&s);                                                                      \
    }

SUPER_BLOCK_KERNELS(q4_k, g3_block_q4_k)
SUPER_BLOCK_KERNELS(q6_k, g3_block_q6_k)

/* ---- float formats: 64 elements per iteration, then 16, then a scalar tail ---------------------- */

INL __m512 load16_f32(const uint8_t *p) { return _mm512_loadu_ps((const float *)p); }
INL __m512 load16_f16(const uint8_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
INL __m512 load16_bf16(const uint8_t *p)
{
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

INL float scalar_f32(const uint8_t *p)
{
    float f;
    memcpy(&f, p, 4);
    return f;
}
INL float scalar_f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return g3_fp16_to_fp32(h);
}
INL float scalar_bf16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return g3_bf16_to_fp32(h);
}

#define FLOAT_DOT(name, esize)                                                                    \
    TGT float g3_dot_##name##_f32_avx512(const void *w, const float *x, int64_t n)                \
    {                                                                                             \
        const uint8_t *p = w;                                                                     \
        sink s = sink_dot(x);                                                                     \
        int64_t i = 0;                                                                            \
        for (; i + 64 <= n; i += 64)                                                              \
            for (int k = 0; k < 4; k++)                                                           \
                put16(&s, 1, i + 16 * k, k, load16_##name(p + (i + 16 * k) * (esize)));          \
        for (; i + 16 <= n; i += 16)                                                              \
            put16(&s, 1, i, 0, load16_##name(p + i * (esize)));                                   \
        float r = sink_sum(&s);                                                                   \
        for (; i < n; i++)                                                                        \
            r += scalar_##name(p + i * (esize)) * x[i];                                           \
        return r;                                                                                 \
    }

FLOAT_DOT(f32, 4)
FLOAT_DOT(f16, 2)
FLOAT_DOT(bf16, 2)

#define FLOAT_DEQUANT(name, esize)                                                                \
    TGT void g3_dequant_##name##_avx512(const void *src, float *dst, int64_t n)                   \
    {                                                                                             \
        const uint8_t *p = src;                                                                   \
        int64_t i = 0;                                                                            \
        for (; i + 16 <= n; i += 16)                                                              \
            _mm512_storeu_ps(dst + i, load16_##name(p + i * (esize)));                            \
        for (; i < n; i++)                                                                        \
            dst[i] = scalar_##name(p + i * (esize));                                              \
    }

FLOAT_DEQUANT(bf16, 2)

/* F16C quiets signalling NaNs; the reference keeps every half's payload and quiet bit, so lanes
 * holding inf/NaN (exponent 31) are rebuilt bit by bit as sign | 0x7F800000 | mantissa << 13. */
INL __m512 load16_f16_exact(const uint8_t *p)
{
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    __m512 f = _mm512_cvtph_ps(h);
    const __m512i u = _mm512_cvtepu16_epi32(h), e = _mm512_set1_epi32(0x7C00);
    const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, e), e);
    if (!special)
        return f;
    const __m512i bits = _mm512_or_si512(
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x8000)), 16),
                        _mm512_set1_epi32(0x7F800000)),
        _mm512_slli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x3FF)), 13));
    return _mm512_mask_mov_ps(f, special, _mm512_castsi512_ps(bits));
}

TGT void g3_dequant_f16_avx512(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, load16_f16_exact(p + 2 * i));
    for (; i < n; i++)
        dst[i] = scalar_f16(p + 2 * i);
}
