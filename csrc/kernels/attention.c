/* attention.c — attention kernels (math and layouts in attention.h): K/V rows of any stored
 * type, the per-row scores/mix, the flash blocks (scalar reference, AVX2, AVX-512) and driver,
 * and the sgemm tile form. */
#include "kernels/attention.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels/dispatch.h"
#include "kernels/gemm.h"

/* ---- K/V rows of any stored type -------------------------------------------------------------- */

int g3_kv_type_ok(int type, int64_t hd)
{
    switch (type) {
    case G3_TYPE_F32: case G3_TYPE_F16: case G3_TYPE_BF16:
        return hd > 0;
    case G3_TYPE_Q8_0:
        return hd > 0 && hd % 32 == 0;
    default:
        return 0;
    }
}

void g3_kv_row(const g3_kv_span *sp, int which, int64_t j, int64_t hd, float *dst)
{
    const uint8_t *row = (const uint8_t *)(which ? sp->v : sp->k) + (size_t)j * sp->stride;
    if (sp->type == G3_TYPE_F32)
        memcpy(dst, row, sizeof(float) * (size_t)hd);
    else
        g3_type_get(sp->type)->to_float(row, dst, hd);
}

/* A row of floats to read: the stored row itself when float32, else converted into tmp. */
static const float *kv_floats(const g3_kv_span *sp, int which, int64_t j, int64_t hd, float *tmp)
{
    if (sp->type == G3_TYPE_F32)
        return (const float *)((const uint8_t *)(which ? sp->v : sp->k) + (size_t)j * sp->stride);
    g3_kv_row(sp, which, j, hd, tmp);
    return tmp;
}

void g3_attn_scores(const float *q, int64_t hd, const g3_kv_span *sp, int nsp, float scale,
                    float *sc, float *tmp)
{
    const g3_float_kernels *fk = g3_fk();
    for (int s = 0; s < nsp; s++) {
        for (int64_t j = 0; j < sp[s].n; j++)
            sc[j] = fk->dot(q, kv_floats(&sp[s], 0, j, hd, tmp), hd) * scale;
        sc += sp[s].n;
    }
}

void g3_attn_mix(const float *p, const g3_kv_span *sp, int nsp, int64_t hd, float *z, float *tmp)
{
    const g3_float_kernels *fk = g3_fk();
    memset(z, 0, sizeof(float) * (size_t)hd);
    for (int s = 0; s < nsp; s++) {
        for (int64_t j = 0; j < sp[s].n; j++)
            fk->axpy(p[j], kv_floats(&sp[s], 1, j, hd, tmp), z, hd);
        p += sp[s].n;
    }
}

/* ---- flash blocks: scalar references, then SIMD (same fused products, same order) ------------- */

static void attn_qk_scalar(const float *q, int64_t rows, int64_t d, const float *kt, float scale,
                           float *s)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < G3_FA_BK; j++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < d; i++)
                acc = fmaf(q[r * d + i], kt[i * G3_FA_BK + j], acc);
            s[r * G3_FA_BK + j] = acc * scale;
        }
}

static void attn_pv_scalar(const float *p, int64_t rows, int64_t nb, const float *v, int64_t d,
                           float *o)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < d; c++) {
            float acc = o[r * d + c];
            for (int64_t j = 0; j < nb; j++)
                acc = fmaf(p[r * G3_FA_BK + j], v[j * d + c], acc);
            o[r * d + c] = acc;
        }
}

