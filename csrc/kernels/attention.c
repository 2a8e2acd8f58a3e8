/* attention.c — attention kernels (math and layouts in attention.h). */
#include "kernels/attention.h"

#include <omp.h>
#include <string.h>

#include "kernels/dispatch.h"
#include "kernels/gemm.h"

void g3_attn_scores_f32(const float *q, int64_t hd, const g3_kv_span *sp, int nsp, int64_t stride,
                        float scale, float *sc)
{
    const g3_float_kernels *fk = g3_fk();
    for (int s = 0; s < nsp; s++) {
        const float *k = sp[s].k;
        for (int64_t j = 0; j < sp[s].n; j++)
            sc[j] = fk->dot(q, k + j * stride, hd) * scale;
        sc += sp[s].n;
    }
}

void g3_attn_mix_f32(const float *p, const g3_kv_span *sp, int nsp, int64_t stride, int64_t hd,
                     float *z)
{
    const g3_float_kernels *fk = g3_fk();
    memset(z, 0, sizeof(float) * (size_t)hd);
    for (int s = 0; s < nsp; s++) {
        const float *v = sp[s].v;
        for (int64_t j = 0; j < sp[s].n; j++)
            fk->axpy(p[j], v + j * stride, z, hd);
        p += sp[s].n;
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
