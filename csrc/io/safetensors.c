/* safetensors.c — safetensors reader that trusts no byte of its input.
 *
 * The header is parsed by a small strict JSON parser (RFC 8259: objects, arrays, strings with
 * every escape incl. \u surrogate pairs, numbers, true/false/null) into a node tree, then the tree
 * is checked against the safetensors schema. Strictness beyond JSON: strings must be valid UTF-8
 * (no overlongs, no surrogates), duplicate keys are an error at every level, nesting is limited to
 * G3_ST_MAX_DEPTH, and integers must fit in 64 bits. Numbers with a fraction or exponent parse
 * (they are JSON) but are rejected wherever the schema needs an integer. Tensor byte ranges are
 * checked against the data region and for overlaps by sorting (O(n log n)).
 */
#include "io/safetensors.h"

#include <stdlib.h>
#include <string.h>

static const char *const dtype_names[G3_ST_NDTYPES] = {
    "BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64",
};
static const size_t dtype_sizes[G3_ST_NDTYPES] = {1, 1, 1, 2, 4, 8, 2, 2, 4, 8};

const char *g3_st_dtype_name(g3_st_dtype t)
{
    return (t >= 0 && t < G3_ST_NDTYPES) ? dtype_names[t] : "?";
}

size_t g3_st_dtype_size(g3_st_dtype t)
{
    return (t >= 0 && t < G3_ST_NDTYPES) ? dtype_sizes[t] : 0;
}

/* ---------------------------------------------------------------------------------------------
 * JSON: a node tree. Children of an object/array form a singly linked list (first, next);
 * object members carry their decoded key. Strings are decoded into one arena: a decoded string
 * plus its NUL is never longer than its quoted source, so an arena of header_len bytes suffices.
 */
enum { J_OBJ, J_ARR, J_STR, J_INT, J_FLOAT, J_TRUE, J_FALSE, J_NULL };
static const char *const jtype_names[] = {"object", "array", "string", "integer",
                                          "non-integer number", "true", "false", "null"};

typedef struct {
    int type;
    uint64_t off;        /* byte offset of the value in the header, for messages */
    int64_t first, next; /* child list; -1 ends it */
    uint64_t n;          /* number of children */
    const char *key;     /* member key (objects only) */
    size_t key_len;
    const char *s; /* J_STR */
    size_t len;
    int neg; /* J_INT: value = neg ? -mag : mag */
    uint64_t mag;
} jnode;

typedef struct {
    const uint8_t *p;
    uint64_t n, i;
    char *arena;
    uint64_t a;
    jnode *nodes;
    uint64_t nn, cap;
    int depth;
    g3_err *err;
} jparser;

#define HDR 8 /* header bytes start at file offset 8; messages give header-relative offsets */

static g3_status jfail_at(jparser *jp, const char *what)
{
    if (jp->i >= jp->n)
        return g3_fail(jp->err, G3_ERR_FORMAT, "header JSON: %s at byte %llu (end of header)",
                       what, (unsigned long long)jp->i);
    unsigned char c = jp->p[jp->i];
    if (c >= 32 && c < 127)
        return g3_fail(jp->err, G3_ERR_FORMAT, "header JSON: %s at byte %llu (found '%c')", what,
                       (unsigned long long)jp->i, c);
    return g3_fail(jp->err, G3_ERR_FORMAT, "header JSON: %s at byte %llu (found byte 0x%02x)",
                   what, (unsigned long long)jp->i, c);
}

