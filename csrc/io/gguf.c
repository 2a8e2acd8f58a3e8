/* gguf.c — GGUF reader that trusts no byte of its input.
 *
 * Matches the container described in ggml's gguf.h/docs (reference: llama-cpp-gemma3.md §1). Every
 * read goes through a bounds-checked cursor; counts are checked against the bytes that remain
 * before anything is allocated, so a hostile count near 2^64 fails fast instead of allocating.
 * Duplicate keys/names and overlapping tensors are found by sorting (O(n log n)).
 */
#include "io/gguf.h"

#include <stdlib.h>
#include <string.h>

#define G3_GGUF_MAX_NAME 64 /* ggml's GGML_MAX_NAME, including the terminating NUL */
#define G3_GGUF_DEFAULT_ALIGNMENT 32

static const char *const gguf_type_names[G3_GGUF_NTYPES] = {
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
    "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
};

size_t g3_gguf_value_size(int type)
{
    static const size_t sz[G3_GGUF_NTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return (type >= 0 && type < G3_GGUF_NTYPES) ? sz[type] : 0;
}

typedef struct {
    const uint8_t *p;
    uint64_t size, off;
    g3_err *err;
} cursor;

static uint64_t remaining(const cursor *c) { return c->size - c->off; }

static g3_status need(cursor *c, uint64_t n, const char *what)
{
    if (n > remaining(c))
        return g3_fail(c->err, G3_ERR_FORMAT,
                       "truncated file: %s needs %llu bytes at offset %llu but only %llu remain",
                       what, (unsigned long long)n, (unsigned long long)c->off,
                       (unsigned long long)remaining(c));
    return G3_OK;
}

static g3_status read_bytes(cursor *c, void *dst, uint64_t n, const char *what)
{
    g3_status st = need(c, n, what);
    if (st)
        return st;
    memcpy(dst, c->p + c->off, n);
    c->off += n;
    return G3_OK;
}

#define READ(c, var, what) read_bytes((c), &(var), sizeof(var), (what))

static g3_status read_str(cursor *c, g3_str *s, const char *what)
{
    uint64_t len;
    g3_status st = READ(c, len, what);
    if (st)
        return st;
    if (len > remaining(c))
        return g3_fail(c->err, G3_ERR_FORMAT,
                       "%s: string length %llu at offset %llu runs past the end of the file "
                       "(%llu bytes remain)",
                       what, (unsigned long long)len, (unsigned long long)(c->off - 8),
                       (unsigned long long)remaining(c));
    s->ptr = (const char *)(c->p + c->off);
    s->len = len;
    c->off += len;
    return G3_OK;
}

/* Key/name text for messages: printable prefix, truncated. */
static const char *show(g3_str s, char *buf, size_t n)
{
    size_t k = 0;
    for (uint64_t i = 0; i < s.len && k + 4 < n; i++) {
        unsigned char ch = (unsigned char)s.ptr[i];
        buf[k++] = (ch >= 32 && ch < 127) ? (char)ch : '?';
    }
    if (s.len > k && k + 4 < n) {
        buf[k++] = '.';
        buf[k++] = '.';
        buf[k++] = '.';
    }
    buf[k] = 0;
    return buf;
}

static int str_cmp(g3_str a, g3_str b)
{
    uint64_t n = a.len < b.len ? a.len : b.len;
    int r = n ? memcmp(a.ptr, b.ptr, n) : 0;
    if (r)
        return r;
    return (a.len > b.len) - (a.len < b.len);
}

static int str_eq(g3_str a, const char *b)
{
    size_t n = strlen(b);
    return a.len == n && memcmp(a.ptr, b, n) == 0;
}

static g3_status read_value(cursor *c, g3_gguf_kv *kv, char *kb)
{
    g3_status st;
    int32_t t;
    if ((st = READ(c, t, "value type")))
        return st;
    if (t < 0 || t >= G3_GGUF_NTYPES)
        return g3_fail(c->err, G3_ERR_FORMAT, "key '%s': unknown value type %d at offset %llu",
                       kb, t, (unsigned long long)(c->off - 4));
    kv->type = t;
    kv->arr_type = -1;
    kv->n = 1;
    if (t == G3_GGUF_ARRAY) {
        int32_t at;
        uint64_t n;
        if ((st = READ(c, at, "array element type")) || (st = READ(c, n, "array length")))
            return st;
        if (at == G3_GGUF_ARRAY)
            return g3_fail(c->err, G3_ERR_FORMAT, "key '%s': nested arrays are not allowed", kb);
        if (at < 0 || at >= G3_GGUF_NTYPES)
            return g3_fail(c->err, G3_ERR_FORMAT, "key '%s': unknown array element type %d", kb,
                           at);
        kv->arr_type = at;
        kv->n = n;
        t = at;
    }
    kv->data = c->p + c->off;
    if (t == G3_GGUF_STRING) {
        /* each string takes at least its 8-byte length */
        if (kv->n > remaining(c) / 8)
            return g3_fail(c->err, G3_ERR_FORMAT,
                           "key '%s': %llu strings cannot fit in the %llu bytes that remain", kb,
                           (unsigned long long)kv->n, (unsigned long long)remaining(c));
        for (uint64_t i = 0; i < kv->n; i++) {
            g3_str s;
            if ((st = read_str(c, &s, kb)))
                return st;
        }
    } else {
        uint64_t es = g3_gguf_value_size(t);
        if (kv->n > remaining(c) / es)
            return g3_fail(c->err, G3_ERR_FORMAT,
                           "key '%s': %llu values of %s (%llu bytes each) run past the end of "
                           "the file (%llu bytes remain)",
                           kb, (unsigned long long)kv->n, gguf_type_names[t],
                           (unsigned long long)es, (unsigned long long)remaining(c));
        c->off += kv->n * es;
    }
    kv->nbytes = (uint64_t)(c->p + c->off - kv->data);
    return G3_OK;
}

void g3_gguf_kv_strings(const g3_gguf_kv *kv, g3_str *out)
{
    /* bounds were validated at open time */
    const uint8_t *p = kv->data;
    for (uint64_t i = 0; i < kv->n; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        out[i].ptr = (const char *)p + 8;
        out[i].len = len;
        p += 8 + len;
    }
}

static _Thread_local const g3_gguf *sort_ctx; /* qsort has no context argument in C11 */

static int cmp_kv_index(const void *a, const void *b)
{
    return str_cmp(sort_ctx->kv[*(const uint64_t *)a].key, sort_ctx->kv[*(const uint64_t *)b].key);
}
static int cmp_tensor_name(const void *a, const void *b)
{
    return str_cmp(sort_ctx->tensor[*(const uint64_t *)a].name,
                   sort_ctx->tensor[*(const uint64_t *)b].name);
}
static int cmp_tensor_off(const void *a, const void *b)
{
    uint64_t x = sort_ctx->tensor[*(const uint64_t *)a].offset;
    uint64_t y = sort_ctx->tensor[*(const uint64_t *)b].offset;
    return (x > y) - (x < y);
}

/* qsort has no context argument, so the table being sorted is passed through sort_ctx; opens are
 * serialized by the caller (the Python binding holds the GIL while parsing). */
static uint64_t *sorted_index(const g3_gguf *g, uint64_t n, int (*cmp)(const void *, const void *))
{
    uint64_t *idx = malloc((n ? n : 1) * sizeof *idx);
    if (!idx)
        return NULL;
    for (uint64_t i = 0; i < n; i++)
        idx[i] = i;
    sort_ctx = g;
    qsort(idx, n, sizeof *idx, cmp);
    return idx;
}

static g3_status check_unique_keys(g3_gguf *g, g3_err *err)
{
    uint64_t *idx = sorted_index(g, g->n_kv, cmp_kv_index);
    if (!idx)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory sorting %llu keys",
                       (unsigned long long)g->n_kv);
    g3_status st = G3_OK;
    for (uint64_t i = 1; i < g->n_kv && !st; i++)
        if (!str_cmp(g->kv[idx[i - 1]].key, g->kv[idx[i]].key)) {
            char kb[96];
            st = g3_fail(err, G3_ERR_FORMAT, "duplicate key '%s' (at offsets %llu and %llu)",
                         show(g->kv[idx[i]].key, kb, sizeof kb),
                         (unsigned long long)g->kv[idx[i - 1]].file_off,
                         (unsigned long long)g->kv[idx[i]].file_off);
        }
    free(idx);
    return st;
}

