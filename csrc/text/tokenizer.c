/* tokenizer.c — Gemma 3 tokenizer: special-token split, bottom-up BPE merging, byte fallback.
 *
 *   encode(text) = concat over fragments f of split(text) of
 *                  (f is a special token ? [id(f)] : emit(merge(chars(replace(f, ' ', U+2581)))))
 *
 * split: leftmost-longest matching of USER_DEFINED (always) and CONTROL/UNKNOWN (parse_special)
 *        token texts on the raw bytes, with a byte trie — the rule Hugging Face's AddedVocabulary
 *        applies; for Gemma's vocabulary the same result as llama.cpp's longest-token-first pass.
 * merge: repeatedly join the best adjacent pair. Score mode (GGUF / SentencePiece): a pair is a
 *        candidate if its concatenation is a NORMAL or USER_DEFINED token; best = highest score of
 *        that token. Rank mode (tokenizer.json): a pair is a candidate if it is in the merge list;
 *        best = lowest rank. Ties go to the leftmost pair in both. A max-heap holds candidates;
 *        stale entries are dropped when popped, so a fragment of n symbols costs O(n log n).
 * emit:  a symbol that is a token gives its id; otherwise each of its bytes gives <0xXX>.
 *
 * Characters are UTF-8 sequences with valid continuation bytes; any other byte is a symbol of its
 * own, which then falls back to its byte token, so every input byte string encodes.
 */
#include "text/tokenizer.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define G3_TOK_MAX_INPUT ((size_t)INT32_MAX / 4) /* symbol indices are int32 after ' ' -> 3 bytes */

typedef struct {
    uint64_t key; /* (a << 32) | b, UINT64_MAX when empty */
    int32_t rank;
    int32_t result;
} g3_pair_slot;

typedef struct {
    uint64_t key; /* (node << 8) | byte, UINT64_MAX when empty */
    int32_t child;
} g3_edge_slot;

struct g3_tokenizer {
    int32_t n;
    char *blob;          /* all token texts back to back */
    size_t *off;         /* (n + 1) token i is blob[off[i] : off[i+1]] */
    float *scores;       /* (n) */
    int8_t *types;       /* (n) G3_TOK_* */
    int16_t *byte_value; /* (n) the byte a BYTE token <0xXX> stands for, or -1 */
    int32_t byte_tok[256]; /* token emitted for a fallback byte, or -1 */
    int32_t unk_id;        /* first UNKNOWN token, or -1 */
    size_t max_len;        /* longest token text, bytes */

    /* vocabulary hash: open addressing over token ids, linear probing */
    int32_t *vslot; /* (vmask + 1) token id or -1 */
    uint32_t *vhash; /* (n) hash of each token's text */
    size_t vmask;

    /* byte trie of the splittable tokens; node 0 is the root */
    int32_t root[256];  /* child of the root per byte, or -1 */
    g3_edge_slot *edge; /* (emask + 1) other edges */
    size_t emask;
    int32_t *node_tok; /* (n_nodes) token ending at the node, or -1 */
    int32_t n_nodes;

    /* rank mode */
    int rank_mode;
    g3_pair_slot *pair; /* (pmask + 1) */
    size_t pmask;
};

/* ---- hashing ------------------------------------------------------------------------------ */

static uint32_t g3_hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, folded */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static uint64_t g3_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static size_t g3_pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

static int g3_tok_mergeable(int type)
{
    return type == G3_TOK_NORMAL || type == G3_TOK_USER_DEFINED;
}

static int g3_tok_splittable(int type, int parse_special)
{
    return type == G3_TOK_USER_DEFINED ||
           (parse_special && (type == G3_TOK_CONTROL || type == G3_TOK_UNKNOWN));
}

static int32_t g3_find_h(const g3_tokenizer *tok, const char *text, size_t len, uint32_t h)
{
    for (size_t i = h & tok->vmask;; i = (i + 1) & tok->vmask) {
        int32_t id = tok->vslot[i];
        if (id < 0)
            return -1;
        if (tok->vhash[id] == h && tok->off[id + 1] - tok->off[id] == len &&
            memcmp(tok->blob + tok->off[id], text, len) == 0)
            return id;
    }
}

int32_t g3_tokenizer_find(const g3_tokenizer *tok, const char *text, size_t len)
{
    if (len > tok->max_len)
        return -1;
    return g3_find_h(tok, text, len, g3_hash_bytes(text, len));
}