static void skip_ws(jparser *jp)
{
    while (jp->i < jp->n) {
        uint8_t c = jp->p[jp->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        jp->i++;
    }
}

static int64_t new_node(jparser *jp, int type)
{
    if (jp->nn == jp->cap) {
        uint64_t cap = jp->cap ? jp->cap * 2 : 64;
        jnode *nn = realloc(jp->nodes, cap * sizeof *nn);
        if (!nn) {
            g3_fail(jp->err, G3_ERR_NOMEM, "out of memory parsing the header (%llu values)",
                    (unsigned long long)jp->nn);
            return -1;
        }
        jp->nodes = nn;
        jp->cap = cap;
    }
    jnode *nd = &jp->nodes[jp->nn];
    memset(nd, 0, sizeof *nd);
    nd->type = type;
    nd->off = jp->i;
    nd->first = nd->next = -1;
    return (int64_t)jp->nn++;
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static g3_status read_hex4(jparser *jp, uint32_t *out)
{
    uint32_t v = 0;
    *out = 0;
    for (int k = 0; k < 4; k++) {
        int h = jp->i < jp->n ? hexval(jp->p[jp->i]) : -1;
        if (h < 0)
            return jfail_at(jp, "\\u escape needs 4 hex digits");
        v = v << 4 | (uint32_t)h;
        jp->i++;
    }
    *out = v;
    return G3_OK;
}

static void put_utf8(jparser *jp, uint32_t cp)
{
    char *o = jp->arena + jp->a;
    if (cp < 0x80) {
        o[0] = (char)cp;
        jp->a += 1;
    } else if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3F));
        jp->a += 2;
    } else if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        jp->a += 3;
    } else {
        o[0] = (char)(0xF0 | cp >> 18);
        o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        o[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[3] = (char)(0x80 | (cp & 0x3F));
        jp->a += 4;
    }
}

/* Length of the well-formed UTF-8 sequence at p[0..avail) (RFC 3629 table 3-7), or 0. */
static int utf8_seq_len(const uint8_t *p, uint64_t avail)
{
    uint8_t c = p[0];
    int len;
    uint8_t lo = 0x80, hi = 0xBF; /* range of the second byte */
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0; /* no overlongs */
        if (c == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F; /* <= U+10FFFF */
    } else
        return 0;
    if ((uint64_t)len > avail || p[1] < lo || p[1] > hi)
        return 0;
    for (int k = 2; k < len; k++)
        if ((p[k] & 0xC0) != 0x80)
            return 0;
    return len;
}

/* At the opening quote; decodes into the arena (NUL-terminated). */
static g3_status parse_string(jparser *jp, const char **s, size_t *len)
{
    g3_status st;
    uint64_t start = jp->i;
    jp->i++; /* opening quote */
    char *out = jp->arena + jp->a;
    for (;;) {
        if (jp->i >= jp->n)
            return g3_fail(jp->err, G3_ERR_FORMAT,
                           "header JSON: unterminated string starting at byte %llu",
                           (unsigned long long)start);
        uint8_t c = jp->p[jp->i];
        if (c == '"') {
            jp->i++;
            break;
        }
        if (c < 0x20)
            return jfail_at(jp, "unescaped control character in a string");
        if (c >= 0x80) {
            int l = utf8_seq_len(jp->p + jp->i, jp->n - jp->i);
            if (!l)
                return jfail_at(jp, "invalid UTF-8 in a string");
            memcpy(jp->arena + jp->a, jp->p + jp->i, (size_t)l);
            jp->a += (uint64_t)l;
            jp->i += (uint64_t)l;
            continue;
        }
        if (c != '\\') {
            jp->arena[jp->a++] = (char)c;
            jp->i++;
            continue;
        }
        jp->i++;
        if (jp->i >= jp->n)
            return jfail_at(jp, "unterminated escape");
        c = jp->p[jp->i++];
        uint32_t cp = 0;
        switch (c) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if ((st = read_hex4(jp, &cp)))
                return st;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                jp->i -= 6;
                return jfail_at(jp, "lone low surrogate in a \\u escape");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo = 0;
                if (jp->i + 2 > jp->n || jp->p[jp->i] != '\\' || jp->p[jp->i + 1] != 'u')
                    return jfail_at(jp, "high surrogate \\u escape not followed by a low one");
                jp->i += 2;
                if ((st = read_hex4(jp, &lo)))
                    return st;
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    jp->i -= 6;
                    return jfail_at(jp, "high surrogate \\u escape not followed by a low one");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            break;
        default:
            jp->i--;
            return jfail_at(jp, "invalid escape");
        }
        put_utf8(jp, cp);
    }
    *s = out;
    *len = (size_t)(jp->arena + jp->a - out);
    jp->arena[jp->a++] = 0;
    return G3_OK;
}