static g3_status parse_kvs(cursor *c, g3_gguf *g)
{
    g3_status st;
    /* smallest pair: 8 (key len) + 1 (key) + 4 (type) + 1 (u8 value) */
    if (g->n_kv > remaining(c) / 14)
        return g3_fail(c->err, G3_ERR_FORMAT,
                       "metadata count %llu cannot fit in the %llu bytes that remain",
                       (unsigned long long)g->n_kv, (unsigned long long)remaining(c));
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    if (!g->kv)
        return g3_fail(c->err, G3_ERR_NOMEM, "out of memory for %llu metadata entries",
                       (unsigned long long)g->n_kv);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        g3_gguf_kv *kv = &g->kv[i];
        char kb[96];
        kv->file_off = c->off;
        if ((st = read_str(c, &kv->key, "metadata key")))
            return st;
        if (kv->key.len == 0)
            return g3_fail(c->err, G3_ERR_FORMAT, "metadata entry %llu has an empty key at offset %llu",
                           (unsigned long long)i, (unsigned long long)kv->file_off);
        if ((st = read_value(c, kv, (char *)show(kv->key, kb, sizeof kb))))
            return st;
    }
    if ((st = check_unique_keys(g, c->err)))
        return st;
    g->alignment = G3_GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = g3_gguf_find_key(g, "general.alignment");
    if (ai >= 0) {
        const g3_gguf_kv *kv = &g->kv[ai];
        uint32_t a = 0;
        if (kv->type != G3_GGUF_U32)
            return g3_fail(c->err, G3_ERR_FORMAT, "general.alignment must be UINT32, got %s",
                           gguf_type_names[kv->type]);
        memcpy(&a, kv->data, 4);
        if (a == 0 || (a & (a - 1)))
            return g3_fail(c->err, G3_ERR_FORMAT,
                           "general.alignment must be a non-zero power of two, got %u", a);
        g->alignment = a;
    }
    return G3_OK;
}