static int32_t g3_edge_get(const g3_tokenizer *tok, int32_t node, unsigned char c)
{
    if (node == 0)
        return tok->root[c];
    uint64_t key = ((uint64_t)node << 8) | c;
    for (size_t i = g3_mix64(key) & tok->emask;; i = (i + 1) & tok->emask) {
        if (tok->edge[i].key == key)
            return tok->edge[i].child;
        if (tok->edge[i].key == UINT64_MAX)
            return -1;
    }
}

static void g3_edge_put(g3_tokenizer *tok, int32_t node, unsigned char c, int32_t child)
{
    if (node == 0) {
        tok->root[c] = child;
        return;
    }
    uint64_t key = ((uint64_t)node << 8) | c;
    size_t i = g3_mix64(key) & tok->emask;
    while (tok->edge[i].key != UINT64_MAX)
        i = (i + 1) & tok->emask;
    tok->edge[i].key = key;
    tok->edge[i].child = child;
}

static int g3_pair_get(const g3_tokenizer *tok, int32_t a, int32_t b, int32_t *rank, int32_t *res)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = g3_mix64(key) & tok->pmask;; i = (i + 1) & tok->pmask) {
        if (tok->pair[i].key == key) {
            *rank = tok->pair[i].rank;
            *res = tok->pair[i].result;
            return 1;
        }
        if (tok->pair[i].key == UINT64_MAX)
            return 0;
    }
}

/* ---- building ----------------------------------------------------------------------------- */

