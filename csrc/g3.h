/* g3.h — the core's own API: status codes, ggml type ids, prototypes shared across csrc/.
 *
 * Conventions decided here:
 *   - Every fallible function returns g3_status and writes a human-readable message into a
 *     caller-owned g3_err; library code never prints, exits or aborts.
 *   - Matrices are (rows, cols) with rows contiguous; a GGUF tensor with ne = [ne0, ne1] is a
 *     (ne1, ne0) matrix, i.e. ne0 is the contiguous dimension.
 */
#ifndef G3_H
#define G3_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    G3_OK = 0,
    G3_ERR_FORMAT = 1,      /* malformed file -> gemma3.FormatError (ValueError) */
    G3_ERR_UNSUPPORTED = 2, /* valid but unsupported content -> gemma3.UnsupportedError */
    G3_ERR_NOMEM = 3,       /* -> MemoryError */
    G3_ERR_IO = 4,          /* -> OSError with the path */
    G3_ERR_ARG = 5,         /* bad argument (id out of range, context overflow) -> ValueError */
    G3_ERR_STATE = 6,       /* an object in the wrong state for the call -> RuntimeError */
    G3_ERR_INTERRUPTED = 7, /* a g3_checkpoint asked to stop; its owner knows why (Ctrl-C) */
} g3_status;

/* Cooperative interruption of long work: a driver calls check(ctx) between steps (on the calling
 * thread, never inside a parallel region); nonzero stops the work with G3_ERR_INTERRUPTED and
 * whatever the step's outputs hold is unspecified. The Python binding uses it to run signal
 * handlers, so that Ctrl-C reaches Python within one step. */
typedef struct {
    int (*check)(void *ctx);
    void *ctx;
} g3_checkpoint;

#define G3_ERR_LEN 512
typedef struct {
    char msg[G3_ERR_LEN];
    int sys_errno; /* errno for G3_ERR_IO, else 0 */
} g3_err;

/* printf-style: fills err->msg and returns st, so callers can `return g3_fail(err, ...)`. */
g3_status g3_fail(g3_err *err, g3_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Read-only private mapping of a whole regular file (io/mmap.c); *base is NULL for an empty file. */
g3_status g3_map_file(const char *path, const uint8_t **base, uint64_t *size, g3_err *err);
void g3_unmap_file(const uint8_t *base, uint64_t size);
/* Drops this process's pages of [p, p + n) inside a mapping made by g3_map_file (whole pages
 * only; the mapping is read-only and private, so a later read brings them back from the file).
 * Returns the bytes released (0 when the range is outside the mapping or nothing was dropped). */
uint64_t g3_map_release(const uint8_t *base, uint64_t size, const uint8_t *p, uint64_t n);

/* ggml tensor type ids as stored in GGUF files (ggml/include/ggml.h enum ggml_type). */
enum {
    G3_TYPE_F32 = 0,
    G3_TYPE_F16 = 1,
    G3_TYPE_Q4_0 = 2,
    G3_TYPE_Q4_1 = 3,
    G3_TYPE_Q5_0 = 6,
    G3_TYPE_Q5_1 = 7,
    G3_TYPE_Q8_0 = 8,
    G3_TYPE_Q8_1 = 9,
    G3_TYPE_Q2_K = 10,
    G3_TYPE_Q3_K = 11,
    G3_TYPE_Q4_K = 12,
    G3_TYPE_Q5_K = 13,
    G3_TYPE_Q6_K = 14,
    G3_TYPE_Q8_K = 15,
    G3_TYPE_IQ2_XXS = 16,
    G3_TYPE_IQ2_XS = 17,
    G3_TYPE_IQ3_XXS = 18,
    G3_TYPE_IQ1_S = 19,
    G3_TYPE_IQ4_NL = 20,
    G3_TYPE_IQ3_S = 21,
    G3_TYPE_IQ2_S = 22,
    G3_TYPE_IQ4_XS = 23,
    G3_TYPE_I8 = 24,
    G3_TYPE_I16 = 25,
    G3_TYPE_I32 = 26,
    G3_TYPE_I64 = 27,
    G3_TYPE_F64 = 28,
    G3_TYPE_IQ1_M = 29,
    G3_TYPE_BF16 = 30,
    G3_TYPE_TQ1_0 = 34,
    G3_TYPE_TQ2_0 = 35,
    G3_TYPE_MXFP4 = 39,
    G3_TYPE_NVFP4 = 40,
    G3_TYPE_Q1_0 = 41,
    G3_TYPE_Q2_0 = 42,
    G3_TYPE_COUNT = 43,
};

/* Per-type facts and kernels (csrc/quant/traits.c). For a type id the file format knows but we
 * cannot compute with, `known` is 1 and `to_float` is NULL; for removed or unknown ids `known` is 0. */
typedef void (*g3_to_float_fn)(const void *src, float *dst, int64_t n);
typedef void (*g3_from_float_fn)(const float *src, void *dst, int64_t n);
/* sum_i dequant(w)[i] * x[i] over one row of n elements (n % blck == 0), float activations. */
typedef float (*g3_dot_f32_fn)(const void *w, const float *x, int64_t n);

typedef struct {
    const char *name;        /* ggml name, e.g. "Q4_K" */
    int known;               /* layout known (block size and bytes valid) */
    int64_t blck;            /* elements per block */
    size_t type_size;        /* bytes per block */
    g3_to_float_fn to_float; /* scalar reference dequantization; n % blck == 0 */
    g3_from_float_fn from_float; /* reference quantization, or NULL */
    g3_dot_f32_fn dot_f32;   /* fused dequantize-and-dot (SIMD where available), or NULL */
} g3_type_traits;

const g3_type_traits *g3_type_get(int type); /* never NULL; unknown ids give a known == 0 entry */

/* Bytes of a row of n elements of `type`; 0 if unknown type or n % blck != 0. */
size_t g3_row_size(int type, int64_t n);

/* half / bfloat16 conversion (exact IEEE semantics, round-to-nearest-even for f32 -> f16/bf16). */
float g3_fp16_to_fp32(uint16_t h);
uint16_t g3_fp32_to_fp16(float f);
float g3_bf16_to_fp32(uint16_t h);
uint16_t g3_fp32_to_bf16(float f);

#ifdef __cplusplus
}
#endif
#endif /* G3_H */
