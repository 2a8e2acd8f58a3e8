/* fuzz_gguf.c — libFuzzer harness for the GGUF reader (g3_gguf_open_memory).
 *
 * Build and run with tools/fuzz.sh (clang, -fsanitize=fuzzer,address,undefined). The input is the
 * whole file, in a heap buffer of exactly `size` bytes, so any read past the end is an ASan report.
 * On success the harness walks everything open() promised is in bounds: every key and string, every
 * numeric array's last byte, every tensor's first and last byte, and dequantizes small tensors with
 * the type's reference kernel. On failure the message must be a non-empty NUL-terminated string.
 */
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"

#define MAX_DEQUANT_ELEMS (1 << 16) /* keep each execution fast */

static volatile uint8_t sink; /* defeats dead-read elimination */

static void touch(const void *p, uint64_t n)
{
    if (n) {
        sink ^= ((const uint8_t *)p)[0];
        sink ^= ((const uint8_t *)p)[n - 1];
    }
}

static void walk_kv(const g3_gguf_kv *kv)
{
    touch(kv->key.ptr, kv->key.len);
    int t = kv->type == G3_GGUF_ARRAY ? kv->arr_type : kv->type;
    if (t != G3_GGUF_STRING) {
        touch(kv->data, kv->nbytes);
        return;
    }
    g3_str *s = malloc((kv->n ? kv->n : 1) * sizeof *s);
    if (!s)
        return;
    g3_gguf_kv_strings(kv, s);
    for (uint64_t i = 0; i < kv->n; i++)
        touch(s[i].ptr, s[i].len);
    free(s);
}

static void walk_tensor(const g3_gguf *g, const g3_gguf_tensor *t)
{
    touch(t->name.ptr, t->name.len);
    touch(t->data, t->nbytes);
    if (t->data < g->base + g->data_off || t->data + t->nbytes > g->base + g->size)
        __builtin_trap(); /* open() promised the tensor lies inside the data blob */
    const g3_type_traits *tt = g3_type_get(t->type);
    if (!tt->known || !tt->to_float || !t->nbytes)
        return;
    int64_t n = (int64_t)(t->nbytes / tt->type_size) * tt->blck;
    if (n > MAX_DEQUANT_ELEMS)
        return;
    float *dst = malloc((size_t)n * sizeof *dst);
    if (!dst)
        return;
    tt->to_float(t->data, dst, n);
    sink ^= (uint8_t)(dst[n - 1] != dst[n - 1]); /* NaN is fine; reading it must be defined */
    free(dst);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g3_gguf *g = NULL;
    g3_err err;
    memset(&err, 0, sizeof err);
    g3_status st = g3_gguf_open_memory(data, size, &g, &err);
    if (st != G3_OK) {
        size_t len = strnlen(err.msg, sizeof err.msg);
        if (g || len == 0 || len == sizeof err.msg)
            __builtin_trap(); /* failure must leave no object and a real message */
        return 0;
    }
    for (uint64_t i = 0; i < g->n_kv; i++)
        walk_kv(&g->kv[i]);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        walk_tensor(g, &g->tensor[i]);
    /* lookups by the names just read */
    if (g->n_tensors) {
        const g3_str nm = g->tensor[g->n_tensors - 1].name;
        char buf[64];
        memcpy(buf, nm.ptr, nm.len); /* len <= 63 was validated */
        buf[nm.len] = 0;
        if (strlen(buf) == nm.len && g3_gguf_find_tensor(g, buf) < 0)
            __builtin_trap();
    }
    (void)g3_gguf_find_key(g, "general.architecture");
    g3_gguf_close(g);
    return 0;
}