static int g3_parse_byte_token(const char *s, size_t n)
{
    /* "<0xXX>" with hex digits of either case */
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = (c >= '0' && c <= '9')   ? c - '0'
                : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                                         : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static g3_status g3_build_trie(g3_tokenizer *tok, g3_err *err)
{
    size_t total = 1;
    for (int32_t i = 0; i < tok->n; i++)
        if (g3_tok_splittable(tok->types[i], 1))
            total += tok->off[i + 1] - tok->off[i];
    if (total > (size_t)INT32_MAX)
        return g3_fail(err, G3_ERR_ARG, "special tokens too long in total (%zu bytes)", total);
    tok->node_tok = malloc(total * sizeof *tok->node_tok);
    tok->emask = g3_pow2_at_least(2 * total) - 1;
    tok->edge = malloc((tok->emask + 1) * sizeof *tok->edge);
    if (!tok->node_tok || !tok->edge)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory building the special-token trie");
    for (size_t i = 0; i <= tok->emask; i++)
        tok->edge[i].key = UINT64_MAX;
    for (int c = 0; c < 256; c++)
        tok->root[c] = -1;
    tok->node_tok[0] = -1;
    tok->n_nodes = 1;
    for (int32_t id = 0; id < tok->n; id++) {
        size_t len = tok->off[id + 1] - tok->off[id];
        if (!g3_tok_splittable(tok->types[id], 1) || len == 0)
            continue;
        const unsigned char *s = (const unsigned char *)tok->blob + tok->off[id];
        int32_t node = 0;
        for (size_t j = 0; j < len; j++) {
            int32_t next = g3_edge_get(tok, node, s[j]);
            if (next < 0) {
                next = tok->n_nodes++;
                tok->node_tok[next] = -1;
                g3_edge_put(tok, node, s[j], next);
            }
            node = next;
        }
        if (tok->node_tok[node] < 0)
            tok->node_tok[node] = id;
    }
    return G3_OK;
}

g3_status g3_tokenizer_build(g3_tokenizer **out, int32_t n_tokens, const char *const *texts,
                             const size_t *lens, const float *scores, const int32_t *types,
                             g3_err *err)
{
    *out = NULL;
    if (n_tokens <= 0 || n_tokens > INT32_MAX / 4)
        return g3_fail(err, G3_ERR_ARG, "vocabulary size %d out of range", (int)n_tokens);
    g3_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    g3_status st = G3_OK;
    size_t n = (size_t)n_tokens, total = 0;
    tok->n = n_tokens;
    tok->unk_id = -1;
    for (size_t i = 0; i < n; i++) {
        if (types[i] < 0 || types[i] > G3_TOK_BYTE) {
            st = g3_fail(err, G3_ERR_ARG, "token %zu has unknown type %d (expected 0..6)", i,
                         (int)types[i]);
            goto error;
        }
        total += lens[i];
    }
    tok->blob = malloc(total ? total : 1);
    tok->off = malloc((n + 1) * sizeof *tok->off);
    tok->scores = malloc(n * sizeof *tok->scores);
    tok->types = malloc(n);
    tok->byte_value = malloc(n * sizeof *tok->byte_value);
    tok->vhash = malloc(n * sizeof *tok->vhash);
    tok->vmask = g3_pow2_at_least(2 * n) - 1;
    tok->vslot = malloc((tok->vmask + 1) * sizeof *tok->vslot);
    if (!tok->blob || !tok->off || !tok->scores || !tok->types || !tok->byte_value ||
        !tok->vhash || !tok->vslot) {
        st = g3_fail(err, G3_ERR_NOMEM, "out of memory for a vocabulary of %zu tokens", n);
        goto error;
    }
    memset(tok->vslot, 0xff, (tok->vmask + 1) * sizeof *tok->vslot);
    for (int c = 0; c < 256; c++)
        tok->byte_tok[c] = -1;
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        tok->off[i] = pos;
        if (lens[i])
            memcpy(tok->blob + pos, texts[i], lens[i]);
        pos += lens[i];
        if (lens[i] > tok->max_len)
            tok->max_len = lens[i];
        tok->scores[i] = isnan(scores[i]) ? -INFINITY : scores[i];
        /* type 0 (undefined in llama.cpp) behaves as NORMAL */
        tok->types[i] = (int8_t)(types[i] == 0 ? G3_TOK_NORMAL : types[i]);
        tok->byte_value[i] = -1;
        if (tok->types[i] == G3_TOK_BYTE) {
            int b = g3_parse_byte_token(texts[i], lens[i]);
            tok->byte_value[i] = (int16_t)b;
            if (b >= 0 && tok->byte_tok[b] < 0)
                tok->byte_tok[b] = (int32_t)i;
        }
        if (tok->types[i] == G3_TOK_UNKNOWN && tok->unk_id < 0)
            tok->unk_id = (int32_t)i;
    }
    tok->off[n] = pos;
    for (size_t i = 0; i < n; i++) {
        size_t len = lens[i];
        uint32_t h = g3_hash_bytes(tok->blob + tok->off[i], len);
        tok->vhash[i] = h;
        if (g3_find_h(tok, tok->blob + tok->off[i], len, h) >= 0)
            continue; /* duplicate text: the lower id keeps it */
        size_t s = h & tok->vmask;
        while (tok->vslot[s] >= 0)
            s = (s + 1) & tok->vmask;
        tok->vslot[s] = (int32_t)i;
    }
    /* a byte without a <0xXX> token falls back to a one-byte token if there is one */
    for (int c = 0; c < 256; c++) {
        if (tok->byte_tok[c] < 0) {
            char ch = (char)c;
            tok->byte_tok[c] = g3_tokenizer_find(tok, &ch, 1);
        }
    }
    if ((st = g3_build_trie(tok, err)) != G3_OK)
        goto error;
    *out = tok;
    return G3_OK;
error:
    g3_tokenizer_free(tok);
    return st;
}

g3_status g3_tokenizer_set_merges(g3_tokenizer *tok, int64_t n_merges, const int32_t *pairs,
                                  g3_err *err)
{
    if (tok->pair)
        return g3_fail(err, G3_ERR_STATE, "merges already set");
    /* ranks become float heap priorities, exact below 2^24 */
    if (n_merges < 0 || n_merges >= (1 << 24))
        return g3_fail(err, G3_ERR_UNSUPPORTED, "%lld merges (at most 16777215 supported)",
                       (long long)n_merges);
    tok->pmask = g3_pow2_at_least(2 * (size_t)n_merges) - 1;
    tok->pair = malloc((tok->pmask + 1) * sizeof *tok->pair);
    char *buf = malloc(2 * tok->max_len + 1);
    if (!tok->pair || !buf) {
        free(buf);
        free(tok->pair);
        tok->pair = NULL;
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for %lld merges", (long long)n_merges);
    }
    for (size_t i = 0; i <= tok->pmask; i++)
        tok->pair[i].key = UINT64_MAX;
    for (int64_t r = 0; r < n_merges; r++) {
        int32_t a = pairs[2 * r], b = pairs[2 * r + 1];
        if (a < 0 || a >= tok->n || b < 0 || b >= tok->n) {
            free(buf);
            free(tok->pair);
            tok->pair = NULL;
            return g3_fail(err, G3_ERR_FORMAT, "merge %lld: token id out of range (%d, %d)",
                           (long long)r, (int)a, (int)b);
        }
        size_t la = tok->off[a + 1] - tok->off[a], lb = tok->off[b + 1] - tok->off[b];
        memcpy(buf, tok->blob + tok->off[a], la);
        memcpy(buf + la, tok->blob + tok->off[b], lb);
        int32_t res = g3_tokenizer_find(tok, buf, la + lb);
        if (res < 0) {
            free(buf);
            free(tok->pair);
            tok->pair = NULL;
            return g3_fail(err, G3_ERR_FORMAT,
                           "merge %lld (%d, %d): the concatenation is not a token", (long long)r,
                           (int)a, (int)b);
        }
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        size_t s = g3_mix64(key) & tok->pmask;
        while (tok->pair[s].key != UINT64_MAX && tok->pair[s].key != key)
            s = (s + 1) & tok->pmask;
        if (tok->pair[s].key == key)
            continue; /* repeated pair: the first (lowest) rank counts */
        tok->pair[s].key = key;
        tok->pair[s].rank = (int32_t)r;
        tok->pair[s].result = res;
    }
    free(buf);
    tok->rank_mode = 1;
    return G3_OK;
}

