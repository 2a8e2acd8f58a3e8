/* matmul.c — the parallel matrix product y = x W^T (paths and workspace in matmul.h). */
#include "kernels/matmul.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "quant/packed.h"

#define G3_ROW_BLOCK 16          /* rows dequantized together in the small-T path */
#define G3_TILE_FLOATS (1 << 22) /* 16 MiB float tile in the BLAS path */
#define G3_PACK_CHUNK 8          /* groups (of 16 rows) a thread takes per token loop: ~80 KB */

void g3_weight_row(const g3_weight *W, int64_t r, float *dst)
{
    g3_type_get(W->type)->to_float(W->data + (size_t)r * W->row_bytes, dst, W->cols);
}

static int64_t tile_rows(const g3_weight *W)
{
    int64_t tile = G3_TILE_FLOATS / W->cols;
    if (tile < 1)
        tile = 1;
    return tile > W->rows ? W->rows : tile;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

void g3_matmul_ws_need(g3_matmul_ws *ws, const g3_weight *W, int64_t T, int nt)
{
    if (T >= G3_BLAS_MIN_TOKENS && W->type != G3_TYPE_F32)
        ws->tile_floats = max_size(ws->tile_floats, (size_t)(tile_rows(W) * W->cols));
    if (W->packed || g3_pack_supported(W->type)) /* also if packed after the reservation */
        ws->xq_bytes = max_size(ws->xq_bytes, (g3_xq_bytes(W->cols) + sizeof(g3_xq)) * (size_t)T);
    else if (!g3_type_get(W->type)->dot_f32)
        ws->rows_floats =
            max_size(ws->rows_floats, (size_t)W->cols * G3_ROW_BLOCK * (size_t)(nt < 1 ? 1 : nt));
}

g3_status g3_matmul_ws_alloc(g3_matmul_ws *ws, g3_err *err)
{
    ws->tile = ws->tile_floats ? malloc(sizeof(float) * ws->tile_floats) : NULL;
    ws->rows = ws->rows_floats ? malloc(sizeof(float) * ws->rows_floats) : NULL;
    ws->xq = ws->xq_bytes ? malloc(ws->xq_bytes) : NULL;
    if ((ws->tile_floats && !ws->tile) || (ws->rows_floats && !ws->rows) ||
        (ws->xq_bytes && !ws->xq)) {
        size_t bytes = sizeof(float) * (ws->tile_floats + ws->rows_floats) + ws->xq_bytes;
        g3_matmul_ws_free(ws);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for %zu bytes of matmul scratch", bytes);
    }
    return G3_OK;
}

void g3_matmul_ws_free(g3_matmul_ws *ws)
{
    free(ws->tile);
    free(ws->rows);
    free(ws->xq);
    ws->tile = ws->rows = NULL;
    ws->xq = NULL;
}

static g3_status too_small(g3_err *err, const char *what)
{
    return g3_fail(err, G3_ERR_STATE, "the matmul workspace has no room for the %s", what);
}

static g3_status matmul_small(const g3_weight *W, const float *x, int64_t T, float *y,
                              g3_matmul_ws *ws, g3_err *err)
{
    const int64_t rows = W->rows, cols = W->cols;
    const g3_type_traits *tt = g3_type_get(W->type);
    const g3_to_float_fn to_float = tt->to_float;
    const g3_dot_f32_fn dot = tt->dot_f32;
    int nt = g3_get_threads();
    if (dot) { /* fused: no dequantized row is ever written */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint8_t *w = W->data + (size_t)r * W->row_bytes;
            for (int64_t t = 0; t < T; t++)
                y[t * rows + r] = dot(w, x + t * cols, cols);
        }
        return G3_OK;
    }
    const size_t per_thread = (size_t)cols * G3_ROW_BLOCK;
    if ((size_t)nt * per_thread > ws->rows_floats) /* threads raised since the reservation */
        nt = (int)(ws->rows_floats / per_thread);
    if (nt < 1)
        return too_small(err, "dequantized row blocks");
    float *scratch = ws->rows;
    const int64_t nblk = (rows + G3_ROW_BLOCK - 1) / G3_ROW_BLOCK;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t bi = 0; bi < nblk; bi++) {
        float *buf = scratch + (size_t)omp_get_thread_num() * per_thread;
        int64_t r0 = bi * G3_ROW_BLOCK, r1 = r0 + G3_ROW_BLOCK < rows ? r0 + G3_ROW_BLOCK : rows;
        to_float(W->data + (size_t)r0 * W->row_bytes, buf, (r1 - r0) * cols);
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = r0; r < r1; r++)
                y[t * rows + r] = g3_dot_f32(buf + (r - r0) * cols, x + t * cols, cols);
    }
    return G3_OK;
}

