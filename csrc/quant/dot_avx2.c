/* dot_avx2.c — AVX2+FMA+F16C dequantization and fused dequantize-and-dot, float32 activations:
 *     to_float: y[i] = dequant(w)[i];   dot: sum_i dequant(w)[i] * x[i],   w (n / blck blocks), x (n,).
 *
 * Matches ref.c (to_float bit for bit) and dot_ref.c (dot within float32 summation error). One
 * decoder per format turns a block into 8-float vectors of weights computed exactly as the reference
 * does (d * (float)q, or (d*sc) * (float)q - dmin*m: a multiply and a separate subtract, never an
 * FMA, since the mins can cancel), then hands each vector to a sink that either stores it (to_float)
 * or FMAs it with x into one of four independent accumulators (dot). The mode is a literal argument
 * of always-inline functions, so each kernel compiles to its own straight loop.
 * Integer quants become floats via vpmovsxbd/vpmovzxbd + vcvtdq2ps; half scales via F16C, which
 * agrees with g3_fp16_to_fp32 on every finite half; the F16 dequantizer patches inf/NaN lanes so
 * signalling NaNs keep their bits (a NaN scale or weight makes a dot NaN either way).
 * Compiled with target attributes; only selected (traits.c) when the CPU has avx2, fma and f16c.
 */
#include <immintrin.h>
#include <string.h>

#include "quant/blocks.h"

#define TGT __attribute__((target("avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* ---- sink: store (to_float) or accumulate (dot) 8 weights at element offset o ------------------- */

typedef struct {
    float *dst;       /* to_float output, (n,) */
    const float *x;   /* dot activations, (n,) */
    __m256 acc[4];    /* dot partial sums, one dependency chain each */
} sink;

INL void put8(sink *s, int dot, int64_t o, int k, __m256 w)
{
    if (dot)
        s->acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(s->x + o), s->acc[k]);
    else
        _mm256_storeu_ps(s->dst + o, w);
}

INL float hsum8(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

INL float sink_sum(const sink *s)
{
    return hsum8(_mm256_add_ps(_mm256_add_ps(s->acc[0], s->acc[1]),
                               _mm256_add_ps(s->acc[2], s->acc[3])));
}

INL sink sink_dot(const float *x)
{
    sink s = {.dst = NULL, .x = x};
    for (int k = 0; k < 4; k++)
        s.acc[k] = _mm256_setzero_ps();
    return s;
}

INL float half(uint16_t h) { return _cvtsh_ss(h); }

/* 16 signed bytes -> two vectors of scale * (float)q (elements 0..7 and 8..15). */
INL void put16_i8(sink *s, int dot, int64_t o, int k, __m128i q, __m256 scale)
{
    put8(s, dot, o, k, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
    put8(s, dot, o + 8, (k + 1) & 3,
         _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))));
}

/* 16 unsigned bytes -> two vectors of scale * (float)q - min. */
INL void put16_u8_min(sink *s, int dot, int64_t o, int k, __m128i q, __m256 scale, __m256 min)
{
    __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
    put8(s, dot, o, k, _mm256_sub_ps(_mm256_mul_ps(scale, f0), min));
    put8(s, dot, o + 8, (k + 1) & 3, _mm256_sub_ps(_mm256_mul_ps(scale, f1), min));
}

/* ---- block decoders ---------------------------------------------------------------------------- */

INL void q8_0_block(const g3_block_q8_0 *b, sink *s, int dot, int64_t o)
{
    const __m256 d = _mm256_set1_ps(half(b->d));
    for (int k = 0; k < 4; k++) {
        __m128i q = _mm_loadl_epi64((const __m128i *)(b->qs + 8 * k));
        put8(s, dot, o + 8 * k, k, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
    }
}

INL void q4_0_block(const g3_block_q4_0 *b, sink *s, int dot, int64_t o)
{
    const __m256 d = _mm256_set1_ps(half(b->d));
    const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);                    /* 0..15 */
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight); /* 16..31 */
    put16_i8(s, dot, o, 0, lo, d);
    put16_i8(s, dot, o + 16, 2, hi, d);
}

