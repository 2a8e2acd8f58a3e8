/* matmul.h — y (T, rows) = x (T, cols) @ W^T for weights of any dequantizable ggml type.
 *
 * Four paths, chosen by T and the weight (same choice for a row at any batch size below the BLAS
 * threshold, so a token gets the same bits whether decoded alone or with a few others):
 *   - T >= G3_BLAS_MIN_TOKENS, packed weight: the integer prefill GEMM (g3_packed_gemm), x
 *     quantized once per call to 24 bits per 32-block (8 bits if the model opted in);
 *   - T >= G3_BLAS_MIN_TOKENS otherwise: dequantize a tile of weight rows in parallel, then
 *     g3_sgemm the float tile (gemm.h: blocks of C on our threads, OpenBLAS single-threaded);
 *   - packed (quant/packed.h): AVX-512 VNNI integer matvec over 16-row groups, x quantized once
 *     per token;
 *   - otherwise per row: the type's fused dequantize-and-dot, or dequantize 16 rows and g3_dot_f32.
 * Scratch comes from a caller-owned workspace sized beforehand (g3_matmul_ws_need/alloc), never
 * from the allocator: the forward pass must not allocate.
 */
#ifndef G3_KERNELS_MATMUL_H
#define G3_KERNELS_MATMUL_H

#include "g3.h"
#include "threading.h"

struct g3_packed_s;

/* A low-rank delta on a weight's product (LoRA, kernels/lora.c): y += scale * B (A x).
 * The chain of a weight is summed (several adapters active at once). A, B and the scratch belong
 * to whoever attached the chain (model/lora.c); the product only writes the scratch. B is held
 * transposed, so that y += B u is rank contiguous axpy passes over the output rows. */
typedef struct g3_lora_s {
    int64_t rank;
    float scale;               /* the adapter's alpha / r (or / sqrt r) times the user's scale */
    const float *A;            /* (rank, cols) */
    const float *Bt;           /* (rank, rows): B^T */
    float *u;                  /* (G3_LORA_CHUNK, rank) scratch: A x of a chunk of tokens */
    struct g3_lora_s *next;    /* the next delta on the same weight, or NULL */
} g3_lora;

#define G3_LORA_CHUNK 256 /* tokens whose A x is held at once (sgemm path) */
#define G3_LORA_SLOT_TOKENS 32 /* below G3_BLAS_MIN_TOKENS: the scratch holds a slot of 32 tokens */
#define G3_LORA_SLOTS (G3_LORA_CHUNK / G3_LORA_SLOT_TOKENS) /* per thread: at most 8 threads */

typedef struct g3_weight_s {
    int type;           /* ggml type id */
    int64_t rows, cols; /* y = W x: rows outputs, cols inputs (contiguous) */
    size_t row_bytes;
    const uint8_t *data;
    /* the same matrix repacked for the integer decode kernels (quant/packed.h), or NULL; owned
     * by the model (g3_model_pack) */
    const struct g3_packed_s *packed;
    /* active low-rank deltas added to every product with this weight, or NULL */
    g3_lora *lora;
    /* digits of the packed prefill path's activations per 32-block: 0 for the default 3 (24
     * bits), or the opt-ins 2 (16 bits, load(prefill_precision="int16")) and 1 (8 bits, "int8") */
    int prefill_digits;
} g3_weight;

#define G3_BLAS_MIN_TOKENS 32 /* below: the per-row kernels */

/* Scratch of the three paths; the sizes are capacities, the pointers owned by the workspace. */
typedef struct {
    float *tile;        /* BLAS path: (tile rows, cols) dequantized weights, at most 16 MiB */
    size_t tile_floats;
    float *rows;        /* small path without a fused dot: (threads, 16, cols) */
    size_t rows_floats;
    uint8_t *xq;        /* packed path: (T) g3_xq headers, then (T) quantized activations */
    size_t xq_bytes;
} g3_matmul_ws;

/* Raises the capacities in *ws (pointers untouched) to what g3_matmul(W, x, t, ...) needs for every
 * t <= T on up to nt threads (counting W as packed if its type can be). */
void g3_matmul_ws_need(g3_matmul_ws *ws, const g3_weight *W, int64_t T, int nt);
/* Allocates buffers for the capacities in *ws (all or nothing); g3_matmul_ws_free releases them. */
g3_status g3_matmul_ws_alloc(g3_matmul_ws *ws, g3_err *err);
void g3_matmul_ws_free(g3_matmul_ws *ws);

/* y (T, W->rows) = x (T, W->cols) @ W^T, parallel over the g3_get_threads() threads (at most the
 * workspace's). Fails with G3_ERR_STATE if ws is smaller than g3_matmul_ws_need asked for. */
g3_status g3_matmul(const g3_weight *W, const float *x, int64_t T, float *y, g3_matmul_ws *ws,
                    g3_err *err);
/* ids[t] = the arg-max of row t of x @ W^T (lowest index on ties), for T rows: the index
 * g3_argmax_f32 gives on what g3_matmul computes. For a packed W with row bounds
 * (g3_packed.row_bound, no LoRA) the product runs at 8-bit activations, a cheap pass over the
 * weights; a row that cannot be within its bound of the best (|y8 - y| <= row_bound * |x8 - x|
 * plus float rounding, both computed) is dropped, and the others are computed exactly as
 * g3_matmul would: the same index, bit for bit, for a third of the integer work. Otherwise (or
 * for more than G3_ARGMAX_TOKENS rows, or non-finite x) the full product is taken. y (T,
 * W->rows) is scratch. *exact (if not NULL): the (row, 16-row group) pairs computed exactly, or
 * -1 when the full product was taken. */
#define G3_ARGMAX_TOKENS 64
g3_status g3_matmul_argmax(const g3_weight *W, const float *x, int64_t T, int32_t *ids, float *y,
                           int64_t *exact, g3_matmul_ws *ws, g3_err *err);
/* n products sharing the input x (same cols): y[i] = x @ W[i]^T, one parallel region when the
 * per-row kernels are used. */
g3_status g3_matmul_multi(int n, const g3_weight *const *W, const float *x, int64_t T,
                          float *const *y, g3_matmul_ws *ws, g3_err *err);
/* kernels/lora.c: y[i] += sum over W[i]'s chain of scale * (x A^T) B^T, for the n products of
 * g3_matmul_multi (same x); called by g3_matmul / g3_matmul_multi after the base product unless
 * the packed decode path added the deltas in its own region. Below G3_BLAS_MIN_TOKENS: one
 * parallel region, no barrier (each thread its own A x, then its rows); above: sgemm per delta,
 * chunks of G3_LORA_CHUNK tokens, outside any parallel region. */
void g3_lora_apply(int n, const g3_weight *const *W, const float *x, int64_t T, float *const *y);
/* The two halves, single-threaded, for a caller's parallel region (T <= G3_LORA_SLOT_TOKENS,
 * slot < G3_LORA_SLOTS, one slot per thread): u = A x of every delta on W[0..n) into the slot;
 * then y[t][r0:r1] += scale * u[t] B^T[:, r0:r1] for W's deltas (r0 a multiple of 16). */
void g3_lora_down(int n, const g3_weight *const *W, const float *x, int64_t T, int slot);
void g3_lora_up_rows(const g3_weight *W, int64_t T, int slot, int64_t r0, int64_t r1, float *y);

/* Dequantizes row r of W into dst (W->cols floats). */
void g3_weight_row(const g3_weight *W, int64_t r, float *dst);

#endif