void g3_tokenizer_free(g3_tokenizer *tok)
{
    if (!tok)
        return;
    free(tok->blob);
    free(tok->off);
    free(tok->scores);
    free(tok->types);
    free(tok->byte_value);
    free(tok->vslot);
    free(tok->vhash);
    free(tok->edge);
    free(tok->node_tok);
    free(tok->pair);
    free(tok);
}

int32_t g3_tokenizer_n_tokens(const g3_tokenizer *tok) { return tok->n; }

g3_status g3_tokenizer_token(const g3_tokenizer *tok, int32_t id, const char **text, size_t *len,
                             g3_err *err)
{
    if (id < 0 || id >= tok->n)
        return g3_fail(err, G3_ERR_ARG, "token id %d out of range for a vocabulary of size %d",
                       (int)id, (int)tok->n);
    *text = tok->blob + tok->off[id];
    *len = tok->off[id + 1] - tok->off[id];
    return G3_OK;
}

/* ---- encoding ----------------------------------------------------------------------------- */

typedef struct {
    int32_t start, len; /* bytes norm[start : start+len]; len 0 once merged into its left */
    int32_t prev, next; /* neighbours in the list, -1 at the ends */
    int32_t id;         /* token of this symbol, or -1 (then it falls back to bytes) */
} g3_sym;

typedef struct {
    float prio;             /* higher merges first: score, or -rank */
    int32_t left, right;    /* symbol indices */
    int32_t size;           /* len(left) + len(right) when pushed; differs once stale */
    int32_t id;             /* token the pair becomes */
} g3_bigram;

typedef struct {
    const g3_tokenizer *tok;
    char *norm; /* (cap_norm) fragment with ' ' -> U+2581 */
    size_t cap_norm;
    g3_sym *sym; /* (cap_sym) */
    size_t cap_sym;
    g3_bigram *heap; /* (cap_heap), n_heap in use */
    size_t cap_heap, n_heap;
    int32_t *ids; /* (cap_ids) output, n_ids in use */
    size_t cap_ids, n_ids;
} g3_encoder;

static int g3_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 1;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return 0;
    *p = q;
    *cap = c;
    return 1;
}

static int g3_emit(g3_encoder *e, int32_t id)
{
    if (!g3_grow((void **)&e->ids, &e->cap_ids, e->n_ids + 1, sizeof *e->ids))
        return 0;
    e->ids[e->n_ids++] = id;
    return 1;
}

static int g3_bigram_better(const g3_bigram *a, const g3_bigram *b)
{
    return a->prio > b->prio || (a->prio == b->prio && a->left < b->left);
}

static int g3_heap_push(g3_encoder *e, g3_bigram bg)
{
    if (!g3_grow((void **)&e->heap, &e->cap_heap, e->n_heap + 1, sizeof *e->heap))
        return 0;
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!g3_bigram_better(&bg, &e->heap[p]))
            break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = bg;
    return 1;
}

