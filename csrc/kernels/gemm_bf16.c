/* gemm_bf16.c — bf16 x bf16 -> float32 matrix products (layouts and contract in gemm_bf16.h).
 *
 * Blocking: C blocks of BM x BN (BM = 16 tiles of MR rows, BN = 8 panels of NR columns) go to the
 * threads whole. Inside a block, the pairs are taken KC at a time: for each panel, the
 * (KC x NR) slice of the weights (16 KiB) stays in L1 while every tile of the block's
 * activations (12 x KC words each, the block's 96 KiB in L2) runs through the micro-kernel.
 * The micro-kernel keeps a 12 x 32 tile of C in 24 zmm accumulators.
 */
#include "kernels/gemm_bf16.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dispatch.h"
#include "kernels/ops.h"

#define MR G3_BF16_MR
#define NR G3_BF16_NR
#define BM_TILES 16 /* tiles of MR rows per C block */
#define BN_PANELS 8 /* panels of NR columns per C block */
#define KC 128      /* input pairs per pass over a block */

static inline uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

uint16_t g3_f32_to_bf16(float f) { return f2bf(f); }

float g3_bf16_to_f32(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t pair(const float *x, int64_t k, int64_t K)
{
    const uint32_t lo = f2bf(x[k]);
    const uint32_t hi = k + 1 < K ? f2bf(x[k + 1]) : 0;
    return lo | hi << 16;
}

size_t g3_bf16_act_words(int64_t M, int64_t K)
{
    return (size_t)((M + MR - 1) / MR) * MR * (size_t)((K + 1) / 2);
}

static void pack_row_ref(const float *x, int64_t K, uint32_t *d)
{
    for (int64_t p = 0; p < (K + 1) / 2; p++)
        d[p] = pair(x, 2 * p, K);
}

#define PACK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

/* f2bf on 16 lanes (bit-identical): each lane's bf16 in its low 16 bits. */
PACK_TARGET static inline __m512i round16(__m512 f)
{
    const __m512i u = _mm512_castps_si512(f);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                         _mm512_and_si512(hi, _mm512_set1_epi32(1))),
        16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

/* The same rounding on 16 lanes, then vpmovdw packs the 16 halves into 8 pair words in order. */
PACK_TARGET static void pack_row_avx512(const float *x, int64_t K, uint32_t *d)
{
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m256i h = _mm512_cvtepi32_epi16(round16(_mm512_maskz_loadu_ps(m, x + k)));
        const int64_t words = K - k >= 16 ? 16 : (K - k + 1) / 2 * 2; /* whole pairs */
        _mm256_mask_storeu_epi16((uint16_t *)d + k, (__mmask16)((1u << words) - 1), h);
    }
}

void g3_bf16_pack_rows(const float *X, int64_t ldx, int64_t K, int64_t r0, int64_t r1, int64_t M,
                       uint32_t *dst, int64_t lda)
{
    const int simd = g3_isa_selected() >= G3_ISA_AVX512;
    for (int64_t r = r0; r < r1; r++) {
        if (simd)
            pack_row_avx512(X + r * ldx, K, dst + r * lda);
        else
            pack_row_ref(X + r * ldx, K, dst + r * lda);
    }
    if (r1 == M)
        for (int64_t r = M; r < (M + MR - 1) / MR * MR; r++)
            memset(dst + r * lda, 0, sizeof(uint32_t) * (size_t)lda);
}

void g3_bf16_pack_act(const float *X, int64_t M, int64_t K, int64_t ldx, uint32_t *dst, int nt)
{
    const int64_t ntile = (M + MR - 1) / MR, kp = (K + 1) / 2;
#pragma omp parallel for num_threads(nt) schedule(static) if(ntile > 1)
    for (int64_t t = 0; t < ntile; t++) {
        const int64_t r1 = (t + 1) * MR < M ? (t + 1) * MR : M;
        g3_bf16_pack_rows(X, ldx, K, t * MR, r1, M, dst, kp);
    }
}