/* 16 bits -> 16 bytes, 0xFF where the bit is set (byte i <- bit i). */
INL __m128i bits_to_bytes(uint32_t bits16)
{
    const __m128i sel = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m128i bit = _mm_set1_epi64x((long long)0x8040201008040201ULL);
    __m128i v = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)bits16), sel);
    return _mm_cmpeq_epi8(_mm_and_si128(v, bit), bit);
}

INL void q5_0_block(const g3_block_q5_0 *b, sink *s, int dot, int64_t o)
{
    const __m256 d = _mm256_set1_ps(half(b->d));
    const __m128i m4 = _mm_set1_epi8(0x0F), c16 = _mm_set1_epi8(16);
    uint32_t qh;
    memcpy(&qh, b->qh, 4);
    const __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
    /* (nibble | 16*bit) - 16 = nibble - (bit ? 0 : 16) */
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4),
                                    _mm_andnot_si128(bits_to_bytes(qh & 0xFFFF), c16));
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4),
                                    _mm_andnot_si128(bits_to_bytes(qh >> 16), c16));
    put16_i8(s, dot, o, 0, lo, d);
    put16_i8(s, dot, o + 16, 2, hi, d);
}

INL void q4_k_block(const g3_block_q4_k *b, sink *s, int dot, int64_t o)
{
    const float d = half(b->d), dmin = half(b->dmin);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++, o += 64) {
        const uint8_t *q = b->qs + 32 * c;
        uint8_t sc0, m0, sc1, m1;
        g3_get_scale_min_k4(2 * c, b->scales, &sc0, &m0);
        g3_get_scale_min_k4(2 * c + 1, b->scales, &sc1, &m1);
        const __m256 d0 = _mm256_set1_ps(d * (float)sc0), mm0 = _mm256_set1_ps(dmin * (float)m0);
        const __m256 d1 = _mm256_set1_ps(d * (float)sc1), mm1 = _mm256_set1_ps(dmin * (float)m1);
        const __m128i qa = _mm_loadu_si128((const __m128i *)q);
        const __m128i qb = _mm_loadu_si128((const __m128i *)(q + 16));
        put16_u8_min(s, dot, o, 0, _mm_and_si128(qa, m4), d0, mm0);
        put16_u8_min(s, dot, o + 16, 2, _mm_and_si128(qb, m4), d0, mm0);
        put16_u8_min(s, dot, o + 32, 0, _mm_and_si128(_mm_srli_epi16(qa, 4), m4), d1, mm1);
        put16_u8_min(s, dot, o + 48, 2, _mm_and_si128(_mm_srli_epi16(qb, 4), m4), d1, mm1);
    }
}

/* Per half of 128 and l-chunk lc of 16: element l of the four 32-wide groups takes its low 4 bits
 * from ql[l] / ql[l+32] (low, low, high, high nibble) and its high 2 bits from qh[l] bits 0-1, 2-3,
 * 4-5, 6-7; the scale of elements 16*lc.. of group g is scales[8*h + lc + 2*g]. */
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
                const __m256 ds = _mm256_set1_ps(d * (float)b->scales[8 * h + lc + 2 * g]);
                put16_i8(s, dot, o + 32 * g + 16 * lc, 2 * ((g + lc) & 1), _mm_sub_epi8(q[g], c32),
                         ds);
            }
        }
    }
}

/* ---- block-format kernels ---------------------------------------------------------------------- */

