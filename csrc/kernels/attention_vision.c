/* attention_vision.c — fused online-softmax attention of the vision tower (attention_vision.h). */
#include "kernels/attention_vision.h"

#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dispatch.h"
#include "kernels/gemm_bf16.h"
#include "kernels/ops.h"

#define AQB G3_ATTN_QB
#define AKB G3_ATTN_KB

static size_t act_floats(int64_t M, int64_t K) { return g3_bf16_act_words(M, K); } /* 4 bytes */

size_t g3_attn_fused_ws_floats(int64_t hd)
{
    return (size_t)AQB * AKB + (size_t)AQB * hd + 2 * (size_t)AQB + act_floats(AQB, hd) +
           act_floats(AQB, AKB);
}

size_t g3_attn_kpan_words(int64_t P, int64_t hd)
{
    return (size_t)((P + G3_BF16_NR - 1) / G3_BF16_NR) * (size_t)((hd + 1) / 2) * G3_BF16_NR;
}
size_t g3_attn_vpan_words(int64_t P, int64_t hd)
{
    return (size_t)((hd + G3_BF16_NR - 1) / G3_BF16_NR) * (size_t)((P + 1) / 2) * G3_BF16_NR;
}

/* Row r of the block's scores S[0:kn) (already scaled) joins the running softmax: S becomes
 * exp(S - m_new), the sum and the partial output O are rescaled by exp(m_old - m_new). */
/* row[j] *= scale (unless scale is 1), returns max_j row[j]. */
static float scale_max_ref(float *row, int64_t n, float scale)
{
    float bm = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        if (scale != 1.0f)
            row[j] *= scale;
        bm = row[j] > bm ? row[j] : bm;
    }
    return bm;
}

__attribute__((target("avx512f"))) static float scale_max_avx512(float *row, int64_t n,
                                                                 float scale)
{
    const __m512 s = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(k, row + j);
        if (scale != 1.0f) {
            x = _mm512_mul_ps(x, s);
            _mm512_mask_storeu_ps(row + j, k, x);
        }
        mx = _mm512_mask_max_ps(mx, k, mx, x);
    }
    return _mm512_reduce_max_ps(mx);
}

__attribute__((target("avx512f"))) static void scale_row_avx512(float *o, int64_t n, float a)
{
    const __m512 s = _mm512_set1_ps(a);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(o + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o + j), s));
    }
}

static void online_rows(float *S, int64_t nq, int64_t kn, float scale, float *m, float *l,
                        float *O, int64_t hd)
{
    const int simd = g3_isa_selected() >= G3_ISA_AVX512;
    for (int64_t r = 0; r < nq; r++) {
        float *row = S + r * AKB;
        const float bm = simd ? scale_max_avx512(row, kn, scale) : scale_max_ref(row, kn, scale);
        const float mn = bm > m[r] ? bm : m[r];
        const float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mn);
        const float sum = (float)g3_expsum_f32(row, kn, mn);
        l[r] = l[r] * alpha + sum;
        if (alpha != 1.0f) {
            if (simd)
                scale_row_avx512(O + r * hd, hd, alpha);
            else
                for (int64_t c = 0; c < hd; c++)
                    O[r * hd + c] *= alpha;
        }
        m[r] = mn;
    }
}

typedef struct {
    float *S, *O, *m, *l;
    uint32_t *qa, *pa;
} attn_ws;

static attn_ws carve(float *ws, int64_t hd)
{
    attn_ws w;
    w.S = ws;
    w.O = w.S + (size_t)AQB * AKB;
    w.m = w.O + (size_t)AQB * hd;
    w.l = w.m + AQB;
    w.qa = (uint32_t *)(w.l + AQB);
    w.pa = w.qa + act_floats(AQB, hd);
    return w;
}

