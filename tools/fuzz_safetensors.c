/* fuzz_safetensors.c — libFuzzer harness for the safetensors reader (g3_safetensors_open_memory).
 *
 * Build and run with tools/fuzz.sh safetensors SECONDS. The input is the whole file in a heap
 * buffer of exactly `size` bytes, so any read past the end is an ASan report. On success the
 * harness checks what open() promised: every tensor lies inside the data region with
 * end - begin == numel * itemsize, names and metadata are NUL-terminated at their lengths, and
 * lookups by name find a tensor with that name. On failure the message must be non-empty.
 */
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

static volatile uint8_t sink; /* defeats dead-read elimination */

static void touch(const void *p, uint64_t n)
{
    if (n) {
        sink ^= ((const uint8_t *)p)[0];
        sink ^= ((const uint8_t *)p)[n - 1];
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g3_safetensors *f = NULL;
    g3_err err;
    memset(&err, 0, sizeof err);
    g3_status st = g3_safetensors_open_memory(data, size, &f, &err);
    if (st != G3_OK) {
        size_t len = strnlen(err.msg, sizeof err.msg);
        if (f || len == 0 || len == sizeof err.msg)
            __builtin_trap(); /* failure must leave no object and a real message */
        return 0;
    }
    if (f->data_off != 8 + f->header_len || f->data_off > f->size)
        __builtin_trap();
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const g3_st_tensor *t = &f->tensor[i];
        uint64_t nbytes = t->end - t->begin;
        if (t->begin > t->end || t->data < f->base + f->data_off ||
            t->data + nbytes > f->base + f->size ||
            nbytes != t->numel * g3_st_dtype_size(t->dtype))
            __builtin_trap();
        touch(t->data, nbytes);
        touch(t->name, t->name_len + 1);
        if (t->name[t->name_len] != 0)
            __builtin_trap();
        int64_t j = g3_safetensors_find(f, t->name, t->name_len);
        if (j < 0 || f->tensor[j].name_len != t->name_len ||
            memcmp(f->tensor[j].name, t->name, t->name_len) != 0)
            __builtin_trap();
    }
    for (uint64_t i = 0; i < f->n_meta; i++) {
        touch(f->meta[i].key, f->meta[i].key_len + 1);
        touch(f->meta[i].value, f->meta[i].value_len + 1);
    }
    g3_safetensors_close(f);
    return 0;
}