static int is_digit(jparser *jp)
{
    return jp->i < jp->n && jp->p[jp->i] >= '0' && jp->p[jp->i] <= '9';
}

static g3_status parse_number(jparser *jp, jnode *nd)
{
    uint64_t start = jp->i;
    if (jp->p[jp->i] == '-') {
        nd->neg = 1;
        jp->i++;
    }
    if (!is_digit(jp))
        return jfail_at(jp, "invalid number");
    int overflow = 0;
    if (jp->p[jp->i] == '0') {
        jp->i++;
        if (is_digit(jp))
            return jfail_at(jp, "number with a leading zero");
    } else
        while (is_digit(jp)) {
            uint64_t d = jp->p[jp->i++] - '0';
            if (__builtin_mul_overflow(nd->mag, 10, &nd->mag) ||
                __builtin_add_overflow(nd->mag, d, &nd->mag))
                overflow = 1;
        }
    nd->type = J_INT;
    if (jp->i < jp->n && jp->p[jp->i] == '.') {
        jp->i++;
        if (!is_digit(jp))
            return jfail_at(jp, "invalid number (digit expected after '.')");
        while (is_digit(jp))
            jp->i++;
        nd->type = J_FLOAT;
    }
    if (jp->i < jp->n && (jp->p[jp->i] == 'e' || jp->p[jp->i] == 'E')) {
        jp->i++;
        if (jp->i < jp->n && (jp->p[jp->i] == '+' || jp->p[jp->i] == '-'))
            jp->i++;
        if (!is_digit(jp))
            return jfail_at(jp, "invalid number (digit expected in the exponent)");
        while (is_digit(jp))
            jp->i++;
        nd->type = J_FLOAT;
    }
    if (overflow && nd->type == J_INT)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "header JSON: integer at byte %llu does not fit in 64 bits",
                       (unsigned long long)start);
    return G3_OK;
}

typedef struct {
    const char *s;
    size_t len;
    uint64_t off;
} keyref;

static int cmp_keyref(const void *a, const void *b)
{
    const keyref *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int r = n ? memcmp(x->s, y->s, n) : 0;
    if (r)
        return r;
    return (x->len > y->len) - (x->len < y->len);
}

/* Printable, truncated copy of a decoded string for messages (ASCII only: messages become str). */
static const char *show(const char *s, size_t len, char *buf, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < len && k + 4 < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        buf[k++] = (ch >= 32 && ch < 127) ? (char)ch : '?';
    }
    if (len > k && k + 4 < n) {
        buf[k++] = '.';
        buf[k++] = '.';
        buf[k++] = '.';
    }
    buf[k] = 0;
    return buf;
}

static g3_status check_duplicates(jparser *jp, const jnode *obj)
{
    if (obj->n < 2)
        return G3_OK;
    keyref *ks = malloc(obj->n * sizeof *ks);
    if (!ks)
        return g3_fail(jp->err, G3_ERR_NOMEM, "out of memory checking %llu keys",
                       (unsigned long long)obj->n);
    uint64_t k = 0;
    for (int64_t c = obj->first; c >= 0; c = jp->nodes[c].next, k++)
        ks[k] = (keyref){jp->nodes[c].key, jp->nodes[c].key_len, jp->nodes[c].off};
    qsort(ks, obj->n, sizeof *ks, cmp_keyref);
    g3_status st = G3_OK;
    for (uint64_t i = 1; i < obj->n && !st; i++)
        if (!cmp_keyref(&ks[i - 1], &ks[i])) {
            char kb[96];
            st = g3_fail(jp->err, G3_ERR_FORMAT,
                         "header JSON: duplicate key \"%s\" in the object at byte %llu",
                         show(ks[i].s, ks[i].len, kb, sizeof kb), (unsigned long long)obj->off);
        }
    free(ks);
    return st;
}

static g3_status parse_value(jparser *jp, int64_t *out);