__attribute__((target("avx2,fma"))) static void attn_qk_avx2(const float *q, int64_t rows,
                                                             int64_t d, const float *kt,
                                                             float scale, float *s)
{
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2)
        for (int64_t j = 0; j < G3_FA_BK; j += 32) {
            __m256 a[2][4];
            for (int x = 0; x < 2; x++)
                for (int y = 0; y < 4; y++)
                    a[x][y] = _mm256_setzero_ps();
            for (int64_t i = 0; i < d; i++) {
                const float *k = kt + i * G3_FA_BK + j;
                __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
                __m256 k2 = _mm256_loadu_ps(k + 16), k3 = _mm256_loadu_ps(k + 24);
                for (int x = 0; x < 2; x++) {
                    __m256 b = _mm256_broadcast_ss(q + (r + x) * d + i);
                    a[x][0] = _mm256_fmadd_ps(b, k0, a[x][0]);
                    a[x][1] = _mm256_fmadd_ps(b, k1, a[x][1]);
                    a[x][2] = _mm256_fmadd_ps(b, k2, a[x][2]);
                    a[x][3] = _mm256_fmadd_ps(b, k3, a[x][3]);
                }
            }
            for (int x = 0; x < 2; x++)
                for (int y = 0; y < 4; y++)
                    _mm256_storeu_ps(s + (r + x) * G3_FA_BK + j + 8 * y,
                                     _mm256_mul_ps(a[x][y], vs));
        }
    if (r < rows)
        attn_qk_scalar(q + r * d, rows - r, d, kt, scale, s + r * G3_FA_BK);
}

__attribute__((target("avx2,fma"))) static void attn_pv_avx2(const float *p, int64_t rows,
                                                             int64_t nb, const float *v,
                                                             int64_t d, float *o)
{
    const int64_t d16 = d & ~(int64_t)15;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        for (int64_t c = 0; c < d16; c += 16) {
            __m256 a[4][2];
            for (int x = 0; x < 4; x++) {
                a[x][0] = _mm256_loadu_ps(o + (r + x) * d + c);
                a[x][1] = _mm256_loadu_ps(o + (r + x) * d + c + 8);
            }
            for (int64_t j = 0; j < nb; j++) {
                __m256 v0 = _mm256_loadu_ps(v + j * d + c), v1 = _mm256_loadu_ps(v + j * d + c + 8);
                for (int x = 0; x < 4; x++) {
                    __m256 b = _mm256_broadcast_ss(p + (r + x) * G3_FA_BK + j);
                    a[x][0] = _mm256_fmadd_ps(b, v0, a[x][0]);
                    a[x][1] = _mm256_fmadd_ps(b, v1, a[x][1]);
                }
            }
            for (int x = 0; x < 4; x++) {
                _mm256_storeu_ps(o + (r + x) * d + c, a[x][0]);
                _mm256_storeu_ps(o + (r + x) * d + c + 8, a[x][1]);
            }
        }
    /* rows past the last group of 4 and columns past the last 16: the reference */
    for (int64_t rr = 0; rr < rows; rr++)
        for (int64_t c = rr < r ? d16 : 0; c < d; c++) {
            float acc = o[rr * d + c];
            for (int64_t j = 0; j < nb; j++)
                acc = fmaf(p[rr * G3_FA_BK + j], v[j * d + c], acc);
            o[rr * d + c] = acc;
        }
}

__attribute__((target("avx512f"))) static void attn_qk_avx512(const float *q, int64_t rows,
                                                              int64_t d, const float *kt,
                                                              float scale, float *s)
{
    const __m512 vs = _mm512_set1_ps(scale);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        __m512 a[4][4];
        for (int x = 0; x < 4; x++)
            for (int y = 0; y < 4; y++)
                a[x][y] = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i++) {
            const float *k = kt + i * G3_FA_BK;
            __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16);
            __m512 k2 = _mm512_loadu_ps(k + 32), k3 = _mm512_loadu_ps(k + 48);
            for (int x = 0; x < 4; x++) {
                __m512 b = _mm512_set1_ps(q[(r + x) * d + i]);
                a[x][0] = _mm512_fmadd_ps(b, k0, a[x][0]);
                a[x][1] = _mm512_fmadd_ps(b, k1, a[x][1]);
                a[x][2] = _mm512_fmadd_ps(b, k2, a[x][2]);
                a[x][3] = _mm512_fmadd_ps(b, k3, a[x][3]);
            }
        }
        for (int x = 0; x < 4; x++)
            for (int y = 0; y < 4; y++)
                _mm512_storeu_ps(s + (r + x) * G3_FA_BK + 16 * y, _mm512_mul_ps(a[x][y], vs));
    }
    for (; r < rows; r++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < d; i++) {
            const float *k = kt + i * G3_FA_BK;
            __m512 b = _mm512_set1_ps(q[r * d + i]);
            a0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(k), a0);
            a1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(k + 16), a1);
            a2 = _mm512_fmadd_ps(b, _mm512_loadu_ps(k + 32), a2);
            a3 = _mm512_fmadd_ps(b, _mm512_loadu_ps(k + 48), a3);
        }
        _mm512_storeu_ps(s + r * G3_FA_BK, _mm512_mul_ps(a0, vs));
        _mm512_storeu_ps(s + r * G3_FA_BK + 16, _mm512_mul_ps(a1, vs));
        _mm512_storeu_ps(s + r * G3_FA_BK + 32, _mm512_mul_ps(a2, vs));
        _mm512_storeu_ps(s + r * G3_FA_BK + 48, _mm512_mul_ps(a3, vs));
    }
}

