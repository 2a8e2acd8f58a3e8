/* threading.c — thread policy and the parallel matrix product.
 *
 * One thread count drives both OpenMP regions (num_threads clause) and OpenBLAS. BLAS is only
 * called outside OpenMP regions: large products dequantize a tile of weight rows in parallel,
 * leave the region, then hand the float tile to sgemm.
 *
 * fork(): libgomp keeps a worker pool per thread that opened a parallel region; a forked child
 * inherits the pool's bookkeeping but not its threads, and its first parallel region waits for
 * them forever (a multiprocessing "fork" pool whose parent already ran a model). Before every
 * fork the forking thread's pool is released (omp_pause_resource_all, OpenMP 5.0): the child
 * starts without one and the parent builds a new one at its next region. OpenBLAS re-creates its
 * own threads after a fork by itself.
 */
#include <cblas.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/model.h"
#include "quant/packed.h"

static int g3_threads = 0;

static void release_pool_before_fork(void)
{
    omp_pause_resource_all(omp_pause_soft); /* no-op inside a parallel region or without a pool */
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(release_pool_before_fork, NULL, NULL); }

void g3_set_threads(int n)
{
    pthread_once(&fork_once, install_fork_handler); /* runs before any parallel region */
    if (n < 1)
        n = omp_get_num_procs();
    g3_threads = n;
    openblas_set_num_threads(n);
}

int g3_get_threads(void)
{
    if (g3_threads < 1)
        g3_set_threads(0);
    return g3_threads;
}

void g3_weight_row(const g3_weight *W, int64_t r, float *dst)
{
    g3_type_get(W->type)->to_float(W->data + (size_t)r * W->row_bytes, dst, W->cols);
}

#define G3_BLAS_MIN_TOKENS 32 /* below: the per-row kernel, so a token gets the same bits at any batch size */
#define G3_ROW_BLOCK 16           /* rows dequantized together in the small-T path */
#define G3_TILE_FLOATS (1 << 22)  /* 16 MiB float tile in the BLAS path */

static g3_status matmul_small(const g3_weight *W, const float *x, int64_t T, float *y, g3_err *err)
{
    const int64_t rows = W->rows, cols = W->cols;
    const g3_type_traits *tt = g3_type_get(W->type);
    const g3_to_float_fn to_float = tt->to_float;
    const g3_dot_f32_fn dot = tt->dot_f32;
    const int nt = g3_get_threads();
    if (dot) { /* fused: no dequantized row is ever written */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *w = W->data + (size_t)r * W->row_bytes;
            for (int64_t t = 0; t < T; t++)
                y[t * rows + r] = dot(w, x + t * cols, cols);
        }
        return G3_OK;
    }
    float *scratch = malloc(sizeof(float) * (size_t)cols * G3_ROW_BLOCK * (size_t)nt);
    if (!scratch)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for matmul scratch");
    const int64_t nblk = (rows + G3_ROW_BLOCK - 1) / G3_ROW_BLOCK;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t bi = 0; bi < nblk; bi++) {
        float *buf = scratch + (size_t)omp_get_thread_num() * cols * G3_ROW_BLOCK;
        int64_t r0 = bi * G3_ROW_BLOCK, r1 = r0 + G3_ROW_BLOCK < rows ? r0 + G3_ROW_BLOCK : rows;
        to_float(W->data + (size_t)r0 * W->row_bytes, buf, (r1 - r0) * cols);
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = r0; r < r1; r++)
                y[t * rows + r] = g3_dot_f32(buf + (r - r0) * cols, x + t * cols, cols);
    }
    free(scratch);
    return G3_OK;
}

static g3_status matmul_blas(const g3_weight *W, const float *x, int64_t T, float *y, g3_err *err)
{
    const int64_t rows = W->rows, cols = W->cols;
    if (W->type == G3_TYPE_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)rows, (int)cols, 1.0f,
                    x, (int)cols, (const float *)W->data, (int)cols, 0.0f, y, (int)rows);
        return G3_OK;
    }
    const g3_to_float_fn to_float = g3_type_get(W->type)->to_float;
    int64_t tile = G3_TILE_FLOATS / cols;
    if (tile < 1)
        tile = 1;
    if (tile > rows)
        tile = rows;
    float *buf = malloc(sizeof(float) * (size_t)tile * cols);
    if (!buf)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for a %lld x %lld matmul tile",
                       (long long)tile, (long long)cols);
    const int nt = g3_get_threads();
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        int64_t n = r0 + tile < rows ? tile : rows - r0;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < n; r++)
            to_float(W->data + (size_t)(r0 + r) * W->row_bytes, buf + r * cols, cols);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)n, (int)cols, 1.0f, x,
                    (int)cols, buf, (int)cols, 0.0f, y + r0, (int)rows);
    }
    free(buf);
    return G3_OK;
}

