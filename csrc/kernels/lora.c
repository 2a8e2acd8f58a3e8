/* lora.c — low-rank deltas on a matrix product (LoRA):  y += sum_d scale_d * B_d (A_d x)
 * for every delta d chained on a weight (matmul.h), A (rank, cols), B (rows, rank) float32.
 *
 * Reference: PEFT's LoraLayer forward (result + lora_B(lora_A(x)) * scaling), llama.cpp's
 * llm_build_lora_mm (the same sum, scale = adapter scale * alpha / rank); both unmerged.
 *
 * Decode and short chunks (T < G3_BLAS_MIN_TOKENS): one parallel region in two passes separated
 * by its barrier: u[t] = A x[t] as rank dots per token (all deltas of all n products form one
 * index space), then each block of G3_LORA_ROWS output rows adds scale * u[t][j] * B^T[j] for
 * j = 0 .. rank-1 (axpy, in that order). Blocks start at fixed rows, so a row's arithmetic is the
 * same at any T below the threshold and any thread count, as in the base product. Long chunks: two
 * sgemm per delta over chunks of G3_LORA_CHUNK tokens (BLAS never inside a parallel region).
 * The cost over the base product is (rows + cols) * rank multiply-adds per token and delta,
 * against rows * cols: 5% for rank 16 on a 640 x 2048 matrix.
 */
#include <cblas.h>
#include <omp.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"

#define G3_LORA_ROWS 128 /* output rows per axpy block: a multiple of every SIMD width */

static void apply_small(int n, const g3_weight *const *W, const float *x, int64_t T,
                        float *const *y)
{
    int64_t n_a = 0, n_blk = 0; /* A rows of every delta; output row blocks of every product */
    for (int i = 0; i < n; i++) {
        if (W[i]->lora)
            n_blk += (W[i]->rows + G3_LORA_ROWS - 1) / G3_LORA_ROWS;
        for (const g3_lora *l = W[i]->lora; l; l = l->next)
            n_a += l->rank;
    }
    const int nt = g3_get_threads();
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t ga = 0; ga < n_a; ga++) { /* u[t][j] = A[j] . x[t] */
            int i = 0;
            int64_t j = ga;
            g3_lora *l = W[0]->lora;
            while (!l || j >= l->rank) { /* walk the chains to the delta holding A row ga */
                if (l) {
                    j -= l->rank;
                    l = l->next;
                } else {
                    l = W[++i]->lora;
                }
            }
            const int64_t cols = W[i]->cols;
            for (int64_t t = 0; t < T; t++)
                l->u[t * l->rank + j] = g3_dot_f32(l->A + j * cols, x + t * cols, cols);
        }
#pragma omp for schedule(static)
        for (int64_t gb = 0; gb < n_blk; gb++) { /* y[t][r0:r1] += scale u[t][j] B^T[j][r0:r1] */
            int i = 0;
            int64_t b = gb;
            for (;; i++) {
                const int64_t nb = W[i]->lora ? (W[i]->rows + G3_LORA_ROWS - 1) / G3_LORA_ROWS : 0;
                if (b < nb)
                    break;
                b -= nb;
            }
            const int64_t rows = W[i]->rows, r0 = b * G3_LORA_ROWS;
            const int64_t nr = rows - r0 < G3_LORA_ROWS ? rows - r0 : G3_LORA_ROWS;
            for (const g3_lora *l = W[i]->lora; l; l = l->next)
                for (int64_t t = 0; t < T; t++)
                    for (int64_t j = 0; j < l->rank; j++)
                        g3_axpy_f32(l->scale * l->u[t * l->rank + j], l->Bt + j * rows + r0,
                                    y[i] + t * rows + r0, nr);
        }
    }
}

static void apply_blas(const g3_weight *W, const float *x, int64_t T, float *y)
{
    const int64_t rows = W->rows, cols = W->cols;
    for (const g3_lora *l = W->lora; l; l = l->next)
        for (int64_t t0 = 0; t0 < T; t0 += G3_LORA_CHUNK) {
            const int64_t tc = T - t0 < G3_LORA_CHUNK ? T - t0 : G3_LORA_CHUNK;
            /* u (tc, rank) = x (tc, cols) @ A^T;  y (tc, rows) += scale * u @ B^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)tc, (int)l->rank,
                        (int)cols, 1.0f, x + t0 * cols, (int)cols, l->A, (int)cols, 0.0f, l->u,
                        (int)l->rank);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)tc, (int)rows,
                        (int)l->rank, l->scale, l->u, (int)l->rank, l->Bt, (int)rows, 1.0f,
                        y + t0 * rows, (int)rows);
        }
}

void g3_lora_apply(int n, const g3_weight *const *W, const float *x, int64_t T, float *const *y)
{
    if (T < G3_BLAS_MIN_TOKENS) {
        apply_small(n, W, x, T, y);
        return;
    }
    for (int i = 0; i < n; i++)
        if (W[i]->lora)
            apply_blas(W[i], x, T, y[i]);
}
