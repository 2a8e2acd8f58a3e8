/* gemm.c — float32 matrix products on our own thread pool (contract in gemm.h). */
#include "kernels/gemm.h"

#include <cblas.h>

#define G3_GEMM_BN 256     /* columns of C per block */
#define G3_GEMM_BM 256     /* rows of C per block, at most */
#define G3_GEMM_BM_MIN 64  /* rows of C per block, at least: each block repacks its B panel */
#define G3_GEMM_BLOCKS 4   /* blocks wanted when C is small (balance for a few cores) */

/* Rows per block: 256, or fewer when C would otherwise give fewer than G3_GEMM_BLOCKS blocks (the
 * attention product Z = S V has N = head size: one column block). A function of M and N only. */
static int64_t block_rows(int64_t M, int64_t N)
{
    const int64_t nbn = (N + G3_GEMM_BN - 1) / G3_GEMM_BN;
    int64_t bm = G3_GEMM_BM;
    if (nbn * ((M + bm - 1) / bm) < G3_GEMM_BLOCKS) {
        const int64_t want = (G3_GEMM_BLOCKS + nbn - 1) / nbn; /* row blocks wanted */
        bm = (M + want - 1) / want;
        bm = (bm + G3_GEMM_BM_MIN - 1) / G3_GEMM_BM_MIN * G3_GEMM_BM_MIN;
        if (bm > G3_GEMM_BM)
            bm = G3_GEMM_BM;
    }
    return bm;
}

void g3_sgemm(int op_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
              const float *B, int64_t ldb, float *C, int64_t ldc, int nt)
{
    if (M <= 0 || N <= 0)
        return;
    const int64_t bm = block_rows(M, N);
    const int64_t nbm = (M + bm - 1) / bm, nbn = (N + G3_GEMM_BN - 1) / G3_GEMM_BN;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if(nbm * nbn > 1)
    for (int64_t b = 0; b < nbm * nbn; b++) {
        const int64_t i0 = b / nbn * bm, j0 = b % nbn * G3_GEMM_BN;
        const int64_t m = i0 + bm < M ? bm : M - i0;
        const int64_t n = j0 + G3_GEMM_BN < N ? G3_GEMM_BN : N - j0;
        const float *Bj = op_b == G3_GEMM_BT ? B + j0 * ldb : B + j0;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, op_b == G3_GEMM_BT ? CblasTrans : CblasNoTrans,
                    (int)m, (int)n, (int)K, alpha, A + i0 * lda, (int)lda, Bj, (int)ldb, 0.0f,
                    C + i0 * ldc + j0, (int)ldc);
    }
}