#define G3_PACK_CHUNK 8 /* groups (of 16 rows) a thread takes per token loop: ~80 KB of weights */

/* The decode path: n packed matrices sharing the input, T < G3_BLAS_MIN_TOKENS tokens. x is
 * quantized once per token; the groups of all matrices form one index space cut into equal
 * contiguous ranges, one per thread, so a row's arithmetic never depends on the thread count. */
static g3_status matmul_packed(int n, const g3_weight *const *W, const float *x, int64_t T,
                               float *const *y, g3_err *err)
{
    const int64_t cols = W[0]->cols;
    const size_t xb = g3_xq_bytes(cols);
    uint8_t *buf = malloc(xb * (size_t)T + sizeof(g3_xq) * (size_t)T);
    if (!buf)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for quantized activations");
    g3_xq *xq = (g3_xq *)buf;
    for (int64_t t = 0; t < T; t++) {
        g3_xq_init(&xq[t], cols, buf + sizeof(g3_xq) * (size_t)T + xb * (size_t)t);
        g3_xq_prepare(&xq[t], x + t * cols);
    }
    int64_t total = 0;
    for (int i = 0; i < n; i++)
        total += W[i]->packed->groups;
    const int nt = g3_get_threads();
#pragma omp parallel num_threads(nt)
    {
        const int64_t th = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t lo = total * th / k, hi = total * (th + 1) / k;
        int i = 0;
        int64_t base = 0; /* first global group of matrix i */
        for (int64_t g = lo; g < hi;) {
            while (g >= base + W[i]->packed->groups)
                base += W[i++]->packed->groups;
            const g3_packed *P = W[i]->packed;
            int64_t g1 = g + G3_PACK_CHUNK;
            if (g1 > hi)
                g1 = hi;
            if (g1 > base + P->groups)
                g1 = base + P->groups;
            for (int64_t t = 0; t < T; t++)
                g3_packed_matvec(P, &xq[t], g - base, g1 - base, y[i] + t * P->rows);
            g = g1;
        }
    }
    free(buf);
    return G3_OK;
}

static int all_packed(int n, const g3_weight *const *W)
{
    for (int i = 0; i < n; i++)
        if (!W[i]->packed || W[i]->cols != W[0]->cols)
            return 0;
    return 1;
}

g3_status g3_matmul_multi(int n, const g3_weight *const *W, const float *x, int64_t T,
                          float *const *y, g3_err *err)
{
    int fused = T < G3_BLAS_MIN_TOKENS;
    if (fused && all_packed(n, W))
        return matmul_packed(n, W, x, T, y, err);
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        fused = fused && g3_type_get(W[i]->type)->dot_f32 && W[i]->cols == W[0]->cols;
        total += W[i]->rows;
    }
    if (!fused) {
        for (int i = 0; i < n; i++) {
            g3_status st = g3_matmul(W[i], x, T, y[i], err);
            if (st)
                return st;
        }
        return G3_OK;
    }
    /* one parallel region over the rows of every matrix (q/k/v, gate/up share their input) */
    const int64_t cols = W[0]->cols;
    const int nt = g3_get_threads();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t gr = 0; gr < total; gr++) {
        int i = 0;
        int64_t r = gr;
        while (r >= W[i]->rows)
            r -= W[i++]->rows;
        const g3_weight *w = W[i];
        const g3_dot_f32_fn dot = g3_type_get(w->type)->dot_f32;
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        for (int64_t t = 0; t < T; t++)
            y[i][t * w->rows + r] = dot(row, x + t * cols, cols);
    }
    return G3_OK;
}

g3_status g3_matmul(const g3_weight *W, const float *x, int64_t T, float *y, g3_err *err)
{
    if (T >= G3_BLAS_MIN_TOKENS)
        return matmul_blas(W, x, T, y, err);
    if (W->packed)
        return matmul_packed(1, &W, x, T, &y, err);
    return matmul_small(W, x, T, y, err);
}