static g3_status matmul_blas(const g3_weight *W, const float *x, int64_t T, float *y,
                             g3_matmul_ws *ws, g3_err *err)
{
    const int64_t rows = W->rows, cols = W->cols;
    if (W->type == G3_TYPE_F32) {
        g3_sgemm(G3_GEMM_BT, T, rows, cols, 1.0f, x, cols, (const float *)W->data, cols, y, rows,
                 g3_get_threads());
        return G3_OK;
    }
    const g3_to_float_fn to_float = g3_type_get(W->type)->to_float;
    const int64_t tile = tile_rows(W);
    if ((size_t)(tile * cols) > ws->tile_floats)
        return too_small(err, "dequantized weight tile");
    float *buf = ws->tile;
    const int nt = g3_get_threads();
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        int64_t n = r0 + tile < rows ? tile : rows - r0;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < n; r++)
            to_float(W->data + (size_t)(r0 + r) * W->row_bytes, buf + r * cols, cols);
        g3_sgemm(G3_GEMM_BT, T, n, cols, 1.0f, x, cols, buf, cols, y + r0, rows, nt);
    }
    return G3_OK;
}

/* The decode path: n packed matrices sharing the input, T < G3_BLAS_MIN_TOKENS tokens. x is
 * quantized once per token; the groups of all matrices form one index space cut into equal
 * contiguous ranges, one per thread, so a row's arithmetic never depends on the thread count.
 * With `lora`, each thread also adds the LoRA deltas of the rows it computed (no extra region). */
static g3_status matmul_packed(int n, const g3_weight *const *W, const float *x, int64_t T,
                               float *const *y, int lora, g3_matmul_ws *ws, g3_err *err)
{
    const int64_t cols = W[0]->cols;
    const size_t xb = g3_xq_bytes(cols);
    if ((xb + sizeof(g3_xq)) * (size_t)T > ws->xq_bytes)
        return too_small(err, "quantized activations");
    uint8_t *buf = ws->xq;
    g3_xq *xq = (g3_xq *)buf;
    for (int64_t t = 0; t < T; t++) {
        g3_xq_init(&xq[t], cols, buf + sizeof(g3_xq) * (size_t)T + xb * (size_t)t);
        g3_xq_prepare(&xq[t], x + t * cols);
    }
    int64_t total = 0;
    for (int i = 0; i < n; i++)
        total += W[i]->packed->groups;
    int nt = g3_get_threads();
    if (lora && nt > G3_LORA_SLOTS)
        nt = G3_LORA_SLOTS;
#pragma omp parallel num_threads(nt)
    {
        const int64_t th = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t lo = total * th / k, hi = total * (th + 1) / k;
        if (lora) /* this thread's A x of every delta (kernels/lora.c) */
            g3_lora_down(n, W, x, T, (int)th);
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
            if (T == 1)
                g3_packed_matvec(P, xq, g - base, g1 - base, y[i]);
            else /* every token per weight block: the weights are read once (packed.c) */
                g3_packed_matmat(P, xq, (int)T, g - base, g1 - base, y[i]);
            if (lora && W[i]->lora) { /* the same rows' deltas while they are in the cache */
                const int64_t r1 = (g1 - base) * 16;
                g3_lora_up_rows(W[i], T, (int)th, (g - base) * 16, r1 < P->rows ? r1 : P->rows,
                                y[i]);
            }
            g = g1;
        }
    }
    return G3_OK;
}