void g3_bf16_pack_panels(const float *W, int64_t rows, int64_t cols, int64_t ld, uint32_t *dst)
{
    const int64_t kp = (cols + 1) / 2, np = (rows + NR - 1) / NR;
    const int simd = g3_isa_selected() >= G3_ISA_AVX512;
    uint32_t words[64];
    for (int64_t j = 0; j < np; j++)
        for (int64_t c = 0; c < NR; c++) {
            const int64_t r = j * NR + c;
            uint32_t *d = dst + j * kp * NR + c;
            if (r >= rows) {
                for (int64_t p = 0; p < kp; p++)
                    d[p * NR] = 0;
                continue;
            }
            for (int64_t p0 = 0; p0 < kp; p0 += 64) { /* 128 inputs at a time, then scattered */
                const int64_t n = cols - 2 * p0 < 128 ? cols - 2 * p0 : 128;
                if (simd)
                    pack_row_avx512(W + r * ld + 2 * p0, n, words);
                else
                    pack_row_ref(W + r * ld + 2 * p0, n, words);
                for (int64_t i = 0; i < (n + 1) / 2; i++)
                    d[(p0 + i) * NR] = words[i];
            }
        }
}

/* Pair words of 16 columns of two rows: lo = x0[c], hi = x1[c] (x1 NULL: zeros). */
PACK_TARGET static void pair_cols_avx512(const float *x0, const float *x1, int n, uint32_t *d)
{
    const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const __m512i lo = round16(_mm512_maskz_loadu_ps(m, x0));
    const __m512i hi = x1 ? round16(_mm512_maskz_loadu_ps(m, x1)) : _mm512_setzero_si512();
    _mm512_storeu_si512(d, _mm512_maskz_mov_epi32(m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16))));
}

void g3_bf16_pack_panels_t(const float *X, int64_t n, int64_t c, int64_t ld, uint32_t *dst)
{
    const int64_t kp = (n + 1) / 2, np = (c + NR - 1) / NR;
    const int simd = g3_isa_selected() >= G3_ISA_AVX512;
    for (int64_t j = 0; j < np; j++)
        for (int64_t p = 0; p < kp; p++) {
            const float *x0 = X + 2 * p * ld + j * NR;
            const float *x1 = 2 * p + 1 < n ? x0 + ld : NULL;
            uint32_t *d = dst + (j * kp + p) * NR;
            const int64_t w = c - j * NR < NR ? c - j * NR : NR; /* valid columns */
            if (simd) {
                pair_cols_avx512(x0, x1, (int)(w < 16 ? w : 16), d);
                pair_cols_avx512(x0 + 16, x1 ? x1 + 16 : NULL, (int)(w > 16 ? w - 16 : 0),
                                 d + 16);
                continue;
            }
            for (int64_t cc = 0; cc < NR; cc++) {
                if (cc >= w) {
                    d[cc] = 0;
                    continue;
                }
                const uint32_t lo = f2bf(x0[cc]);
                const uint32_t hi = x1 ? f2bf(x1[cc]) : 0;
                d[cc] = lo | hi << 16;
            }
        }
}

void g3_bf16_mat_free(g3_bf16_mat *m)
{
    free(m->data);
    memset(m, 0, sizeof *m);
}

g3_status g3_bf16_mat_from_weights(int n, const g3_weight *const *W, g3_bf16_mat *out,
                                   g3_err *err)
{
    memset(out, 0, sizeof *out);
    int64_t rows = 0;
    const int64_t cols = W[0]->cols;
    for (int i = 0; i < n; i++) {
        if (W[i]->cols != cols)
            return g3_fail(err, G3_ERR_STATE, "bf16 pack: stacked weights differ in width");
        rows += W[i]->rows;
    }
    out->rows = rows;
    out->cols = cols;
    out->kp = (cols + 1) / 2;
    out->npanel = (rows + NR - 1) / NR;
    out->data = malloc(sizeof(uint32_t) * (size_t)(out->npanel * out->kp * NR));
    float *tmp = malloc(sizeof(float) * (size_t)NR * (size_t)cols);
    if (!out->data || !tmp) {
        free(tmp);
        g3_bf16_mat_free(out);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory converting a %lld x %lld matrix to bf16",
                       (long long)rows, (long long)cols);
    }
    for (int64_t j = 0; j < out->npanel; j++) {
        const int64_t r0 = j * NR, nr = r0 + NR <= rows ? NR : rows - r0;
        for (int64_t c = 0; c < nr; c++) { /* global row r0 + c of the stack */
            int64_t r = r0 + c;
            int i = 0;
            while (r >= W[i]->rows)
                r -= W[i++]->rows;
            g3_weight_row(W[i], r, tmp + c * cols);
        }
        /* one panel; rows past the stack (nr < NR in the last panel) are zeroed */
        g3_bf16_pack_panels(tmp, nr, cols, cols, out->data + j * out->kp * NR);
    }
    free(tmp);
    return G3_OK;
}