static g3_status parse_tensor_info(cursor *c, g3_gguf_tensor *t)
{
    g3_status st;
    char nb[96];
    t->info_off = c->off;
    if ((st = read_str(c, &t->name, "tensor name")))
        return st;
    show(t->name, nb, sizeof nb);
    if (t->name.len == 0 || t->name.len >= G3_GGUF_MAX_NAME)
        return g3_fail(c->err, G3_ERR_FORMAT,
                       "tensor name '%s' at offset %llu has length %llu (must be 1..%d)", nb,
                       (unsigned long long)t->info_off, (unsigned long long)t->name.len,
                       G3_GGUF_MAX_NAME - 1);
    if ((st = READ(c, t->n_dims, "tensor dimension count")))
        return st;
    if (t->n_dims > 4)
        return g3_fail(c->err, G3_ERR_FORMAT, "tensor '%s' has %u dimensions (at most 4)", nb,
                       t->n_dims);
    int64_t nel = 1;
    for (int j = 0; j < 4; j++) {
        t->ne[j] = 1;
        if ((uint32_t)j < t->n_dims && (st = READ(c, t->ne[j], "tensor dimension")))
            return st;
        if (t->ne[j] < 0)
            return g3_fail(c->err, G3_ERR_FORMAT, "tensor '%s' has negative dimension %lld", nb,
                           (long long)t->ne[j]);
        if (__builtin_mul_overflow(nel, t->ne[j], &nel))
            return g3_fail(c->err, G3_ERR_FORMAT,
                           "tensor '%s': the element count overflows 64 bits", nb);
    }
    int32_t type;
    if ((st = READ(c, type, "tensor type")) || (st = READ(c, t->offset, "tensor offset")))
        return st;
    t->type = type;
    const g3_type_traits *tt = g3_type_get(type);
    if (!tt->known)
        return g3_fail(c->err, G3_ERR_UNSUPPORTED,
                       "tensor '%s' has ggml type id %d (%s), which is unknown or was removed "
                       "from the format",
                       nb, type, tt->name);
    if (t->ne[0] % tt->blck)
        return g3_fail(c->err, G3_ERR_FORMAT,
                       "tensor '%s': row length ne[0]=%lld is not a multiple of the %s block "
                       "size %lld",
                       nb, (long long)t->ne[0], tt->name, (long long)tt->blck);
    uint64_t nblocks = (uint64_t)nel / (uint64_t)tt->blck;
    if (__builtin_mul_overflow(nblocks, (uint64_t)tt->type_size, &t->nbytes))
        return g3_fail(c->err, G3_ERR_FORMAT, "tensor '%s': the byte size overflows 64 bits", nb);
    return G3_OK;
}