/* The prefill path: n packed matrices sharing the input, T >= G3_BLAS_MIN_TOKENS tokens. x is
 * quantized once per call (24-bit per 32-block, or 8-bit where the model opted in); the groups of
 * all matrices are cut into output blocks of G3_PREFILL_GROUPS groups (never across a matrix),
 * shared out over the threads: a block's weights stay in L2 while every token streams past
 * them 8 at a time, and an output's arithmetic never depends on which thread computes it. */
#define G3_PREFILL_GROUPS 8

static g3_status matmul_prefill(int n, const g3_weight *const *W, const float *x, int64_t T,
                                float *const *y, g3_matmul_ws *ws, g3_err *err)
{
    const int64_t cols = W[0]->cols;
    const size_t xb = g3_xq_bytes(cols);
    if ((xb + sizeof(g3_xq)) * (size_t)T > ws->xq_bytes)
        return too_small(err, "quantized activations");
    const int mode = W[0]->prefill_digits ? W[0]->prefill_digits : G3_PREFILL_EXACT; /* = digits */
    uint8_t *buf = ws->xq;
    g3_xq *xq = (g3_xq *)buf;
    const int nt = g3_get_threads();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        g3_xq_init(&xq[t], cols, buf + sizeof(g3_xq) * (size_t)T + xb * (size_t)t);
        g3_xq_prepare_prefill(&xq[t], x + t * cols, mode);
    }
    int64_t units = 0;
    for (int i = 0; i < n; i++)
        units += (W[i]->packed->groups + G3_PREFILL_GROUPS - 1) / G3_PREFILL_GROUPS;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t u = 0; u < units; u++) {
        int i = 0;
        int64_t k = u, per;
        while (k >= (per = (W[i]->packed->groups + G3_PREFILL_GROUPS - 1) / G3_PREFILL_GROUPS))
            k -= per, i++;
        const g3_packed *P = W[i]->packed;
        const int64_t g0 = k * G3_PREFILL_GROUPS;
        const int64_t g1 = g0 + G3_PREFILL_GROUPS < P->groups ? g0 + G3_PREFILL_GROUPS : P->groups;
        g3_packed_gemm(P, xq, (int)T, g0, g1, y[i], mode);
    }
    return G3_OK;
}

static int all_packed(int n, const g3_weight *const *W)
{
    for (int i = 0; i < n; i++)
        if (!W[i]->packed || W[i]->cols != W[0]->cols)
            return 0;
    return 1;
}

static int any_lora(int n, const g3_weight *const *W)
{
    for (int i = 0; i < n; i++)
        if (W[i]->lora)
            return 1;
    return 0;
}

static int same_precision(int n, const g3_weight *const *W)
{
    for (int i = 0; i < n; i++)
        if (W[i]->prefill_digits != W[0]->prefill_digits)
            return 0;
    return 1;
}

static g3_status matmul_multi_base(int n, const g3_weight *const *W, const float *x, int64_t T,
                                   float *const *y, g3_matmul_ws *ws, g3_err *err);
static g3_status matmul_base(const g3_weight *W, const float *x, int64_t T, float *y,
                             g3_matmul_ws *ws, g3_err *err);

/* The products, then the LoRA deltas (kernels/lora.c) unless the packed path added them. */
g3_status g3_matmul_multi(int n, const g3_weight *const *W, const float *x, int64_t T,
                          float *const *y, g3_matmul_ws *ws, g3_err *err)
{
    const int lora = any_lora(n, W);
    if (lora && T < G3_BLAS_MIN_TOKENS && all_packed(n, W))
        return matmul_packed(n, W, x, T, y, 1, ws, err);
    g3_status st = matmul_multi_base(n, W, x, T, y, ws, err);
    if (!st && lora)
        g3_lora_apply(n, W, x, T, y);
    return st;
}

g3_status g3_matmul(const g3_weight *W, const float *x, int64_t T, float *y, g3_matmul_ws *ws,
                    g3_err *err)
{
    return g3_matmul_multi(1, &W, x, T, &y, ws, err);
}