#define BLOCK_KERNELS(name, btype, blck)                                                          \
    TGT void g3_dequant_##name##_avx2(const void *src, float *dst, int64_t n)                     \
    {                                                                                             \
        const btype *b = src;                                                                     \
        sink s = {.dst = dst};                                                                    \
        for (int64_t i = 0; i < n / (blck); i++)                                                  \
            name##_block(b + i, &s, 0, i * (blck));                                               \
    }                                                                                             \
    TGT float g3_dot_##name##_f32_avx2(const void *w, const float *x, int64_t n)                  \
    {                                                                                             \
        const btype *b = w;                                                                       \
        sink s = sink_dot(x);                                                                     \
        for (int64_t i = 0; i < n / (blck); i++)                                                  \
            name##_block(b + i, &s, 1, i * (blck));                                               \
        return sink_sum(&s);                                                                      \
    }

BLOCK_KERNELS(q8_0, g3_block_q8_0, G3_QK8_0)
BLOCK_KERNELS(q4_0, g3_block_q4_0, G3_QK4_0)
BLOCK_KERNELS(q5_0, g3_block_q5_0, G3_QK5_0)
BLOCK_KERNELS(q4_k, g3_block_q4_k, G3_QK_K)
BLOCK_KERNELS(q6_k, g3_block_q6_k, G3_QK_K)

/* ---- float formats: 32 elements per iteration, then 8, then a scalar tail ----------------------- */

INL __m256 load8_f32(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
INL __m256 load8_f16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INL __m256 load8_bf16(const uint8_t *p)
{
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
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
    TGT float g3_dot_##name##_f32_avx2(const void *w, const float *x, int64_t n)                  \
    {                                                                                             \
        const uint8_t *p = w;                                                                     \
        sink s = sink_dot(x);                                                                     \
        int64_t i = 0;                                                                            \
        for (; i + 32 <= n; i += 32)                                                              \
            for (int k = 0; k < 4; k++)                                                           \
                put8(&s, 1, i + 8 * k, k, load8_##name(p + (i + 8 * k) * (esize)));               \
        for (; i + 8 <= n; i += 8)                                                                \
            put8(&s, 1, i, 0, load8_##name(p + i * (esize)));                                     \
        float r = sink_sum(&s);                                                                   \
        for (; i < n; i++)                                                                        \
            r += scalar_##name(p + i * (esize)) * x[i];                                           \
        return r;                                                                                 \
    }

FLOAT_DOT(f32, 4)
FLOAT_DOT(f16, 2)
FLOAT_DOT(bf16, 2)

#define FLOAT_DEQUANT(name, esize)                                                                \
    TGT void g3_dequant_##name##_avx2(const void *src, float *dst, int64_t n)                     \
    {                                                                                             \
        const uint8_t *p = src;                                                                   \
        int64_t i = 0;                                                                            \
        for (; i + 8 <= n; i += 8)                                                                \
            _mm256_storeu_ps(dst + i, load8_##name(p + i * (esize)));                             \
        for (; i < n; i++)                                                                        \
            dst[i] = scalar_##name(p + i * (esize));                                              \
    }

FLOAT_DEQUANT(bf16, 2)

/* F16C quiets signalling NaNs; the reference keeps every half's payload and quiet bit, so lanes
 * holding inf/NaN (exponent 31) are rebuilt bit by bit as sign | 0x7F800000 | mantissa << 13. */
INL __m256 load8_f16_exact(const uint8_t *p)
{
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    __m256 f = _mm256_cvtph_ps(h);
    const __m256i u = _mm256_cvtepu16_epi32(h), e = _mm256_set1_epi32(0x7C00);
    const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(u, e), e);
    if (_mm256_testz_si256(special, special))
        return f;
    const __m256i bits = _mm256_or_si256(
        _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x8000)), 16),
                        _mm256_set1_epi32(0x7F800000)),
        _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x3FF)), 13));
    return _mm256_blendv_ps(f, _mm256_castsi256_ps(bits), _mm256_castsi256_ps(special));
}

TGT void g3_dequant_f16_avx2(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load8_f16_exact(p + 2 * i));
    for (; i < n; i++)
        dst[i] = scalar_f16(p + 2 * i);
}