static g3_status check_tensor_layout(g3_gguf *g, g3_err *err)
{
    char nb[96], nb2[96];
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        g3_gguf_tensor *t = &g->tensor[i];
        show(t->name, nb, sizeof nb);
        if (t->offset % g->alignment)
            return g3_fail(err, G3_ERR_FORMAT,
                           "tensor '%s': data offset %llu is not a multiple of the alignment %llu",
                           nb, (unsigned long long)t->offset, (unsigned long long)g->alignment);
        uint64_t avail = g->size - g->data_off;
        if (t->offset > avail || t->nbytes > avail - t->offset)
            return g3_fail(err, G3_ERR_FORMAT,
                           "tensor '%s': data [%llu, +%llu) at file offset %llu runs past the end "
                           "of the file (%llu bytes)",
                           nb, (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                           (unsigned long long)(g->data_off + t->offset),
                           (unsigned long long)g->size);
        t->data = g->base + g->data_off + t->offset;
    }
    uint64_t *idx = sorted_index(g, g->n_tensors, cmp_tensor_name);
    if (!idx)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    g3_status st = G3_OK;
    for (uint64_t i = 1; i < g->n_tensors && !st; i++)
        if (!str_cmp(g->tensor[idx[i - 1]].name, g->tensor[idx[i]].name))
            st = g3_fail(err, G3_ERR_FORMAT, "duplicate tensor name '%s'",
                         show(g->tensor[idx[i]].name, nb, sizeof nb));
    free(idx);
    if (st)
        return st;
    idx = sorted_index(g, g->n_tensors, cmp_tensor_off);
    if (!idx)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    /* Compare each non-empty tensor with the non-empty one reaching furthest among those that start
     * before it, not just with its sorted neighbour: an empty tensor in between must not hide an
     * overlap. Ends are <= file size (checked above), so the sums cannot overflow. */
    const g3_gguf_tensor *a = NULL;
    for (uint64_t i = 0; i < g->n_tensors && !st; i++) {
        const g3_gguf_tensor *b = &g->tensor[idx[i]];
        if (!b->nbytes)
            continue;
        if (a && a->offset + a->nbytes > b->offset)
            st = g3_fail(err, G3_ERR_FORMAT,
                         "tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap",
                         show(a->name, nb, sizeof nb), (unsigned long long)a->offset,
                         (unsigned long long)(a->offset + a->nbytes),
                         show(b->name, nb2, sizeof nb2), (unsigned long long)b->offset,
                         (unsigned long long)(b->offset + b->nbytes));
        if (!a || b->offset + b->nbytes > a->offset + a->nbytes)
            a = b;
    }
    free(idx);
    return st;
}