__attribute__((target("avx512f"))) static void attn_pv_avx512(const float *p, int64_t rows,
                                                              int64_t nb, const float *v,
                                                              int64_t d, float *o)
{
    const int64_t d64 = d & ~(int64_t)63;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        for (int64_t c = 0; c < d64; c += 64) {
            __m512 a[4][4];
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 4; y++)
                    a[x][y] = _mm512_loadu_ps(o + (r + x) * d + c + 16 * y);
            for (int64_t j = 0; j < nb; j++) {
                const float *vv = v + j * d + c;
                __m512 v0 = _mm512_loadu_ps(vv), v1 = _mm512_loadu_ps(vv + 16);
                __m512 v2 = _mm512_loadu_ps(vv + 32), v3 = _mm512_loadu_ps(vv + 48);
                for (int x = 0; x < 4; x++) {
                    __m512 b = _mm512_set1_ps(p[(r + x) * G3_FA_BK + j]);
                    a[x][0] = _mm512_fmadd_ps(b, v0, a[x][0]);
                    a[x][1] = _mm512_fmadd_ps(b, v1, a[x][1]);
                    a[x][2] = _mm512_fmadd_ps(b, v2, a[x][2]);
                    a[x][3] = _mm512_fmadd_ps(b, v3, a[x][3]);
                }
            }
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 4; y++)
                    _mm512_storeu_ps(o + (r + x) * d + c + 16 * y, a[x][y]);
        }
    /* single rows, and columns past the last 64, 16 at a time then one by one */
    for (int64_t rr = 0; rr < rows; rr++) {
        int64_t c = rr < r ? d64 : 0;
        for (; c + 16 <= d; c += 16) {
            __m512 a = _mm512_loadu_ps(o + rr * d + c);
            for (int64_t j = 0; j < nb; j++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(p[rr * G3_FA_BK + j]),
                                    _mm512_loadu_ps(v + j * d + c), a);
            _mm512_storeu_ps(o + rr * d + c, a);
        }
        for (; c < d; c++) {
            float acc = o[rr * d + c];
            for (int64_t j = 0; j < nb; j++)
                acc = fmaf(p[rr * G3_FA_BK + j], v[j * d + c], acc);
            o[rr * d + c] = acc;
        }
    }
}

const g3_attn_blocks *g3_attn_blocks_isa(int isa)
{
    static const g3_attn_blocks tab[G3_ISA_COUNT] = {
        {attn_qk_scalar, attn_pv_scalar},
        {attn_qk_avx2, attn_pv_avx2},
        {attn_qk_avx512, attn_pv_avx512},
    };
    return isa >= 0 && isa < G3_ISA_COUNT && isa <= g3_isa_cpu() ? &tab[isa] : NULL;
}

/* the level the dispatcher selected (kernels/dispatch.c, G3_ISA) */
static const g3_attn_blocks *blocks(void)
{
    return g3_attn_blocks_isa(g3_isa_selected());
}

/* ---- the flash driver ------------------------------------------------------------------------- */

int64_t g3_attn_flash_work(int64_t hd)
{
    /* q (rows x hd), kt and v blocks (64 x hd each), s (rows x 64), one converted row */
    return (int64_t)G3_FA_ROWS * hd + 2 * (int64_t)G3_FA_BK * hd +
           (int64_t)G3_FA_ROWS * G3_FA_BK + hd;
}

/* Span and row of relative key j (spans in position order). */
static const g3_kv_span *span_of(const g3_kv_span *sp, int nsp, int64_t j, int64_t *row)
{
    int s = 0;
    for (; s < nsp - 1 && j >= sp[s].n; s++)
        j -= sp[s].n;
    *row = j;
    return &sp[s];
}

