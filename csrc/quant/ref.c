/* ref.c — scalar reference (de)quantization for the ggml block formats, and fp16/bf16 conversion.
 *
 * Dequantization: y = d * q (symmetric types) or y = d * q + m / d*sc*q - dmin*m (types with mins),
 * with the float operations done in the same order as the published formats (and the gguf package's
 * NumPy dequantizer), so results are bit-identical to it: products are formed as (d*sc)*q, never
 * contracted into FMAs (ISO C mode, -std=c11, implies -ffp-contract=off in GCC).
 *
 * Quantization (from float32):
 *   - F16/BF16: round-to-nearest-even, exact IEEE (subnormals, overflow to inf, NaN kept quiet).
 *   - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q8_K: the simple published reference rules (block
 *     max / min-max scaling), so files we write agree with other GGUF writers.
 *   - Q4_K, Q5_K, Q6_K, IQ4_NL: a small RMSE search per sub-block (several candidate scales, each
 *     refined by a least-squares fit), then the sub-block scales are quantized to 6 or 8 bits against
 *     a half-precision super-block scale, and every value is re-rounded to the nearest level of the
 *     scales actually stored.
 * Block types assume finite input with |x| small enough for the half scales (< ~6e4 * level count).
 */
#include <math.h>
#include <string.h>

#include "quant/blocks.h"

/* ---- half / bfloat16 ----------------------------------------------------------------------------- */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float g3_fp16_to_fp32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t em = h & 0x7FFF; /* exponent and mantissa */
    if (em >= 0x7C00)               /* inf / NaN: keep the payload (and thus the quiet bit) */
        return f32_from_bits(sign | 0x7F800000u | ((em & 0x3FF) << 13));
    if (em < 0x400) /* zero / subnormal: mant * 2^-24, exact in float32 (and normal, so FTZ-safe) */
        return f32_from_bits(sign | f32_bits((float)em * 0x1p-24f));
    return f32_from_bits(sign | ((em << 13) + 0x38000000u)); /* rebias exponent by 127 - 15 */
}

uint16_t g3_fp32_to_fp16(float f)
{
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7FFFFFFFu;
    if (x > 0x7F800000u) /* NaN: quiet it, keep the top payload bits */
        return (uint16_t)(sign | 0x7E00 | ((x >> 13) & 0x3FF));
    if (x >= 0x477FF000u) /* >= 65520 (halfway past 65504, ties to even go up) and inf */
        return (uint16_t)(sign | 0x7C00);
    if (x >= 0x38800000u) { /* normal half: rebias exponent, round 13 dropped bits */
        uint32_t h = (x - 0x38000000u) >> 13;
        uint32_t rem = x & 0x1FFF;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
            h++; /* a carry into the exponent is the correct rounding */
        return (uint16_t)(sign | h);
    }
    if (x <= 0x33000000u) /* <= 2^-25: rounds to zero (2^-25 is a tie, 0 is even) */
        return sign;
    /* subnormal half: q = value / 2^-24 = m * 2^(e - 126) with the 24-bit significand m */
    uint32_t e = x >> 23;
    uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e; /* 14..24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1)))
        q++; /* may become 0x400, the smallest normal: correct */
    return (uint16_t)(sign | q);
}

float g3_bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t g3_fp32_to_bf16(float f)
{
    uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

#define FP16(h) g3_fp16_to_fp32(h)

/* ---- dequantization ------------------------------------------------------------------------------ */

void g3_dequant_f32_ref(const void *src, float *dst, int64_t n) { memcpy(dst, src, (size_t)n * 4); }

void g3_dequant_f16_ref(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = g3_fp16_to_fp32(h);
    }
}

void g3_dequant_bf16_ref(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = g3_bf16_to_fp32(h);
    }
}

void g3_dequant_q4_0_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q4_0 *b = src;
    for (int64_t i = 0; i < n / G3_QK4_0; i++, b++, dst += G3_QK4_0) {
        const float d = FP16(b->d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((b->qs[j] & 0xF) - 8);
            dst[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
        }
    }
}

void g3_dequant_q4_1_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q4_1 *b = src;
    for (int64_t i = 0; i < n / G3_QK4_1; i++, b++, dst += G3_QK4_1) {
        const float d = FP16(b->d), m = FP16(b->m);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(b->qs[j] & 0xF) + m;
            dst[j + 16] = d * (float)(b->qs[j] >> 4) + m;
        }
    }
}

