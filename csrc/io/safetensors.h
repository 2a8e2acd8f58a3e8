/* safetensors.h — read-only safetensors reader over a private read-only mapping.
 *
 * Layout: u64 little-endian header length N | N bytes of UTF-8 JSON (an object, possibly padded
 * with trailing spaces) | data region. The JSON maps each tensor name to
 * {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]} with offsets relative to
 * the data region, plus an optional "__metadata__" object of string -> string. Every length,
 * offset and size is validated at open time (reference: huggingface/safetensors, which this
 * reader matches except that it tolerates gaps between tensors), so accessors never read outside
 * the mapping. Tensor data pointers point into the mapping; names and metadata are decoded copies.
 */
#ifndef G3_SAFETENSORS_H
#define G3_SAFETENSORS_H

#include "g3.h"

#define G3_ST_MAX_HEADER (100u * 1000u * 1000u) /* the reference implementation's limit */
#define G3_ST_MAX_DIMS 16
#define G3_ST_MAX_DEPTH 32 /* JSON nesting; a valid header needs 3 */

typedef enum {
    G3_ST_BOOL,
    G3_ST_U8,
    G3_ST_I8,
    G3_ST_I16,
    G3_ST_I32,
    G3_ST_I64,
    G3_ST_F16,
    G3_ST_BF16,
    G3_ST_F32,
    G3_ST_F64,
    G3_ST_NDTYPES,
} g3_st_dtype;

typedef struct {
    const char *name; /* decoded UTF-8, NUL-terminated (may hold an escaped NUL: use name_len) */
    size_t name_len;
    g3_st_dtype dtype;
    int n_dims;
    int64_t shape[G3_ST_MAX_DIMS]; /* (n_dims), row-major: shape[n_dims-1] is contiguous */
    uint64_t numel;
    uint64_t begin, end; /* relative to the data region; end - begin == numel * itemsize */
    const uint8_t *data; /* absolute pointer into the mapping (NULL when the region is empty) */
} g3_st_tensor;

typedef struct {
    const char *key, *value; /* decoded UTF-8, NUL-terminated */
    size_t key_len, value_len;
} g3_st_meta;

typedef struct {
    const uint8_t *base; /* mapping (NULL for an empty file) */
    uint64_t size;
    uint64_t header_len;
    uint64_t data_off; /* 8 + header_len */
    uint64_t n_tensors, n_meta;
    g3_st_tensor *tensor; /* (n_tensors) in header order */
    g3_st_meta *meta;     /* (n_meta) in header order */
    char *strings;        /* arena holding every decoded name, key and value */
    int mapped;
} g3_safetensors;

g3_status g3_safetensors_open(const char *path, g3_safetensors **out, g3_err *err);
/* Same over caller memory (kept alive by the caller); used by the fuzzer. */
g3_status g3_safetensors_open_memory(const uint8_t *buf, uint64_t size, g3_safetensors **out,
                                     g3_err *err);
void g3_safetensors_close(g3_safetensors *f);

int64_t g3_safetensors_find(const g3_safetensors *f, const char *name, size_t len);
const char *g3_st_dtype_name(g3_st_dtype t);
size_t g3_st_dtype_size(g3_st_dtype t);

#endif