/* The online-softmax update of row r with its block scores sr over the visible part [b0, b1]
 * (block-relative); entries outside become 0 (so the P V product may run over the whole block). */
static void online_row(const g3_float_kernels *fk, float *sr, int64_t b0, int64_t b1, float *o,
                       int64_t hd, float *m, float *l)
{
    if (b1 < b0) {
        memset(sr, 0, sizeof(float) * G3_FA_BK);
        return;
    }
    float mb = sr[b0];
    for (int64_t j = b0 + 1; j <= b1; j++)
        mb = sr[j] > mb ? sr[j] : mb;
    const float mn = mb > *m ? mb : *m;
    if (mn > *m && *m > -INFINITY) {
        const float alpha = expf(*m - mn);
        *l *= alpha;
        for (int64_t i = 0; i < hd; i++)
            o[i] *= alpha;
    }
    *m = mn;
    *l += (float)fk->expsum(sr + b0, b1 - b0 + 1, mn);
    for (int64_t j = 0; j < b0; j++)
        sr[j] = 0.0f;
    for (int64_t j = b1 + 1; j < G3_FA_BK; j++)
        sr[j] = 0.0f;
}

void g3_attn_flash(const float *Q, int64_t ldq, int64_t nq, int64_t rep, int64_t hd, float scale,
                   const g3_kv_span *sp, int nsp, int64_t j0, int64_t j1, const int64_t *lo,
                   const int64_t *hi, float *o, float *m, float *l, float *work)
{
    const g3_float_kernels *fk = g3_fk();
    const g3_attn_blocks *bk = blocks();
    const int64_t rows = nq * rep;
    /* one position (decode, a verify row): dot products against each key row where it lies,
     * all rep heads while the row is in L1; else the block products over a transposed K block */
    const int dot_form = nq == 1;
    float *q = work, *kt = q + G3_FA_ROWS * hd, *vb = kt + G3_FA_BK * hd;
    float *s = vb + G3_FA_BK * hd, *tmp = s + G3_FA_ROWS * G3_FA_BK;
    for (int64_t t = 0; t < nq; t++)
        memcpy(q + t * rep * hd, Q + t * ldq, sizeof(float) * (size_t)(rep * hd));
    memset(o, 0, sizeof(float) * (size_t)(rows * hd));
    for (int64_t r = 0; r < rows; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    /* keys some row of the item sees */
    int64_t a0 = INT64_MAX, a1 = -1;
    for (int64_t t = 0; t < nq; t++) {
        a0 = lo[t] < a0 ? lo[t] : a0;
        a1 = hi[t] > a1 ? hi[t] : a1;
    }
    a0 = a0 > j0 ? a0 : j0;
    a1 = a1 < j1 - 1 ? a1 : j1 - 1;
    for (int64_t jb = a0; jb <= a1; jb += G3_FA_BK) {
        const int64_t nb = a1 - jb + 1 < G3_FA_BK ? a1 - jb + 1 : G3_FA_BK;
        int64_t row;
        const g3_kv_span *cur = span_of(sp, nsp, jb, &row);
        const g3_kv_span *cur0 = cur;
        const int64_t row0 = row;
        if (dot_form) {
            for (int64_t j = 0; j < nb; j++, row++) {
                while (row >= cur->n) {
                    row -= cur->n;
                    cur++;
                }
                const float *k = kv_floats(cur, 0, row, hd, tmp);
                for (int64_t r = 0; r < rows; r++)
                    s[r * G3_FA_BK + j] = fk->dot(q + r * hd, k, hd) * scale;
            }
        } else {
            /* K rows into kt (hd x 64), 16 dimensions at a time so the stores stay in L1 */
            const float *kp[G3_FA_BK];
            for (int64_t j = 0; j < nb; j++, row++) {
                while (row >= cur->n) {
                    row -= cur->n;
                    cur++;
                }
                if (cur->type == G3_TYPE_F32) {
                    kp[j] = (const float *)((const uint8_t *)cur->k + (size_t)row * cur->stride);
                } else { /* converted into the v block, which is filled after */
                    g3_kv_row(cur, 0, row, hd, vb + j * hd);
                    kp[j] = vb + j * hd;
                }
            }
            for (int64_t i0 = 0; i0 < hd; i0 += 16) {
                const int64_t ni = hd - i0 < 16 ? hd - i0 : 16;
                for (int64_t j = 0; j < nb; j++)
                    for (int64_t i = 0; i < ni; i++)
                        kt[(i0 + i) * G3_FA_BK + j] = kp[j][i0 + i];
                for (int64_t j = nb; j < G3_FA_BK; j++)
                    for (int64_t i = 0; i < ni; i++)
                        kt[(i0 + i) * G3_FA_BK + j] = 0.0f;
            }
            bk->qk(q, rows, hd, kt, scale, s);
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = r / rep;
            const int64_t b0 = (lo[t] > jb ? lo[t] : jb) - jb;
            const int64_t b1 = (hi[t] < jb + nb - 1 ? hi[t] : jb + nb - 1) - jb;
            online_row(fk, s + r * G3_FA_BK, b0, b1, o + r * hd, hd, m + r, l + r);
        }
        cur = cur0;
        row = row0;
        /* V rows into the block (the output rows then stay in registers over its keys) */
        for (int64_t j = 0; j < nb; j++, row++) {
            while (row >= cur->n) {
                row -= cur->n;
                cur++;
            }
            g3_kv_row(cur, 1, row, hd, vb + j * hd);
        }
        bk->pv(s, rows, nb, vb, hd, o);
    }
}

void g3_attn_flash_merge(int nc, const float *o, const float *m, const float *l, int64_t nq,
                         int64_t rep, int64_t hd, float *Z, int64_t ldz)
{
    const int64_t rows = nq * rep;
    for (int64_t r = 0; r < rows; r++) {
        float *z = Z + (r / rep) * ldz + (r % rep) * hd;
        float mx = -INFINITY;
        for (int c = 0; c < nc; c++)
            mx = m[c * rows + r] > mx ? m[c * rows + r] : mx;
        if (mx == -INFINITY) {
            memset(z, 0, sizeof(float) * (size_t)hd);
            continue;
        }
        float den = 0.0f;
        for (int64_t i = 0; i < hd; i++)
            z[i] = 0.0f;
        for (int c = 0; c < nc; c++) {
            const float mc = m[c * rows + r];
            if (mc == -INFINITY)
                continue;
            const float w = nc == 1 ? 1.0f : expf(mc - mx);
            den += w * l[c * rows + r];
            const float *oc = o + ((size_t)c * rows + r) * hd;
            for (int64_t i = 0; i < hd; i++)
                z[i] += w * oc[i];
        }
        const float inv = 1.0f / den;
        for (int64_t i = 0; i < hd; i++)
            z[i] *= inv;
    }
}

void g3_attn_tile_f32(const float *Q, int64_t ldq, const float *K, const float *V, int64_t ldk,
                      int64_t nq, int64_t ncol, int64_t hd, float scale, const int64_t *lo,
                      const int64_t *hi, float *S, int64_t lds, float *Z, int64_t ldz, int nt,
                      const g3_attn_observer *obs)
{
    const g3_float_kernels *fk = g3_fk();
    g3_sgemm(G3_GEMM_BT, nq, ncol, hd, scale, Q, ldq, K, ldk, S, lds, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < nq; r++) {
        float *row = S + r * lds;
        float *vis = row + lo[r];
        const int64_t n = hi[r] - lo[r] + 1;
        float *raw = NULL;
        if (obs) { /* the scores before softmax */
            raw = obs->raw + (size_t)omp_get_thread_num() * obs->raw_stride;
            memcpy(raw, vis, sizeof(float) * (size_t)n);
        }
        fk->softmax(vis, n);
        if (obs)
            obs->row(obs->ctx, r, lo[r], hi[r], raw, vis);
        for (int64_t j = 0; j < lo[r]; j++)
            row[j] = 0.0f;
        for (int64_t j = hi[r] + 1; j < ncol; j++)
            row[j] = 0.0f;
    }
    g3_sgemm(G3_GEMM_B, nq, hd, ncol, 1.0f, S, lds, V, ldk, Z, ldz, nt);
}