void g3_attn_fused_rows(const float *Q, int64_t ldq, const float *K, const float *V, int64_t ldk,
                      const uint32_t *kpan, const uint32_t *vpan, int64_t P, int64_t hd,
                      int64_t nq, float scale, float *z, int64_t ldz, float *wsf)
{
    attn_ws w = carve(wsf, hd);
    const int64_t kph = (hd + 1) / 2, NR = G3_BF16_NR;
    for (int64_t r = 0; r < nq; r++) {
        w.m[r] = -INFINITY;
        w.l[r] = 0.0f;
    }
    memset(w.O, 0, sizeof(float) * (size_t)(nq * hd));
    if (kpan)
        g3_bf16_pack_rows(Q, ldq, hd, 0, nq, nq, w.qa, kph);
    for (int64_t kb = 0; kb < P; kb += AKB) {
        const int64_t kn = kb + AKB < P ? AKB : P - kb;
        if (kpan) {
            const g3_bf16_act a = {w.qa, kph};
            const g3_bf16_wv kw = {kpan + (kb / NR) * kph * NR, kph * NR};
            g3_bf16_gemm_block(a, kw, nq, kn, kph, w.S, AKB, 0);
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)kn, (int)hd, scale,
                        Q, (int)ldq, K + kb * ldk, (int)ldk, 0.0f, w.S, AKB);
        }
        online_rows(w.S, nq, kn, kpan ? scale : 1.0f, w.m, w.l, w.O, hd);
        if (kpan) {
            const int64_t kpn = (kn + 1) / 2;
            g3_bf16_pack_rows(w.S, AKB, kn, 0, nq, nq, w.pa, kpn);
            const g3_bf16_act a = {w.pa, kpn};
            const g3_bf16_wv vw = {vpan + (kb / 2) * NR, ((P + 1) / 2) * NR};
            g3_bf16_gemm_block(a, vw, nq, hd, kpn, w.O, hd, 1);
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)hd, (int)kn, 1.0f,
                        w.S, AKB, V + kb * ldk, (int)ldk, 1.0f, w.O, (int)hd);
        }
    }
    for (int64_t r = 0; r < nq; r++) {
        const float inv = 1.0f / w.l[r];
        for (int64_t c = 0; c < hd; c++)
            z[r * ldz + c] = w.O[r * hd + c] * inv;
    }
}

void g3_attn_pack_keys(const float *K, int64_t ldk, int64_t P, int64_t hd, int64_t panel,
                       uint32_t *kpan)
{
    const int64_t r0 = panel * G3_BF16_NR;
    g3_bf16_pack_panels(K + r0 * ldk, P - r0 < G3_BF16_NR ? P - r0 : G3_BF16_NR, hd, ldk,
                        kpan + (size_t)panel * ((hd + 1) / 2) * G3_BF16_NR);
}

void g3_attn_pack_values(const float *V, int64_t ldk, int64_t P, int64_t hd, uint32_t *vpan)
{
    g3_bf16_pack_panels_t(V, P, hd, ldk, vpan);
}

g3_status g3_attn_fused_head(const float *Q, const float *K, const float *V, int64_t P,
                             int64_t hd, float scale, float *z, int bf16)
{
    uint32_t *kp = NULL, *vp = NULL;
    float *ws = malloc(sizeof(float) * g3_attn_fused_ws_floats(hd));
    if (bf16 && g3_isa_bf16()) {
        kp = malloc(sizeof(uint32_t) * g3_attn_kpan_words(P, hd));
        vp = malloc(sizeof(uint32_t) * g3_attn_vpan_words(P, hd));
    }
    if (!ws || (bf16 && g3_isa_bf16() && (!kp || !vp))) {
        free(ws);
        free(kp);
        free(vp);
        return G3_ERR_NOMEM;
    }
    if (kp) {
        for (int64_t j = 0; j < (P + G3_BF16_NR - 1) / G3_BF16_NR; j++)
            g3_attn_pack_keys(K, hd, P, hd, j, kp);
        g3_attn_pack_values(V, hd, P, hd, vp);
    }
    for (int64_t r = 0; r < P; r += AQB)
        g3_attn_fused_rows(Q + r * hd, hd, K, V, hd, kp, vp, P, hd, P - r < AQB ? P - r : AQB,
                           scale, z + r * hd, hd, ws);
    free(ws);
    free(kp);
    free(vp);
    return G3_OK;
}