/* Object or array at '{' / '['; members are linked in order. */
static g3_status parse_container(jparser *jp, int64_t idx, int is_obj)
{
    g3_status st;
    if (++jp->depth > G3_ST_MAX_DEPTH)
        return jfail_at(jp, "JSON nested deeper than the limit of 32 levels");
    jp->i++;
    skip_ws(jp);
    uint8_t close = is_obj ? '}' : ']';
    int64_t last = -1;
    if (jp->i < jp->n && jp->p[jp->i] == close) {
        jp->i++;
        jp->depth--;
        return G3_OK;
    }
    for (;;) {
        const char *key = NULL;
        size_t key_len = 0;
        if (is_obj) {
            if (jp->i >= jp->n || jp->p[jp->i] != '"')
                return jfail_at(jp, "expected a string key");
            if ((st = parse_string(jp, &key, &key_len)))
                return st;
            skip_ws(jp);
            if (jp->i >= jp->n || jp->p[jp->i] != ':')
                return jfail_at(jp, "expected ':' after an object key");
            jp->i++;
        }
        int64_t child;
        if ((st = parse_value(jp, &child)))
            return st;
        /* nodes may have moved (realloc): index, never hold pointers across parse_value */
        jp->nodes[child].key = key;
        jp->nodes[child].key_len = key_len;
        if (last < 0)
            jp->nodes[idx].first = child;
        else
            jp->nodes[last].next = child;
        last = child;
        if (++jp->nodes[idx].n > G3_ST_MAX_DIMS && !is_obj)
            return g3_fail(jp->err, G3_ERR_FORMAT,
                           "header JSON: the array at byte %llu has more than %d elements (no "
                           "safetensors field needs more)",
                           (unsigned long long)jp->nodes[idx].off, G3_ST_MAX_DIMS);
        skip_ws(jp);
        if (jp->i < jp->n && jp->p[jp->i] == ',') {
            jp->i++;
            skip_ws(jp);
            continue;
        }
        if (jp->i < jp->n && jp->p[jp->i] == close) {
            jp->i++;
            break;
        }
        return jfail_at(jp, is_obj ? "expected ',' or '}' in an object"
                                   : "expected ',' or ']' in an array");
    }
    jp->depth--;
    return is_obj ? check_duplicates(jp, &jp->nodes[idx]) : G3_OK;
}

static g3_status parse_literal(jparser *jp, const char *lit)
{
    size_t l = strlen(lit);
    if (jp->n - jp->i < l || memcmp(jp->p + jp->i, lit, l) != 0)
        return jfail_at(jp, "invalid literal");
    jp->i += l;
    return G3_OK;
}

static g3_status parse_value(jparser *jp, int64_t *out)
{
    skip_ws(jp);
    if (jp->i >= jp->n)
        return jfail_at(jp, "value expected");
    uint8_t c = jp->p[jp->i];
    int64_t idx = new_node(jp, J_NULL);
    if (idx < 0)
        return G3_ERR_NOMEM;
    *out = idx;
    switch (c) {
    case '{':
        jp->nodes[idx].type = J_OBJ;
        return parse_container(jp, idx, 1);
    case '[':
        jp->nodes[idx].type = J_ARR;
        return parse_container(jp, idx, 0);
    case '"': {
        jp->nodes[idx].type = J_STR;
        const char *s = NULL;
        size_t len = 0;
        g3_status st = parse_string(jp, &s, &len);
        jp->nodes[idx].s = s;
        jp->nodes[idx].len = len;
        return st;
    }
    case 't':
        jp->nodes[idx].type = J_TRUE;
        return parse_literal(jp, "true");
    case 'f':
        jp->nodes[idx].type = J_FALSE;
        return parse_literal(jp, "false");
    case 'n':
        return parse_literal(jp, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9'))
            return parse_number(jp, &jp->nodes[idx]);
        return jfail_at(jp, "unexpected character where a value was expected");
    }
}

/* ---------------------------------------------------------------------------------------------
 * Schema checks over the tree.
 */
static const jnode *member(const jparser *jp, const jnode *obj, const char *key)
{
    size_t l = strlen(key);
    for (int64_t c = obj->first; c >= 0; c = jp->nodes[c].next)
        if (jp->nodes[c].key_len == l && memcmp(jp->nodes[c].key, key, l) == 0)
            return &jp->nodes[c];
    return NULL;
}

static g3_status parse_metadata(jparser *jp, const jnode *m, g3_safetensors *f)
{
    if (m->type != J_OBJ)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "__metadata__ must be an object of strings, got %s (header byte %llu)",
                       jtype_names[m->type], (unsigned long long)m->off);
    f->meta = calloc(m->n ? m->n : 1, sizeof *f->meta);
    if (!f->meta)
        return g3_fail(jp->err, G3_ERR_NOMEM, "out of memory for %llu metadata entries",
                       (unsigned long long)m->n);
    for (int64_t c = m->first; c >= 0; c = jp->nodes[c].next) {
        const jnode *v = &jp->nodes[c];
        char kb[96];
        if (v->type != J_STR)
            return g3_fail(jp->err, G3_ERR_FORMAT,
                           "__metadata__[\"%s\"] must be a string, got %s (header byte %llu)",
                           show(v->key, v->key_len, kb, sizeof kb), jtype_names[v->type],
                           (unsigned long long)v->off);
        f->meta[f->n_meta++] = (g3_st_meta){v->key, v->s, v->key_len, v->len};
    }
    return G3_OK;
}