static inline uint32_t load_u32le(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

void g3_dequant_q5_0_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q5_0 *b = src;
    for (int64_t i = 0; i < n / G3_QK5_0; i++, b++, dst += G3_QK5_0) {
        const float d = FP16(b->d);
        const uint32_t qh = load_u32le(b->qh);
        for (int j = 0; j < 16; j++) {
            int q0 = (b->qs[j] & 0xF) | (int)(((qh >> j) & 1) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            dst[j] = d * (float)(q0 - 16);
            dst[j + 16] = d * (float)(q1 - 16);
        }
    }
}

void g3_dequant_q5_1_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q5_1 *b = src;
    for (int64_t i = 0; i < n / G3_QK5_1; i++, b++, dst += G3_QK5_1) {
        const float d = FP16(b->d), m = FP16(b->m);
        const uint32_t qh = load_u32le(b->qh);
        for (int j = 0; j < 16; j++) {
            int q0 = (b->qs[j] & 0xF) | (int)(((qh >> j) & 1) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            dst[j] = d * (float)q0 + m;
            dst[j + 16] = d * (float)q1 + m;
        }
    }
}

void g3_dequant_q8_0_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q8_0 *b = src;
    for (int64_t i = 0; i < n / G3_QK8_0; i++, b++, dst += G3_QK8_0) {
        const float d = FP16(b->d);
        for (int j = 0; j < G3_QK8_0; j++)
            dst[j] = d * (float)b->qs[j];
    }
}

void g3_dequant_iq4_nl_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_iq4_nl *b = src;
    for (int64_t i = 0; i < n / G3_QK4_NL; i++, b++, dst += G3_QK4_NL) {
        const float d = FP16(b->d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)g3_kvalues_iq4nl[b->qs[j] & 0xF];
            dst[j + 16] = d * (float)g3_kvalues_iq4nl[b->qs[j] >> 4];
        }
    }
}

void g3_dequant_q2_k_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q2_k *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d), dmin = FP16(b->dmin);
        int is = 0;
        for (int half = 0; half < 2; half++) {
            const uint8_t *q = b->qs + 32 * half;
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 2; part++) { /* elements 0..15, then 16..31 of q */
                    const uint8_t sc = b->scales[is++];
                    const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
                    for (int l = 16 * part; l < 16 * part + 16; l++)
                        *dst++ = dl * (float)((q[l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

/* The 16 signed 6-bit scales of a Q3_K block: low 4 bits from bytes 0..7 (low nibble for 0..7,
 * high nibble for 8..15), high 2 bits from bytes 8..11 (byte 8 + i%4, bit pair i/4). */
static void q3_k_scales(const uint8_t *s, int out[16])
{
    for (int i = 0; i < 16; i++) {
        int low4 = i < 8 ? s[i] & 0xF : s[i - 8] >> 4;
        int high2 = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        out[i] = (low4 | (high2 << 4)) - 32;
    }
}

void g3_dequant_q3_k_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q3_k *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d);
        int sc[16];
        q3_k_scales(b->scales, sc);
        int is = 0;
        uint8_t m = 1; /* hmask bit: one per 32 outputs, shifted after each (half, shift) pair */
        for (int half = 0; half < 2; half++) {
            const uint8_t *q = b->qs + 32 * half;
            for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1)) {
                for (int part = 0; part < 2; part++) {
                    const float dl = d * (float)sc[is++];
                    for (int l = 16 * part; l < 16 * part + 16; l++) {
                        int v = ((q[l] >> shift) & 3) - ((b->hmask[l] & m) ? 0 : 4);
                        *dst++ = dl * (float)v;
                    }
                }
            }
        }
    }
}

void g3_dequant_q4_k_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q4_k *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d), dmin = FP16(b->dmin);
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b->qs + 32 * c;
            uint8_t sc0, m0, sc1, m1;
            g3_get_scale_min_k4(2 * c, b->scales, &sc0, &m0);
            g3_get_scale_min_k4(2 * c + 1, b->scales, &sc1, &m1);
            const float d0 = d * (float)sc0, mm0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, mm1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++)
                dst[l] = d0 * (float)(q[l] & 0xF) - mm0;
            for (int l = 0; l < 32; l++)
                dst[l + 32] = d1 * (float)(q[l] >> 4) - mm1;
            dst += 64;
        }
    }
}

