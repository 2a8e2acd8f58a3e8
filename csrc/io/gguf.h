/* gguf.h — read-only GGUF (v2/v3) reader over a private read-only mapping.
 *
 * Layout (little-endian): magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | kv pairs |
 * tensor infos | zero padding to `alignment` | data blob. Every count, length, offset and dimension
 * is validated against the file size (with overflow checks) at open time, so accessors never read
 * outside the mapping. Values keep pointers into the mapping; nothing is copied.
 */
#ifndef G3_GGUF_H
#define G3_GGUF_H

#include "g3.h"

enum {
    G3_GGUF_U8 = 0,
    G3_GGUF_I8 = 1,
    G3_GGUF_U16 = 2,
    G3_GGUF_I16 = 3,
    G3_GGUF_U32 = 4,
    G3_GGUF_I32 = 5,
    G3_GGUF_F32 = 6,
    G3_GGUF_BOOL = 7,
    G3_GGUF_STRING = 8,
    G3_GGUF_ARRAY = 9,
    G3_GGUF_U64 = 10,
    G3_GGUF_I64 = 11,
    G3_GGUF_F64 = 12,
    G3_GGUF_NTYPES = 13,
};

typedef struct {
    const char *ptr; /* into the mapping, not NUL-terminated */
    uint64_t len;
} g3_str;

typedef struct {
    g3_str key;
    int type;          /* G3_GGUF_* */
    int arr_type;      /* element type when type == ARRAY */
    uint64_t n;        /* element count (1 for scalars) */
    const uint8_t *data; /* first byte of the value (after the array header for arrays) */
    uint64_t nbytes;   /* bytes spanned by the value data */
    uint64_t file_off; /* offset of the key in the file, for messages */
} g3_gguf_kv;

typedef struct {
    g3_str name;
    uint32_t n_dims;
    int64_t ne[4];     /* ggml order: ne[0] contiguous; unused dims are 1 */
    int type;          /* ggml type id */
    uint64_t offset;   /* relative to the data blob */
    uint64_t nbytes;
    const uint8_t *data; /* absolute pointer into the mapping */
    uint64_t info_off; /* file offset of the tensor info record, for messages */
} g3_gguf_tensor;

typedef struct {
    const uint8_t *base; /* mapping (NULL for an empty file) */
    uint64_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    g3_gguf_kv *kv;         /* (n_kv) */
    g3_gguf_tensor *tensor; /* (n_tensors) */
    uint64_t alignment;
    uint64_t data_off;      /* file offset of the data blob */
    int mapped;             /* base is our own mapping (unmapped by close) */
} g3_gguf;

/* Opens and validates `path`; on success *out owns the mapping. */
g3_status g3_gguf_open(const char *path, g3_gguf **out, g3_err *err);
/* Same over caller memory (kept alive by the caller); used by the fuzzers. */
g3_status g3_gguf_open_memory(const uint8_t *buf, uint64_t size, g3_gguf **out, g3_err *err);
void g3_gguf_close(g3_gguf *g);

int64_t g3_gguf_find_key(const g3_gguf *g, const char *key);
int64_t g3_gguf_find_tensor(const g3_gguf *g, const char *name);
/* Fills out[0..kv->n) with the strings of a STRING kv (n == 1) or a string array kv. */
void g3_gguf_kv_strings(const g3_gguf_kv *kv, g3_str *out);
size_t g3_gguf_value_size(int type); /* 0 for STRING/ARRAY/unknown */

#endif