/* A non-negative integer that fits int64 (what shapes and offsets need). */
static g3_status get_uint(jparser *jp, const jnode *v, const char *nb, const char *what,
                          uint64_t *out)
{
    if (v->type != J_INT)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': %s must be an integer, got %s",
                       nb, what, jtype_names[v->type]);
    if (v->neg && v->mag)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': %s is negative (-%llu)", nb, what,
                       (unsigned long long)v->mag);
    if (v->mag > (uint64_t)INT64_MAX)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': %s %llu is too large", nb, what,
                       (unsigned long long)v->mag);
    *out = v->mag;
    return G3_OK;
}

static g3_status parse_tensor(jparser *jp, const jnode *e, g3_st_tensor *t, uint64_t data_len)
{
    g3_status st;
    char nb[96];
    show(e->key, e->key_len, nb, sizeof nb);
    t->name = e->key;
    t->name_len = e->key_len;
    if (e->type != J_OBJ)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "tensor '%s': entry must be an object, got %s (header byte %llu)", nb,
                       jtype_names[e->type], (unsigned long long)e->off);
    for (int64_t c = e->first; c >= 0; c = jp->nodes[c].next) {
        const jnode *k = &jp->nodes[c];
        if (!((k->key_len == 5 && !memcmp(k->key, "dtype", 5)) ||
              (k->key_len == 5 && !memcmp(k->key, "shape", 5)) ||
              (k->key_len == 12 && !memcmp(k->key, "data_offsets", 12)))) {
            char kb[64];
            return g3_fail(jp->err, G3_ERR_FORMAT,
                           "tensor '%s': unknown field \"%s\" (expected dtype, shape, "
                           "data_offsets)",
                           nb, show(k->key, k->key_len, kb, sizeof kb));
        }
    }
    const jnode *dt = member(jp, e, "dtype"), *sh = member(jp, e, "shape"),
                *of = member(jp, e, "data_offsets");
    if (!dt || !sh || !of)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': missing field \"%s\"", nb,
                       !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    if (dt->type != J_STR)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': dtype must be a string, got %s", nb,
                       jtype_names[dt->type]);
    int d = 0;
    while (d < G3_ST_NDTYPES &&
           !(strlen(dtype_names[d]) == dt->len && !memcmp(dtype_names[d], dt->s, dt->len)))
        d++;
    if (d == G3_ST_NDTYPES) {
        char db[48];
        return g3_fail(jp->err, G3_ERR_UNSUPPORTED,
                       "tensor '%s' has dtype \"%s\", which is not supported (supported: BOOL, "
                       "U8, I8, I16, I32, I64, F16, BF16, F32, F64)",
                       nb, show(dt->s, dt->len, db, sizeof db));
    }
    t->dtype = (g3_st_dtype)d;
    if (sh->type != J_ARR)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': shape must be an array, got %s", nb,
                       jtype_names[sh->type]);
    if (sh->n > G3_ST_MAX_DIMS)
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': shape has %llu dimensions (at most %d)",
                       nb, (unsigned long long)sh->n, G3_ST_MAX_DIMS);
    t->n_dims = (int)sh->n;
    t->numel = 1;
    int k = 0;
    for (int64_t c = sh->first; c >= 0; c = jp->nodes[c].next, k++) {
        uint64_t dim;
        if ((st = get_uint(jp, &jp->nodes[c], nb, "every shape dimension", &dim)))
            return st;
        t->shape[k] = (int64_t)dim;
        if (__builtin_mul_overflow(t->numel, dim, &t->numel) || t->numel > (uint64_t)INT64_MAX)
            return g3_fail(jp->err, G3_ERR_FORMAT,
                           "tensor '%s': the element count of its shape overflows 64 bits", nb);
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(t->numel, (uint64_t)dtype_sizes[d], &nbytes))
        return g3_fail(jp->err, G3_ERR_FORMAT, "tensor '%s': the byte size overflows 64 bits",
                       nb);
    if (of->type != J_ARR || of->n != 2)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "tensor '%s': data_offsets must be an array [begin, end], got %s%s", nb,
                       of->type == J_ARR ? "an array of length " : jtype_names[of->type],
                       of->type == J_ARR ? (of->n < 2 ? "< 2" : "> 2") : "");
    if ((st = get_uint(jp, &jp->nodes[of->first], nb, "data_offsets[0]", &t->begin)) ||
        (st = get_uint(jp, &jp->nodes[jp->nodes[of->first].next], nb, "data_offsets[1]",
                       &t->end)))
        return st;
    if (t->begin > t->end)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "tensor '%s': data_offsets [%llu, %llu] are misordered (begin > end)", nb,
                       (unsigned long long)t->begin, (unsigned long long)t->end);
    if (t->end > data_len)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "tensor '%s': data_offsets [%llu, %llu] run past the end of the %llu-byte "
                       "data region",
                       nb, (unsigned long long)t->begin, (unsigned long long)t->end,
                       (unsigned long long)data_len);
    if (t->end - t->begin != nbytes)
        return g3_fail(jp->err, G3_ERR_FORMAT,
                       "tensor '%s': data_offsets span %llu bytes but %llu elements of %s need "
                       "%llu",
                       nb, (unsigned long long)(t->end - t->begin), (unsigned long long)t->numel,
                       dtype_names[d], (unsigned long long)nbytes);
    return G3_OK;
}

