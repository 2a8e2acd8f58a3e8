/* lora.c — low-rank deltas on a matrix product (LoRA):  y += sum_d scale_d * B_d (A_d x)
 * for every delta d chained on a weight (matmul.h), A (rank, cols) and B^T (rank, rows) float32.
 *
 * Reference: PEFT's LoraLayer forward (result + lora_B(lora_A(x)) * scaling), llama.cpp's
 * llm_build_lora_mm (the same sum, scale = adapter scale * alpha / rank); both unmerged.
 *
 * Decode and short chunks (T < G3_BLAS_MIN_TOKENS), with no synchronisation at all: every thread
 * computes u[t] = A x[t] of every delta itself (rank dots per token, into its own slot of the
 * delta's scratch: rank * (rows + cols) is small next to rows * cols, and A is read from the cache
 * the other thread just filled), then adds scale * u[t][j] * B^T[j] (axpy, j = 0 .. rank-1) to
 * the output rows it owns. The packed decode product does this inside its own parallel region,
 * right after each range of rows (matmul.c), so a delta costs no extra fork, join or barrier.
 * Rows are owned in whole 16-row groups, so a row's arithmetic is the same at any T below the
 * threshold and any thread count, as in the base product. Long chunks: two sgemm per delta over
 * chunks of G3_LORA_CHUNK tokens (BLAS never inside a parallel region).
 * The cost over the base product is (rows + cols) * rank multiply-adds per token and delta (plus
 * A x once more per extra thread), against rows * cols: 3% for rank 16 on a 640 x 2048 matrix;
 * in bytes, float32 A and B against a 4-6 bit base weight, about 20% of a layer's.
 */
#include <cblas.h>
#include <omp.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"

void g3_lora_down(int n, const g3_weight *const *W, const float *x, int64_t T, int slot)
{
    for (int i = 0; i < n; i++) {
        const int64_t cols = W[i]->cols;
        for (g3_lora *l = W[i]->lora; l; l = l->next) {
            float *u = l->u + (size_t)slot * G3_LORA_SLOT_TOKENS * l->rank;
            for (int64_t t = 0; t < T; t++)
                for (int64_t j = 0; j < l->rank; j++)
                    u[t * l->rank + j] = g3_dot_f32(l->A + j * cols, x + t * cols, cols);
        }
    }
}

void g3_lora_up_rows(const g3_weight *W, int64_t T, int slot, int64_t r0, int64_t r1, float *y)
{
    const int64_t rows = W->rows;
    for (const g3_lora *l = W->lora; l; l = l->next) {
        const float *u = l->u + (size_t)slot * G3_LORA_SLOT_TOKENS * l->rank;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < l->rank; j++)
                g3_axpy_f32(l->scale * u[t * l->rank + j], l->Bt + j * rows + r0,
                            y + t * rows + r0, r1 - r0);
    }
}

/* Outside the packed path: one region, each thread its own u, then an equal share of the
 * 16-row groups of every product (one index space, cut as the packed product cuts its own). */
static void apply_small(int n, const g3_weight *const *W, const float *x, int64_t T,
                        float *const *y)
{
    int64_t total = 0;
    for (int i = 0; i < n; i++)
        if (W[i]->lora)
            total += (W[i]->rows + 15) / 16;
    int nt = g3_get_threads();
    nt = nt > G3_LORA_SLOTS ? G3_LORA_SLOTS : nt;
#pragma omp parallel num_threads(nt)
    {
        const int th = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t lo = total * th / k, hi = total * (th + 1) / k;
        g3_lora_down(n, W, x, T, th);
        int64_t base = 0;
        for (int i = 0; i < n; i++) {
            if (!W[i]->lora)
                continue;
            const int64_t groups = (W[i]->rows + 15) / 16;
            const int64_t g0 = lo > base ? lo : base, g1 = hi < base + groups ? hi : base + groups;
            if (g0 < g1) {
                const int64_t r1 = (g1 - base) * 16;
                g3_lora_up_rows(W[i], T, th, (g0 - base) * 16, r1 < W[i]->rows ? r1 : W[i]->rows,
                                y[i]);
            }
            base += groups;
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