g3_status g3_bf16_mat_from_weight(const g3_weight *W, g3_bf16_mat *out, g3_err *err)
{
    const g3_weight *ws[1] = {W};
    return g3_bf16_mat_from_weights(1, ws, out, err);
}

/* ---- micro-kernels: C tile (m <= MR rows, n <= NR cols) (+)= A tile x W panel over kp pairs -- */

typedef void (*kern_fn)(int64_t kp, const uint32_t *A, int64_t lda, const uint32_t *B, float *C,
                        int64_t ldc, int m, int n, int load_c);

static void kern_ref(int64_t kp, const uint32_t *A, int64_t lda, const uint32_t *B, float *C,
                     int64_t ldc, int m, int n, int load_c)
{
    for (int r = 0; r < m; r++) {
        float acc[NR];
        for (int c = 0; c < NR; c++)
            acc[c] = load_c && c < n ? C[r * ldc + c] : 0.0f;
        for (int64_t p = 0; p < kp; p++) {
            const uint32_t a = A[r * lda + p];
            const float a0 = g3_bf16_to_f32((uint16_t)a), a1 = g3_bf16_to_f32((uint16_t)(a >> 16));
            const uint32_t *b = B + p * NR;
            for (int c = 0; c < NR; c++) {
                acc[c] += a1 * g3_bf16_to_f32((uint16_t)(b[c] >> 16));
                acc[c] += a0 * g3_bf16_to_f32((uint16_t)b[c]);
            }
        }
        for (int c = 0; c < n; c++)
            C[r * ldc + c] = acc[c];
    }
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* c += pairs of b . the pair at *m broadcast to every lane, the broadcast embedded in the
 * instruction's memory operand ({1to16}): no separate broadcast uop competes with the dot
 * products (the result is the intrinsic's: per lane the same two products, in the same order). */
#define DPBCST(c, b, m) __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(c) : "v"(b), "m"(m))

/* NV zmm columns (1: n <= 16, 2: n <= 32); the loops over rows are unrolled so that the
 * accumulators live in registers. */
#define KERN_BODY(NV)                                                                              \
    __m512 c0[MR], c1[MR];                                                                         \
    const __mmask16 k0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);                 \
    const __mmask16 k1 = n >= 32 ? (__mmask16)0xFFFF                                               \
                                 : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : (__mmask16)0;      \
    _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++)                                          \
    {                                                                                              \
        c0[r] = load_c && r < m ? _mm512_maskz_loadu_ps(k0, C + r * ldc) : _mm512_setzero_ps();    \
        if (NV == 2)                                                                               \
            c1[r] = load_c && r < m ? _mm512_maskz_loadu_ps(k1, C + r * ldc + 16)                  \
                                    : _mm512_setzero_ps();                                         \
    }                                                                                              \
    for (int64_t p = 0; p < kp; p++) {                                                             \
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + p * NR);                              \
        __m512bh b1 = b0;                                                                          \
        if (NV == 2)                                                                               \
            b1 = (__m512bh)_mm512_loadu_si512(B + p * NR + 16);                                    \
        const uint32_t *a = A + p;                                                                 \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++)                                      \
        {                                                                                          \
            DPBCST(c0[r], b0, a[r * lda]);                                                         \
            if (NV == 2)                                                                           \
                DPBCST(c1[r], b1, a[r * lda]);                                                     \
        }                                                                                          \
    }                                                                                              \
    _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++)                                          \
    {                                                                                              \
        if (r < m) {                                                                               \
            _mm512_mask_storeu_ps(C + r * ldc, k0, c0[r]);                                         \
            if (NV == 2)                                                                           \
                _mm512_mask_storeu_ps(C + r * ldc + 16, k1, c1[r]);                                \
        }                                                                                          \
    }