void g3_dequant_q5_k_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q5_k *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d), dmin = FP16(b->dmin);
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b->qs + 32 * c;
            uint8_t sc0, m0, sc1, m1;
            g3_get_scale_min_k4(2 * c, b->scales, &sc0, &m0);
            g3_get_scale_min_k4(2 * c + 1, b->scales, &sc1, &m1);
            const float d0 = d * (float)sc0, mm0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, mm1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++) {
                int v = (q[l] & 0xF) | (((b->qh[l] >> (2 * c)) & 1) << 4);
                dst[l] = d0 * (float)v - mm0;
            }
            for (int l = 0; l < 32; l++) {
                int v = (q[l] >> 4) | (((b->qh[l] >> (2 * c + 1)) & 1) << 4);
                dst[l + 32] = d1 * (float)v - mm1;
            }
            dst += 64;
        }
    }
}

void g3_dequant_q6_k_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_q6_k *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d);
        for (int h = 0; h < 2; h++) { /* two halves of 128 outputs */
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            const int8_t *sc = b->scales + 8 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                dst[l] = d * (float)sc[is + 0] * (float)q1;
                dst[l + 32] = d * (float)sc[is + 2] * (float)q2;
                dst[l + 64] = d * (float)sc[is + 4] * (float)q3;
                dst[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
            dst += 128;
        }
    }
}

void g3_dequant_iq4_xs_ref(const void *src, float *dst, int64_t n)
{
    const g3_block_iq4_xs *b = src;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++) {
        const float d = FP16(b->d);
        for (int ib = 0; ib < 8; ib++) {
            int ls = ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) |
                     (((b->scales_h >> (2 * ib)) & 3) << 4);
            const float dl = d * (float)(ls - 32);
            const uint8_t *q = b->qs + 16 * ib;
            for (int j = 0; j < 16; j++) {
                dst[j] = dl * (float)g3_kvalues_iq4nl[q[j] & 0xF];
                dst[j + 16] = dl * (float)g3_kvalues_iq4nl[q[j] >> 4];
            }
            dst += 32;
        }
    }
}

/* ---- quantization: float formats and the simple legacy rules -------------------------------------- */

void g3_quant_f32_ref(const float *src, void *dst, int64_t n) { memcpy(dst, src, (size_t)n * 4); }