static g3_bigram g3_heap_pop(g3_encoder *e)
{
    g3_bigram top = e->heap[0], last = e->heap[--e->n_heap];
    size_t n = e->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && g3_bigram_better(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!g3_bigram_better(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

/* Pushes the pair (l, r) of adjacent symbols if it may merge; returns 0 only when out of memory. */
static int g3_try_pair(g3_encoder *e, int32_t l, int32_t r)
{
    const g3_tokenizer *tok = e->tok;
    if (l < 0 || r < 0)
        return 1;
    g3_bigram bg = {.left = l, .right = r, .size = e->sym[l].len + e->sym[r].len};
    if (tok->rank_mode) {
        int32_t rank;
        if (e->sym[l].id < 0 || e->sym[r].id < 0 ||
            !g3_pair_get(tok, e->sym[l].id, e->sym[r].id, &rank, &bg.id))
            return 1;
        bg.prio = -(float)rank;
    } else {
        if ((size_t)bg.size > tok->max_len)
            return 1;
        bg.id = g3_tokenizer_find(tok, e->norm + e->sym[l].start, (size_t)bg.size);
        if (bg.id < 0)
            return 1;
        bg.prio = tok->scores[bg.id];
    }
    if (!g3_tok_mergeable(tok->types[bg.id]))
        return 1;
    return g3_heap_push(e, bg);
}

static size_t g3_utf8_char_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || n > avail)
        return 1;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 1;
    return n;
}

static g3_status g3_fallback_bytes(g3_encoder *e, const g3_sym *s, g3_err *err)
{
    const g3_tokenizer *tok = e->tok;
    for (int32_t k = 0; k < s->len; k++) {
        unsigned char b = (unsigned char)e->norm[s->start + k];
        int32_t id = tok->byte_tok[b] >= 0 ? tok->byte_tok[b] : tok->unk_id;
        if (id < 0)
            return g3_fail(err, G3_ERR_ARG,
                           "cannot encode byte 0x%02X: the vocabulary has neither a byte token "
                           "<0x%02X> nor an unknown token",
                           b, b);
        if (!g3_emit(e, id))
            return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }
    return G3_OK;
}

static g3_status g3_encode_fragment(g3_encoder *e, const char *text, size_t len, g3_err *err)
{
    const g3_tokenizer *tok = e->tok;
    if (len == 0)
        return G3_OK;
    size_t nlen = 0;
    for (size_t i = 0; i < len; i++)
        nlen += text[i] == ' ' ? 3 : 1;
    if (!g3_grow((void **)&e->norm, &e->cap_norm, nlen, 1) ||
        !g3_grow((void **)&e->sym, &e->cap_sym, nlen, sizeof *e->sym))
        return g3_fail(err, G3_ERR_NOMEM, "out of memory encoding %zu bytes", len);
    char *norm = e->norm;
    for (size_t i = 0, j = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(norm + j, "\xE2\x96\x81", 3);
            j += 3;
        } else {
            norm[j++] = text[i];
        }
    }
    int32_t n_sym = 0;
    for (size_t i = 0; i < nlen;) {
        size_t cl = g3_utf8_char_len((const unsigned char *)norm + i, nlen - i);
        g3_sym *s = &e->sym[n_sym];
        s->start = (int32_t)i;
        s->len = (int32_t)cl;
        s->prev = n_sym - 1;
        s->next = n_sym + 1;
        int32_t id = g3_tokenizer_find(tok, norm + i, cl);
        s->id = id >= 0 && g3_tok_mergeable(tok->types[id]) ? id : -1;
        n_sym++;
        i += cl;
    }
    e->sym[n_sym - 1].next = -1;

    e->n_heap = 0;
    for (int32_t i = 0; i + 1 < n_sym; i++)
        if (!g3_try_pair(e, i, i + 1))
            return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    while (e->n_heap) {
        g3_bigram bg = g3_heap_pop(e);
        g3_sym *l = &e->sym[bg.left], *r = &e->sym[bg.right];
        if (l->len == 0 || r->len == 0 || l->next != bg.right || l->len + r->len != bg.size)
            continue; /* stale: one side merged since the pair was pushed */
        l->len += r->len;
        l->id = bg.id;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0)
            e->sym[r->next].prev = bg.left;
        if (!g3_try_pair(e, l->prev, bg.left) || !g3_try_pair(e, bg.left, l->next))
            return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }

    for (int32_t i = 0; i >= 0; i = e->sym[i].next) {
        const g3_sym *s = &e->sym[i];
        if (s->id >= 0) {
            if (!g3_emit(e, s->id))
                return g3_fail(err, G3_ERR_NOMEM, "out of memory");
        } else {
            g3_status st = g3_fallback_bytes(e, s, err);
            if (st != G3_OK)
                return st;
        }
    }
    return G3_OK;
}