typedef struct {
    uint64_t begin, end, idx;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin)
        return (x->begin > y->begin) - (x->begin < y->begin);
    return (x->end > y->end) - (x->end < y->end);
}

static g3_status check_overlaps(g3_safetensors *f, g3_err *err)
{
    span *sp = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof *sp);
    if (!sp)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    uint64_t n = 0;
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (f->tensor[i].end > f->tensor[i].begin)
            sp[n++] = (span){f->tensor[i].begin, f->tensor[i].end, i};
    qsort(sp, n, sizeof *sp, cmp_span);
    g3_status st = G3_OK;
    /* sorted by begin, so comparing with the furthest-reaching earlier span finds any overlap */
    const span *far = NULL;
    for (uint64_t i = 0; i < n && !st; i++) {
        if (far && far->end > sp[i].begin) {
            const g3_st_tensor *a = &f->tensor[far->idx], *b = &f->tensor[sp[i].idx];
            char na[96], nb[96];
            st = g3_fail(err, G3_ERR_FORMAT, "tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap",
                         show(a->name, a->name_len, na, sizeof na), (unsigned long long)a->begin,
                         (unsigned long long)a->end, show(b->name, b->name_len, nb, sizeof nb),
                         (unsigned long long)b->begin, (unsigned long long)b->end);
        }
        if (!far || sp[i].end > far->end)
            far = &sp[i];
    }
    free(sp);
    return st;
}

