/* attention_vision.c — fused online-softmax attention of the vision tower (attention_vision.h). */
#include "kernels/attention_vision.h"

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

/* ---- float32 blocks: C (m x n, n <= 32) (+)= A (m x K, rows at lda) B (K x n, rows at ldb) ---- */

#define FMR 12
#define FNR 32

typedef void (*fkern_fn)(int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                         float *C, int64_t ldc, int m, int n, int load_c);

static void fkern_ref(int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                      float *C, int64_t ldc, int m, int n, int load_c)
{
    for (int r = 0; r < m; r++) {
        float acc[FNR];
        for (int c = 0; c < n; c++)
            acc[c] = load_c ? C[r * ldc + c] : 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float a = A[r * lda + k];
            for (int c = 0; c < n; c++)
                acc[c] = fmaf(a, B[k * ldb + c], acc[c]);
        }
        for (int c = 0; c < n; c++)
            C[r * ldc + c] = acc[c];
    }
}

#define FKERN_BODY(NV)                                                                             \
    __m512 c0[FMR], c1[FMR];                                                                       \
    const __mmask16 k0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);                 \
    const __mmask16 k1 = n >= 32 ? (__mmask16)0xFFFF                                               \
                                 : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : (__mmask16)0;      \
    _Pragma("GCC unroll 12") for (int r = 0; r < FMR; r++)                                         \
    {                                                                                              \
        c0[r] = load_c && r < m ? _mm512_maskz_loadu_ps(k0, C + r * ldc) : _mm512_setzero_ps();    \
        if (NV == 2)                                                                               \
            c1[r] = load_c && r < m ? _mm512_maskz_loadu_ps(k1, C + r * ldc + 16)                  \
                                    : _mm512_setzero_ps();                                         \
    }                                                                                              \
    for (int64_t k = 0; k < K; k++) {                                                              \
        const __m512 b0 = _mm512_maskz_loadu_ps(k0, B + k * ldb);                                  \
        __m512 b1 = b0;                                                                            \
        if (NV == 2)                                                                               \
            b1 = _mm512_maskz_loadu_ps(k1, B + k * ldb + 16);                                      \
        const float *a = A + k;                                                                    \
        _Pragma("GCC unroll 12") for (int r = 0; r < FMR; r++)                                     \
        {                                                                                          \
            const __m512 av = _mm512_set1_ps(r < m ? a[r * lda] : 0.0f);                           \
            c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);                                                \
            if (NV == 2)                                                                           \
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);                                            \
        }                                                                                          \
    }                                                                                              \
    _Pragma("GCC unroll 12") for (int r = 0; r < FMR; r++)                                         \
    {                                                                                              \
        if (r < m) {                                                                               \
            _mm512_mask_storeu_ps(C + r * ldc, k0, c0[r]);                                         \
            if (NV == 2)                                                                           \
                _mm512_mask_storeu_ps(C + r * ldc + 16, k1, c1[r]);                                \
        }                                                                                          \
    }

#define F32_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

F32_TARGET static void fkern_avx512_1(int64_t K, const float *A, int64_t lda, const float *B,
                                      int64_t ldb, float *C, int64_t ldc, int m, int n, int load_c)
{
    FKERN_BODY(1)
}

F32_TARGET static void fkern_avx512_2(int64_t K, const float *A, int64_t lda, const float *B,
                                      int64_t ldb, float *C, int64_t ldc, int m, int n, int load_c)
{
    FKERN_BODY(2)
}

F32_TARGET static void fkern_avx512(int64_t K, const float *A, int64_t lda, const float *B,
                                    int64_t ldb, float *C, int64_t ldc, int m, int n, int load_c)
{
    if (n > 16)
        fkern_avx512_2(K, A, lda, B, ldb, C, ldc, m, n, load_c);
    else
        fkern_avx512_1(K, A, lda, B, ldb, C, ldc, m, n, load_c);
}

/* C (M x N) (+)= A (M x K) B (K x N): B column panel j at B + j * pstride, row k of it at
 * + k * ldb. Tiles of FMR rows; the panel stays in L1 across the tiles. */