/* Longest splittable token starting at text[0:len]: returns its length (0 if none), id in *id. */
static size_t g3_match_special(const g3_tokenizer *tok, const unsigned char *text, size_t len,
                               int parse_special, int32_t *id)
{
    size_t best = 0;
    int32_t node = 0;
    for (size_t j = 0; j < len; j++) {
        node = g3_edge_get(tok, node, text[j]);
        if (node < 0)
            break;
        int32_t t = tok->node_tok[node];
        if (t >= 0 && g3_tok_splittable(tok->types[t], parse_special)) {
            best = j + 1;
            *id = t;
        }
    }
    return best;
}

g3_status g3_tokenizer_encode(const g3_tokenizer *tok, const char *text, size_t len,
                              int parse_special, int32_t **ids, size_t *n_ids, g3_err *err)
{
    *ids = NULL;
    *n_ids = 0;
    if (len > G3_TOK_MAX_INPUT)
        return g3_fail(err, G3_ERR_ARG, "input of %zu bytes is too long (at most %zu)", len,
                       G3_TOK_MAX_INPUT);
    g3_encoder e = {.tok = tok};
    g3_status st = G3_OK;
    const unsigned char *u = (const unsigned char *)text;
    size_t frag = 0;
    for (size_t i = 0; i < len;) {
        int32_t id = -1;
        size_t m = tok->root[u[i]] >= 0 ? g3_match_special(tok, u + i, len - i, parse_special, &id)
                                        : 0;
        if (m == 0) {
            i++;
            continue;
        }
        if ((st = g3_encode_fragment(&e, text + frag, i - frag, err)) != G3_OK)
            goto done;
        if (!g3_emit(&e, id)) {
            st = g3_fail(err, G3_ERR_NOMEM, "out of memory");
            goto done;
        }
        i += m;
        frag = i;
    }
    st = g3_encode_fragment(&e, text + frag, len - frag, err);
done:
    free(e.norm);
    free(e.sym);
    free(e.heap);
    if (st != G3_OK) {
        free(e.ids);
        return st;
    }
    *ids = e.ids;
    *n_ids = e.n_ids;
    return G3_OK;
}

/* ---- decoding ----------------------------------------------------------------------------- */

/* Writes token id's bytes to out (if not NULL); returns how many. */
static size_t g3_piece(const g3_tokenizer *tok, int32_t id, int render_special, char *out)
{
    const char *s = tok->blob + tok->off[id];
    size_t n = tok->off[id + 1] - tok->off[id];
    switch (tok->types[id]) {
    case G3_TOK_BYTE:
        if (tok->byte_value[id] >= 0) {
            if (out)
                out[0] = (char)tok->byte_value[id];
            return 1;
        }
        break; /* malformed byte token: its text */
    case G3_TOK_CONTROL:
    case G3_TOK_UNKNOWN:
    case G3_TOK_UNUSED:
        if (!render_special)
            return 0;
        if (out)
            memcpy(out, s, n);
        return n;
    default:
        break;
    }
    /* NORMAL and USER_DEFINED: U+2581 (E2 96 81) -> ' ' */
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (i + 2 < n && (unsigned char)s[i] == 0xE2 && (unsigned char)s[i + 1] == 0x96 &&
            (unsigned char)s[i + 2] == 0x81) {
            if (out)
                out[k] = ' ';
            k++;
            i += 3;
        } else {
            if (out)
                out[k] = s[i];
            k++;
            i++;
        }
    }
    return k;
}

g3_status g3_tokenizer_decode(const g3_tokenizer *tok, const int32_t *ids, size_t n_ids,
                              int render_special, char **out, size_t *out_len, g3_err *err)
{
    *out = NULL;
    *out_len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n)
            return g3_fail(err, G3_ERR_ARG,
                           "token id %d (at position %zu) out of range for a vocabulary of size %d",
                           (int)ids[i], i, (int)tok->n);
        total += g3_piece(tok, ids[i], render_special, NULL);
    }
    char *buf = malloc(total + 1);
    if (!buf)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory decoding %zu tokens", n_ids);
    size_t k = 0;
    for (size_t i = 0; i < n_ids; i++)
        k += g3_piece(tok, ids[i], render_special, buf + k);
    buf[k] = '\0';
    *out = buf;
    *out_len = k;
    return G3_OK;
}