void g3_quant_f16_ref(const float *src, void *dst, int64_t n)
{
    uint8_t *p = dst;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = g3_fp32_to_fp16(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

void g3_quant_bf16_ref(const float *src, void *dst, int64_t n)
{
    uint8_t *p = dst;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = g3_fp32_to_bf16(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

/* The element of x[0..n) with the largest magnitude (first one on ties), with its sign. */
static float signed_absmax(const float *x, int n, float *amax_out)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    *amax_out = amax;
    return max;
}

static void min_max(const float *x, int n, float *mn, float *mx)
{
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    *mn = lo;
    *mx = hi;
}

/* Symmetric 4/5-bit grids put the largest-magnitude value at level -2^(b-1): d = max / -2^(b-1),
 * q = trunc(x/d + 2^(b-1) + 0.5) clipped to the top level (the value -max lands one level past it). */
void g3_quant_q4_0_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q4_0 *b = dst;
    for (int64_t i = 0; i < n / G3_QK4_0; i++, b++, src += G3_QK4_0) {
        float amax, max = signed_absmax(src, G3_QK4_0, &amax);
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = g3_fp32_to_fp16(d);
        for (int j = 0; j < 16; j++) {
            int q0 = (int)(src[j] * id + 8.5f), q1 = (int)(src[j + 16] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b->qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

void g3_quant_q5_0_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q5_0 *b = dst;
    for (int64_t i = 0; i < n / G3_QK5_0; i++, b++, src += G3_QK5_0) {
        float amax, max = signed_absmax(src, G3_QK5_0, &amax);
        const float d = max / -16.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = g3_fp32_to_fp16(d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int q0 = (int)(src[j] * id + 16.5f), q1 = (int)(src[j + 16] * id + 16.5f);
            q0 = q0 > 31 ? 31 : q0;
            q1 = q1 > 31 ? 31 : q1;
            b->qs[j] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            qh |= (uint32_t)(q0 >> 4) << j;
            qh |= (uint32_t)(q1 >> 4) << (j + 16);
        }
        memcpy(b->qh, &qh, 4);
    }
}

/* Min/max grids: m = min, d = (max - min) / (2^b - 1), q = trunc((x - m)/d + 0.5). */
void g3_quant_q4_1_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q4_1 *b = dst;
    for (int64_t i = 0; i < n / G3_QK4_1; i++, b++, src += G3_QK4_1) {
        float mn, mx;
        min_max(src, G3_QK4_1, &mn, &mx);
        const float d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = g3_fp32_to_fp16(d);
        b->m = g3_fp32_to_fp16(mn);
        for (int j = 0; j < 16; j++) {
            int q0 = (int)((src[j] - mn) * id + 0.5f), q1 = (int)((src[j + 16] - mn) * id + 0.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b->qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

void g3_quant_q5_1_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q5_1 *b = dst;
    for (int64_t i = 0; i < n / G3_QK5_1; i++, b++, src += G3_QK5_1) {
        float mn, mx;
        min_max(src, G3_QK5_1, &mn, &mx);
        const float d = (mx - mn) / 31.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = g3_fp32_to_fp16(d);
        b->m = g3_fp32_to_fp16(mn);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            int q0 = (int)((src[j] - mn) * id + 0.5f), q1 = (int)((src[j + 16] - mn) * id + 0.5f);
            q0 = q0 > 31 ? 31 : q0;
            q1 = q1 > 31 ? 31 : q1;
            b->qs[j] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            qh |= (uint32_t)(q0 >> 4) << j;
            qh |= (uint32_t)(q1 >> 4) << (j + 16);
        }
        memcpy(b->qh, &qh, 4);
    }
}

/* d = amax / 127, q = round-half-away(x / d). */
void g3_quant_q8_0_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q8_0 *b = dst;
    for (int64_t i = 0; i < n / G3_QK8_0; i++, b++, src += G3_QK8_0) {
        float amax;
        signed_absmax(src, G3_QK8_0, &amax);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b->d = g3_fp32_to_fp16(d);
        for (int j = 0; j < G3_QK8_0; j++)
            b->qs[j] = (int8_t)roundf(src[j] * id);
    }
}

/* As Q8_0, plus s = d * sum(q) for the min term of Q4_1/Q5_1 dot products. */
void g3_quant_q8_1_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q8_1 *b = dst;
    for (int64_t i = 0; i < n / G3_QK8_1; i++, b++, src += G3_QK8_1) {
        float amax;
        signed_absmax(src, G3_QK8_1, &amax);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < G3_QK8_1; j++) {
            b->qs[j] = (int8_t)roundf(src[j] * id);
            sum += b->qs[j];
        }
        b->d = g3_fp32_to_fp16(d);
        b->s = g3_fp32_to_fp16((float)sum * d);
    }
}

/* Per 256: the signed largest-magnitude value maps to -127 (d = max / -127, kept as a float),
 * q = nearest-even, capped at 127; bsums feed the min terms of K-quant dot products. */
void g3_quant_q8_k_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q8_k *b = dst;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++, src += G3_QK_K) {
        float amax, max = signed_absmax(src, G3_QK_K, &amax);
        if (amax == 0.0f) {
            memset(b, 0, sizeof *b);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < G3_QK_K; j++) {
            long v = lrintf(iscale * src[j]);
            b->qs[j] = (int8_t)(v > 127 ? 127 : v);
        }
        for (int g = 0; g < G3_QK_K / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++)
                s += b->qs[16 * g + j];
            b->bsums[g] = (int16_t)s;
        }
        b->d = 1.0f / iscale;
    }
}

/* ---- quantization: RMSE searches for K-quants and IQ4_NL ----------------------------------------- */

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
static inline int nearest(float x) { return (int)lrintf(x); }

/* Fits x[0..n) ~ a*L - m with L in 0..nmax, a >= 0, m >= 0 (the formats store the min as a
 * non-negative offset, so the range always includes 0). Tries candidate scales around
 * (max - min) / nmax; for each, rounds to levels and solves the 2x2 least-squares problem for
 * (a, m), keeping the pair of least squared error. Returns a; writes m. */