static void fblock(fkern_fn kern, const float *A, int64_t lda, const float *B, int64_t pstride,
                   int64_t ldb, int64_t M, int64_t N, int64_t K, float *C, int64_t ldc, int acc)
{
    for (int64_t j = 0; j < N; j += FNR) {
        const int n = (int)(N - j < FNR ? N - j : FNR);
        for (int64_t i = 0; i < M; i += FMR) {
            const int m = (int)(M - i < FMR ? M - i : FMR);
            kern(K, A + i * lda, lda, B + (j / FNR) * pstride, ldb, C + i * ldc + j, ldc, m, n,
                 acc);
        }
    }
}

size_t g3_attn_fkey_floats(int64_t P, int64_t hd)
{
    return (size_t)((P + FNR - 1) / FNR) * (size_t)hd * FNR;
}

void g3_attn_pack_keys_f32(const float *K, int64_t ldk, int64_t P, int64_t hd, int64_t panel,
                           float *kpan)
{
    float *d = kpan + (size_t)panel * hd * FNR;
    for (int64_t k = 0; k < hd; k++)
        for (int64_t c = 0; c < FNR; c++) {
            const int64_t r = panel * FNR + c;
            d[k * FNR + c] = r < P ? K[r * ldk + k] : 0.0f;
        }
}

void g3_attn_fused_rows(const float *Q, int64_t ldq, const float *K, const float *V, int64_t ldk,
                        const uint32_t *kpan, const uint32_t *vpan, const float *fkpan, int64_t P,
                        int64_t hd, int64_t nq, float scale, float *z, int64_t ldz, float *wsf)
{
    const fkern_fn fk = g3_isa_selected() >= G3_ISA_AVX512 ? fkern_avx512 : fkern_ref;
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
            fblock(fk, Q, ldq, fkpan + (kb / FNR) * hd * FNR, hd * FNR, FNR, nq, kn, hd, w.S, AKB,
                   0);
        }
        online_rows(w.S, nq, kn, scale, w.m, w.l, w.O, hd);
        if (kpan) {
            const int64_t kpn = (kn + 1) / 2;
            g3_bf16_pack_rows(w.S, AKB, kn, 0, nq, nq, w.pa, kpn);
            const g3_bf16_act a = {w.pa, kpn};
            const g3_bf16_wv vw = {vpan + (kb / 2) * NR, ((P + 1) / 2) * NR};
            g3_bf16_gemm_block(a, vw, nq, hd, kpn, w.O, hd, 1);
        } else {
            fblock(fk, w.S, AKB, V + kb * ldk, FNR, ldk, nq, hd, kn, w.O, hd, 1);
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
    float *fk = malloc(sizeof(float) * g3_attn_fkey_floats(P, hd));
    if (bf16 && g3_isa_bf16()) {
        kp = malloc(sizeof(uint32_t) * g3_attn_kpan_words(P, hd));
        vp = malloc(sizeof(uint32_t) * g3_attn_vpan_words(P, hd));
    }
    if (!ws || !fk || (bf16 && g3_isa_bf16() && (!kp || !vp))) {
        free(ws);
        free(fk);
        free(kp);
        free(vp);
        return G3_ERR_NOMEM;
    }
    if (kp) {
        for (int64_t j = 0; j < (P + G3_BF16_NR - 1) / G3_BF16_NR; j++)
            g3_attn_pack_keys(K, hd, P, hd, j, kp);
        g3_attn_pack_values(V, hd, P, hd, vp);
    } else
        for (int64_t j = 0; j < (P + FNR - 1) / FNR; j++)
            g3_attn_pack_keys_f32(K, hd, P, hd, j, fk);
    for (int64_t r = 0; r < P; r += AQB)
        g3_attn_fused_rows(Q + r * hd, hd, K, V, hd, kp, vp, fk, P, hd, P - r < AQB ? P - r : AQB,
                           scale, z + r * hd, hd, ws);
    free(ws);
    free(fk);
    free(kp);
    free(vp);
    return G3_OK;
}