static g3_status matmul_multi_base(int n, const g3_weight *const *W, const float *x, int64_t T,
                                   float *const *y, g3_matmul_ws *ws, g3_err *err)
{
    int fused = T < G3_BLAS_MIN_TOKENS;
    if (fused && all_packed(n, W))
        return matmul_packed(n, W, x, T, y, 0, ws, err);
    if (!fused && all_packed(n, W) && same_precision(n, W))
        return matmul_prefill(n, W, x, T, y, ws, err);
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        fused = fused && g3_type_get(W[i]->type)->dot_f32 && W[i]->cols == W[0]->cols;
        total += W[i]->rows;
    }
    if (!fused) {
        for (int i = 0; i < n; i++) {
            g3_status st = matmul_base(W[i], x, T, y[i], ws, err);
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

static g3_status matmul_base(const g3_weight *W, const float *x, int64_t T, float *y,
                             g3_matmul_ws *ws, g3_err *err)
{
    if (T >= G3_BLAS_MIN_TOKENS)
        return W->packed ? matmul_prefill(1, &W, x, T, &y, ws, err)
                         : matmul_blas(W, x, T, y, ws, err);
    if (W->packed)
        return matmul_packed(1, &W, x, T, &y, 0, ws, err);
    return matmul_small(W, x, T, y, ws, err);
}

/* ---- greedy: the arg-max without every logit ----------------------------------------------------
 *
 * Pass 1 multiplies W by x at 8 bits (one digit: a third of the exact product's integer work, so
 * a few tokens cost one read of the weights) and turns each row's y8 into [y8 - B, y8 + B], with
 * B = row_bound * (|x8 - x24| + 2 g |x|): |x8 - x24| bounds how far the quantized activations
 * of the two products are apart (row_bound is |c| + |m|, Cauchy-Schwarz), 2 g |x| the float
 * rounding of both products (g = (nb + 16) 2^-22 covers the 2 nb + 8 roundings of a row's block
 * sums, relative to sum |c_i x_i| + |m_i x_i| <= row_bound * |x|). Pass 2 computes exactly, with
 * the kernel g3_matmul would use, every group holding a row whose upper end reaches the best
 * lower end: the row the full product would pick is among them, and so is every row tied with
 * it, so the lowest-index rule gives the same answer. */
static double argmax_radius(const g3_xq *x8, const g3_xq *x24, const float *x, int64_t cols)
{
    double n2 = 0.0;
    for (int64_t i = 0; i < cols; i++)
        n2 += (double)x[i] * x[i];
    const double g = (double)(x24->nb + 16) * 0x1p-22;
    return (g3_xq_distance(x8, x24) + 2.0 * g * 1.05 * sqrt(n2)) * (1.0 + 0x1p-20);
}

static g3_status argmax_full(const g3_weight *W, const float *x, int64_t T, int32_t *ids,
                             float *y, g3_matmul_ws *ws, g3_err *err)
{
    g3_status st = g3_matmul(W, x, T, y, ws, err);
    for (int64_t t = 0; !st && t < T; t++)
        ids[t] = g3_argmax_f32(y + t * W->rows, W->rows);
    return st;
}

g3_status g3_matmul_argmax(const g3_weight *W, const float *x, int64_t T, int32_t *ids, float *y,
                           int64_t *exact, g3_matmul_ws *ws, g3_err *err)
{
    if (exact)
        *exact = -1; /* the full product */
    const g3_packed *P = W->packed;
    const int64_t cols = W->cols, rows = W->rows;
    const size_t xb = g3_xq_bytes(cols);
    const int gemm = T >= G3_BLAS_MIN_TOKENS; /* g3_matmul's exact path for T rows */
    if (!P || !P->row_bound || W->lora || (gemm && W->prefill_digits) || T < 1 ||
        T > G3_ARGMAX_TOKENS || (xb + sizeof(g3_xq)) * (size_t)(2 * T) > ws->xq_bytes)
        return argmax_full(W, x, T, ids, y, ws, err);
    uint8_t *buf = ws->xq;
    g3_xq *x24 = (g3_xq *)buf, *x8 = x24 + T;
    float rad[G3_ARGMAX_TOKENS], best[G3_ARGMAX_TOKENS], top[G3_ARGMAX_TOKENS];
    int64_t at[G3_ARGMAX_TOKENS];
    uint8_t *digits = buf + sizeof(g3_xq) * (size_t)(2 * T);
    int finite = 1;
    for (int64_t t = 0; t < T; t++) {
        g3_xq_init(&x24[t], cols, digits + xb * (size_t)t);
        g3_xq_init(&x8[t], cols, digits + xb * (size_t)(T + t));
        g3_xq_prepare(&x24[t], x + t * cols); /* = g3_xq_prepare_prefill(.., G3_PREFILL_EXACT) */
        g3_xq_prepare_digits(&x8[t], x + t * cols, 1);
        const double r = argmax_radius(&x8[t], &x24[t], x + t * cols, cols);
        rad[t] = (float)r < r ? nextafterf((float)r, INFINITY) : (float)r;
        finite = finite && isfinite(rad[t]);
        best[t] = -INFINITY, top[t] = -INFINITY, at[t] = -1;
    }
    if (!finite)
        return argmax_full(W, x, T, ids, y, ws, err);
    int64_t n_exact = 0;
    const int nt = g3_get_threads();
#pragma omp parallel num_threads(nt)
    {
        const int64_t th = omp_get_thread_num(), k = omp_get_num_threads();
        const int64_t g0 = P->groups * th / k, g1 = P->groups * (th + 1) / k;
        float lo[G3_ARGMAX_TOKENS], v_top[G3_ARGMAX_TOKENS];
        int64_t v_at[G3_ARGMAX_TOKENS], v_exact = 0;
        for (int64_t t = 0; t < T; t++)
            lo[t] = -INFINITY, v_top[t] = -INFINITY, v_at[t] = -1;
        for (int64_t g = g0; g < g1; g += G3_PACK_CHUNK) { /* pass 1: y8 -> upper ends in y */
            const int64_t ge = g + G3_PACK_CHUNK < g1 ? g + G3_PACK_CHUNK : g1;
            g3_packed_matmat_digits(P, x8, (int)T, g, ge, y, 1);
            const int64_t r0 = g * G3_PACK_ROWS;
            const int64_t r1 = ge * G3_PACK_ROWS < rows ? ge * G3_PACK_ROWS : rows;
            for (int64_t t = 0; t < T; t++) {
                const float l =
                    g3_bound_rows(y + t * rows + r0, P->row_bound + r0, rad[t], r1 - r0);
                lo[t] = l > lo[t] || l != l ? l : lo[t]; /* a NaN sticks */
            }
        }
#pragma omp critical
        for (int64_t t = 0; t < T; t++)
            best[t] = lo[t] > best[t] || lo[t] != lo[t] ? lo[t] : best[t];
#pragma omp barrier
        for (int64_t t = 0; t < T; t++) {
            if (best[t] != best[t])
                continue; /* the full product decides */
            float *v = y + t * rows;
            for (int64_t g = g0; g < g1; g++) { /* pass 2: the groups that may hold it */
                const int64_t r0 = g * G3_PACK_ROWS;
                const int64_t r1 = r0 + G3_PACK_ROWS < rows ? r0 + G3_PACK_ROWS : rows;
                if (!g3_any_at_least(v + r0, r1 - r0, best[t]))
                    continue;
                v_exact++;
                if (gemm)
                    g3_packed_gemm(P, &x24[t], 1, g, g + 1, v, G3_PREFILL_EXACT);
                else
                    g3_packed_matvec(P, &x24[t], g, g + 1, v);
                for (int64_t r = r0; r < r1; r++)
                    if (v[r] > v_top[t] || v_at[t] < 0)
                        v_top[t] = v[r], v_at[t] = r;
            }
        }
#pragma omp critical
        {
            n_exact += v_exact;
            for (int64_t t = 0; t < T; t++)
                if (v_at[t] >= 0 && (at[t] < 0 || v_top[t] > top[t] ||
                                     (v_top[t] == top[t] && v_at[t] < at[t])))
                    top[t] = v_top[t], at[t] = v_at[t];
        }
    }
    for (int64_t t = 0; t < T; t++)
        if (best[t] != best[t] || at[t] < 0 || !isfinite(top[t]))
            return argmax_full(W, x, T, ids, y, ws, err);
    for (int64_t t = 0; t < T; t++)
        ids[t] = (int32_t)at[t];
    if (exact)
        *exact = n_exact;
    return G3_OK;
}