static g3_status parse(g3_gguf *g, g3_err *err)
{
    cursor c = {g->base, g->size, 0, err};
    g3_status st;
    if (g->size == 0)
        return g3_fail(err, G3_ERR_FORMAT, "empty file (0 bytes); expected a GGUF header");
    if (g->size < 4 || memcmp(g->base, "GGUF", 4) != 0) {
        unsigned char m[4] = {0};
        memcpy(m, g->base, g->size < 4 ? g->size : 4);
        return g3_fail(err, G3_ERR_FORMAT,
                       "bad magic %02x %02x %02x %02x: not a GGUF file (expected 'GGUF')", m[0],
                       m[1], m[2], m[3]);
    }
    c.off = 4;
    if ((st = READ(&c, g->version, "version")))
        return st;
    if (g->version == 0)
        return g3_fail(err, G3_ERR_FORMAT, "invalid GGUF version 0");
    if ((g->version & 0xFFFF) == 0)
        return g3_fail(err, G3_ERR_FORMAT,
                       "version field 0x%08x looks byte-swapped: big-endian GGUF files are not "
                       "supported",
                       g->version);
    if (g->version == 1)
        return g3_fail(err, G3_ERR_UNSUPPORTED, "GGUF version 1 is no longer supported");
    if (g->version < 2 || g->version > 3)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "unsupported GGUF version %u (this reader handles versions 2 and 3)",
                       g->version);
    int64_t nt, nk;
    if ((st = READ(&c, nt, "tensor count")) || (st = READ(&c, nk, "metadata count")))
        return st;
    if (nt < 0 || nk < 0)
        return g3_fail(err, G3_ERR_FORMAT, "negative count (tensors %lld, metadata %lld)",
                       (long long)nt, (long long)nk);
    g->n_tensors = (uint64_t)nt;
    g->n_kv = (uint64_t)nk;
    if ((st = parse_kvs(&c, g)))
        return st;
    /* smallest tensor info: 8 + 1 (name) + 4 (n_dims) + 4 (type) + 8 (offset) */
    if (g->n_tensors > remaining(&c) / 25)
        return g3_fail(err, G3_ERR_FORMAT,
                       "tensor count %llu cannot fit in the %llu bytes that remain",
                       (unsigned long long)g->n_tensors, (unsigned long long)remaining(&c));
    g->tensor = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensor);
    if (!g->tensor)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for %llu tensor infos",
                       (unsigned long long)g->n_tensors);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((st = parse_tensor_info(&c, &g->tensor[i])))
            return st;
    uint64_t pad = (g->alignment - c.off % g->alignment) % g->alignment;
    if (g->n_tensors == 0) {
        g->data_off = c.off;
        return G3_OK;
    }
    if (pad > remaining(&c))
        return g3_fail(err, G3_ERR_FORMAT,
                       "truncated file: padding before the tensor data at offset %llu runs past "
                       "the end",
                       (unsigned long long)c.off);
    g->data_off = c.off + pad;
    return check_tensor_layout(g, err);
}

static g3_status finish_open(g3_gguf *g, g3_gguf **out, g3_err *err)
{
    g3_status st = parse(g, err);
    if (st) {
        g3_gguf_close(g);
        return st;
    }
    *out = g;
    return G3_OK;
}

g3_status g3_gguf_open_memory(const uint8_t *buf, uint64_t size, g3_gguf **out, g3_err *err)
{
    g3_gguf *g = calloc(1, sizeof *g);
    if (!g)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    g->base = buf;
    g->size = size;
    *out = NULL;
    return finish_open(g, out, err);
}

g3_status g3_gguf_open(const char *path, g3_gguf **out, g3_err *err)
{
    *out = NULL;
    const uint8_t *base;
    uint64_t size;
    g3_status st = g3_map_file(path, &base, &size, err);
    if (st)
        return st;
    g3_gguf *g = calloc(1, sizeof *g);
    if (!g) {
        g3_unmap_file(base, size);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }
    g->base = base;
    g->size = size;
    g->mapped = base != NULL;
    return finish_open(g, out, err);
}

void g3_gguf_close(g3_gguf *g)
{
    if (!g)
        return;
    free(g->kv);
    free(g->tensor);
    if (g->mapped)
        g3_unmap_file(g->base, g->size);
    free(g);
}

int64_t g3_gguf_find_key(const g3_gguf *g, const char *key)
{
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (str_eq(g->kv[i].key, key))
            return (int64_t)i;
    return -1;
}

int64_t g3_gguf_find_tensor(const g3_gguf *g, const char *name)
{
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (str_eq(g->tensor[i].name, name))
            return (int64_t)i;
    return -1;
}