static float fit_scale_min(const float *x, int n, int nmax, float *m_out)
{
    float mn, mx;
    min_max(x, n, &mn, &mx);
    if (mn > 0.0f)
        mn = 0.0f;
    if (mx <= mn) { /* constant non-positive block: represented exactly by the min alone */
        *m_out = -mn;
        return 0.0f;
    }
    float best_a = (mx - mn) / (float)nmax, best_m = -mn, best_err = 0.0f;
    for (int j = 0; j < n; j++) {
        int l = clampi(nearest((x[j] - mn) / best_a), 0, nmax);
        float e = best_a * (float)l - best_m - x[j];
        best_err += e * e;
    }
    for (int t = -10; t <= 10; t++) {
        const float iscale = ((float)nmax + 0.1f * (float)t) / (mx - mn);
        double sl = 0, sl2 = 0, sx = 0, sxl = 0;
        uint8_t L[32];
        for (int j = 0; j < n; j++) {
            int l = clampi(nearest((x[j] - mn) * iscale), 0, nmax);
            L[j] = (uint8_t)l;
            sl += l;
            sl2 += (double)l * l;
            sx += x[j];
            sxl += (double)x[j] * l;
        }
        const double det = n * sl2 - sl * sl;
        if (det <= 0)
            continue;
        double a = (n * sxl - sl * sx) / det, b = (sl2 * sx - sl * sxl) / det; /* x ~ a*L + b */
        if (b > 0) { /* the offset must be <= 0: refit the scale with b = 0 */
            b = 0;
            a = sxl / sl2;
        }
        if (a <= 0)
            continue;
        float err = 0.0f;
        for (int j = 0; j < n; j++) {
            float e = (float)a * (float)L[j] + (float)b - x[j];
            err += e * e;
        }
        if (err < best_err) {
            best_err = err;
            best_a = (float)a;
            best_m = (float)-b;
        }
    }
    *m_out = best_m;
    return best_a;
}

/* Fits x[0..n) ~ a*L with L in -nmax..nmax-1 (signed grid, one more level on the negative side, which
 * the largest-magnitude value is mapped to). Returns a (signed). */
static float fit_scale_sym(const float *x, int n, int nmax)
{
    float amax, max = signed_absmax(x, n, &amax);
    if (amax == 0.0f)
        return 0.0f;
    float best_a = max / (float)-nmax, best_err = INFINITY;
    for (int t = -10; t <= 10; t++) {
        const float iscale = -((float)nmax + 0.1f * (float)t) / max;
        double sxl = 0, sl2 = 0;
        int8_t L[32];
        for (int j = 0; j < n; j++) {
            int l = clampi(nearest(x[j] * iscale), -nmax, nmax - 1);
            L[j] = (int8_t)l;
            sxl += (double)x[j] * l;
            sl2 += (double)l * l;
        }
        if (sl2 <= 0)
            continue;
        const float a = (float)(sxl / sl2);
        float err = 0.0f;
        for (int j = 0; j < n; j++) {
            float e = a * (float)L[j] - x[j];
            err += e * e;
        }
        if (err < best_err) {
            best_err = err;
            best_a = a;
        }
    }
    return best_a;
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32, each fitted with
 * fit_scale_min, scales and mins then quantized to 6 bits against half super-scales d, dmin;
 * finally every value is re-rounded with the scales as stored. Writes d, dmin, the packed
 * scales and L (256 levels). */
static void quant_k_asym(const float *x, int nmax, uint16_t *d_out, uint16_t *dmin_out,
                         uint8_t packed[G3_K_SCALE_SIZE], uint8_t L[G3_QK_K])
{
    float sc[8], mins[8], max_sc = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        sc[j] = fit_scale_min(x + 32 * j, 32, nmax, &mins[j]);
        max_sc = sc[j] > max_sc ? sc[j] : max_sc;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    *d_out = g3_fp32_to_fp16(max_sc / 63.0f);
    *dmin_out = g3_fp32_to_fp16(max_min / 63.0f);
    const float d = g3_fp16_to_fp32(*d_out), dmin = g3_fp16_to_fp32(*dmin_out);
    uint8_t qsc[8], qm[8];
    for (int j = 0; j < 8; j++) {
        qsc[j] = (uint8_t)(d > 0.0f ? clampi(nearest(sc[j] / d), 0, 63) : 0);
        qm[j] = (uint8_t)(dmin > 0.0f ? clampi(nearest(mins[j] / dmin), 0, 63) : 0);
    }
    memset(packed, 0, G3_K_SCALE_SIZE);
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            packed[j] |= qsc[j];
            packed[j + 4] |= qm[j];
        } else {
            packed[j + 4] = (uint8_t)((qsc[j] & 0xF) | ((qm[j] & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((qsc[j] >> 4) << 6);
            packed[j] |= (uint8_t)((qm[j] >> 4) << 6);
        }
    }
    for (int j = 0; j < 8; j++) {
        const float s = d * (float)qsc[j], m = dmin * (float)qm[j];
        for (int k = 0; k < 32; k++)
            L[32 * j + k] = (uint8_t)(s > 0.0f ? clampi(nearest((x[32 * j + k] + m) / s), 0, nmax) : 0);
    }
}

void g3_quant_q4_k_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q4_k *b = dst;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++, src += G3_QK_K) {
        uint8_t L[G3_QK_K];
        uint16_t d, dmin;
        quant_k_asym(src, 15, &d, &dmin, b->scales, L);
        b->d = d;
        b->dmin = dmin;
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                b->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

void g3_quant_q5_k_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q5_k *b = dst;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++, src += G3_QK_K) {
        uint8_t L[G3_QK_K];
        uint16_t d, dmin;
        quant_k_asym(src, 31, &d, &dmin, b->scales, L);
        b->d = d;
        b->dmin = dmin;
        memset(b->qh, 0, sizeof b->qh);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                const int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                b->qs[32 * c + l] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
                b->qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            }
        }
    }
}