BF16_TARGET static void kern_avx512_1(int64_t kp, const uint32_t *A, int64_t lda, const uint32_t *B, float *C,
                                      int64_t ldc, int m, int n, int load_c)
{
    KERN_BODY(1)
}

BF16_TARGET static void kern_avx512_2(int64_t kp, const uint32_t *A, int64_t lda, const uint32_t *B, float *C,
                                      int64_t ldc, int m, int n, int load_c)
{
    KERN_BODY(2)
}

BF16_TARGET static void kern_avx512(int64_t kp, const uint32_t *A, int64_t lda, const uint32_t *B, float *C,
                                    int64_t ldc, int m, int n, int load_c)
{
    if (n > 16)
        kern_avx512_2(kp, A, lda, B, C, ldc, m, n, load_c);
    else
        kern_avx512_1(kp, A, lda, B, C, ldc, m, n, load_c);
}

static kern_fn pick(int simd) { return simd && g3_isa_bf16() ? kern_avx512 : kern_ref; }

static void block_with(kern_fn kern, g3_bf16_act A, g3_bf16_wv W, int64_t M, int64_t N,
                       int64_t kp, float *C, int64_t ldc, int accumulate)
{
    const int64_t ntile = (M + MR - 1) / MR, npan = (N + NR - 1) / NR;
    for (int64_t p0 = 0; p0 < kp || p0 == 0; p0 += KC) {
        const int64_t kc = p0 + KC < kp ? KC : kp - p0;
        const int load = accumulate || p0 > 0;
        for (int64_t j = 0; j < npan; j++) {
            const uint32_t *B = W.data + j * W.pstride + p0 * NR;
            const int n = (int)(N - j * NR < NR ? N - j * NR : NR);
            for (int64_t t = 0; t < ntile; t++) {
                const int m = (int)(M - t * MR < MR ? M - t * MR : MR);
                kern(kc, A.data + t * MR * A.lda + p0, A.lda, B, C + t * MR * ldc + j * NR, ldc,
                     m, n, load);
            }
        }
        if (kp == 0)
            break;
    }
}

void g3_bf16_gemm_block(g3_bf16_act A, g3_bf16_wv W, int64_t M, int64_t N, int64_t kp, float *C,
                        int64_t ldc, int accumulate)
{
    block_with(pick(1), A, W, M, N, kp, C, ldc, accumulate);
}

void g3_bf16_gemm_isa(const uint32_t *A, int64_t M, const g3_bf16_mat *W, float *C, int64_t ldc,
                      const g3_bf16_epi *epi, int nt, int simd)
{
    const kern_fn kern = pick(simd);
    const int64_t N = W->rows, kp = W->kp;
    const int64_t bm = BM_TILES * MR, bn = BN_PANELS * NR;
    const int64_t nbm = (M + bm - 1) / bm, nbn = (N + bn - 1) / bn;
    const g3_bf16_epi none = {NULL, 0, 0};
    const g3_bf16_epi *e = epi ? epi : &none;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if(nbm * nbn > 1)
    for (int64_t b = 0; b < nbm * nbn; b++) {
        const int64_t i0 = b / nbn * bm, j0 = b % nbn * bn;
        const int64_t m = i0 + bm < M ? bm : M - i0, n = j0 + bn < N ? bn : N - j0;
        const g3_bf16_act a = {A + i0 * kp, kp};
        const g3_bf16_wv w = {W->data + (j0 / NR) * kp * NR, kp * NR};
        float *Cb = C + i0 * ldc + j0;
        block_with(kern, a, w, m, n, kp, Cb, ldc, e->accumulate);
        if (e->gelu && e->bias)
            for (int64_t r = 0; r < m; r++)
                g3_gelu_bias_f32(Cb + r * ldc, e->bias + j0, n);
        else if (e->bias)
            for (int64_t r = 0; r < m; r++) {
                float *row = Cb + r * ldc;
                const float *bias = e->bias + j0;
                for (int64_t c = 0; c < n; c++)
                    row[c] += bias[c];
            }
    }
}

void g3_bf16_gemm(const uint32_t *A, int64_t M, const g3_bf16_mat *W, float *C, int64_t ldc,
                  const g3_bf16_epi *epi, int nt)
{
    g3_bf16_gemm_isa(A, M, W, C, ldc, epi, nt, 1);
}