static g3_status parse_header(g3_safetensors *f, jparser *jp, g3_err *err)
{
    g3_status st;
    if (jp->n == 0)
        return g3_fail(err, G3_ERR_FORMAT, "header length is 0; expected a JSON object");
    if (jp->p[0] != '{')
        return jfail_at(jp, "the header must be a JSON object starting with '{'");
    int64_t root;
    if ((st = parse_value(jp, &root)))
        return st;
    skip_ws(jp);
    if (jp->i != jp->n)
        return jfail_at(jp, "trailing data after the header object");
    const jnode *r = &jp->nodes[root];
    uint64_t n_entries = r->n;
    const jnode *m = member(jp, r, "__metadata__");
    if (m) {
        if ((st = parse_metadata(jp, m, f)))
            return st;
        n_entries--;
    }
    f->tensor = calloc(n_entries ? n_entries : 1, sizeof *f->tensor);
    if (!f->tensor)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for %llu tensors",
                       (unsigned long long)n_entries);
    uint64_t data_len = f->size - f->data_off;
    for (int64_t c = r->first; c >= 0; c = jp->nodes[c].next) {
        if (&jp->nodes[c] == m)
            continue;
        g3_st_tensor *t = &f->tensor[f->n_tensors++];
        if ((st = parse_tensor(jp, &jp->nodes[c], t, data_len)))
            return st;
        t->data = f->base + f->data_off + t->begin;
    }
    return check_overlaps(f, err);
}

static g3_status parse(g3_safetensors *f, g3_err *err)
{
    if (f->size < 8)
        return g3_fail(err, G3_ERR_FORMAT,
                       "file of %llu bytes is too short for a safetensors header (8-byte length "
                       "+ JSON)",
                       (unsigned long long)f->size);
    uint64_t n;
    memcpy(&n, f->base, 8); /* little-endian host (x86-64) */
    if (n > G3_ST_MAX_HEADER)
        return g3_fail(err, G3_ERR_FORMAT,
                       "header length %llu exceeds the %u-byte limit (not a safetensors file?)",
                       (unsigned long long)n, G3_ST_MAX_HEADER);
    if (n > f->size - 8)
        return g3_fail(err, G3_ERR_FORMAT,
                       "header length %llu runs past the end of the file (%llu bytes after the "
                       "length field)",
                       (unsigned long long)n, (unsigned long long)(f->size - 8));
    f->header_len = n;
    f->data_off = 8 + n;
    f->strings = malloc(n + 1);
    if (!f->strings)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for a %llu-byte header",
                       (unsigned long long)n);
    jparser jp = {.p = f->base + 8, .n = n, .arena = f->strings, .err = err};
    g3_status st = parse_header(f, &jp, err);
    free(jp.nodes);
    return st;
}

static g3_status finish_open(g3_safetensors *f, g3_safetensors **out, g3_err *err)
{
    g3_status st = parse(f, err);
    if (st) {
        g3_safetensors_close(f);
        return st;
    }
    *out = f;
    return G3_OK;
}

g3_status g3_safetensors_open_memory(const uint8_t *buf, uint64_t size, g3_safetensors **out,
                                     g3_err *err)
{
    *out = NULL;
    g3_safetensors *f = calloc(1, sizeof *f);
    if (!f)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    f->base = buf;
    f->size = size;
    return finish_open(f, out, err);
}

g3_status g3_safetensors_open(const char *path, g3_safetensors **out, g3_err *err)
{
    *out = NULL;
    const uint8_t *base;
    uint64_t size;
    g3_status st = g3_map_file(path, &base, &size, err);
    if (st)
        return st;
    g3_safetensors *f = calloc(1, sizeof *f);
    if (!f) {
        g3_unmap_file(base, size);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }
    f->base = base;
    f->size = size;
    f->mapped = base != NULL;
    return finish_open(f, out, err);
}

void g3_safetensors_close(g3_safetensors *f)
{
    if (!f)
        return;
    free(f->tensor);
    free(f->meta);
    free(f->strings);
    if (f->mapped)
        g3_unmap_file(f->base, f->size);
    free(f);
}

int64_t g3_safetensors_find(const g3_safetensors *f, const char *name, size_t len)
{
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (f->tensor[i].name_len == len && memcmp(f->tensor[i].name, name, len) == 0)
            return (int64_t)i;
    return -1;
}