/* 16 sub-blocks of 16 fitted with fit_scale_sym on the 6-bit grid -32..31; the sub-block scales are
 * quantized to int8 with the largest-magnitude one mapped to -128 against a half super-scale. */
void g3_quant_q6_k_ref(const float *src, void *dst, int64_t n)
{
    g3_block_q6_k *b = dst;
    for (int64_t i = 0; i < n / G3_QK_K; i++, b++, src += G3_QK_K) {
        float sc[16], amax;
        for (int j = 0; j < 16; j++)
            sc[j] = fit_scale_sym(src + 16 * j, 16, 32);
        const float max = signed_absmax(sc, 16, &amax);
        b->d = g3_fp32_to_fp16(max / -128.0f);
        const float d = g3_fp16_to_fp32(b->d);
        uint8_t L[G3_QK_K];
        for (int j = 0; j < 16; j++) {
            const int q = d != 0.0f ? clampi(nearest(sc[j] / d), -128, 127) : 0;
            b->scales[j] = (int8_t)q;
            const float s = d * (float)q;
            for (int k = 0; k < 16; k++) {
                const int l = s != 0.0f ? clampi(nearest(src[16 * j + k] / s), -32, 31) : 0;
                L[16 * j + k] = (uint8_t)(l + 32);
            }
        }
        for (int h = 0; h < 2; h++) {
            uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            const uint8_t *q = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((q[l] & 0xF) | ((q[l + 64] & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4));
                qh[l] = (uint8_t)((q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) |
                                  ((q[l + 96] >> 4) << 6));
            }
        }
    }
}

/* Index of the IQ4_NL level nearest to v (levels in units of d). */
static int iq4nl_nearest(float v)
{
    int best = 0;
    float best_e = fabsf(v - (float)g3_kvalues_iq4nl[0]);
    for (int k = 1; k < 16; k++) {
        float e = fabsf(v - (float)g3_kvalues_iq4nl[k]);
        if (e < best_e) {
            best_e = e;
            best = k;
        }
    }
    return best;
}

/* Per 32: candidate scales map the largest-magnitude value near the -127 end of the grid; each
 * candidate's nearest-level assignment is refitted by least squares (d = <x,k>/<k,k>), the best
 * d is stored as a half and the levels are re-chosen as the nearest ones for that stored d. */
void g3_quant_iq4_nl_ref(const float *src, void *dst, int64_t n)
{
    g3_block_iq4_nl *b = dst;
    for (int64_t i = 0; i < n / G3_QK4_NL; i++, b++, src += G3_QK4_NL) {
        float amax, max = signed_absmax(src, G3_QK4_NL, &amax);
        float best_d = max / -127.0f, best_err = INFINITY;
        for (int t = -10; amax > 0.0f && t <= 10; t++) {
            const float id = -(127.0f + 1.0f * (float)t) / max;
            double sxk = 0, skk = 0;
            int idx[G3_QK4_NL];
            for (int j = 0; j < G3_QK4_NL; j++) {
                idx[j] = iq4nl_nearest(src[j] * id);
                const double k = g3_kvalues_iq4nl[idx[j]];
                sxk += src[j] * k;
                skk += k * k;
            }
            const float d = (float)(sxk / skk);
            float err = 0.0f;
            for (int j = 0; j < G3_QK4_NL; j++) {
                float e = d * (float)g3_kvalues_iq4nl[idx[j]] - src[j];
                err += e * e;
            }
            if (err < best_err) {
                best_err = err;
                best_d = d;
            }
        }
        b->d = g3_fp32_to_fp16(best_d);
        const float d = g3_fp16_to_fp32(b->d), id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 16; j++) {
            const int q0 = iq4nl_nearest(src[j] * id), q1 = iq4nl_nearest(src[j + 16] * id);
            b->qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}
