/* tokenizer.h — Gemma 3 tokenizer core: SentencePiece-style BPE over a scored vocabulary, or
 * Hugging Face rank-based BPE over an explicit merge list, with byte fallback.
 *
 * A tokenizer is immutable once built (g3_tokenizer_set_merges is part of building), so encode and
 * decode may run concurrently from several threads; each call allocates its own scratch.
 * Output buffers are malloc'd and owned by the caller (release with free()).
 */
#ifndef G3_TEXT_TOKENIZER_H
#define G3_TEXT_TOKENIZER_H

#include "g3.h"

#ifdef __cplusplus
extern "C" {
#endif

/* GGUF tokenizer.ggml.token_type values (llama.cpp llama_token_type). */
enum {
    G3_TOK_NORMAL = 1,
    G3_TOK_UNKNOWN = 2,
    G3_TOK_CONTROL = 3,
    G3_TOK_USER_DEFINED = 4,
    G3_TOK_UNUSED = 5,
    G3_TOK_BYTE = 6,
};

typedef struct g3_tokenizer g3_tokenizer;

/* Copies the vocabulary: texts[i] of lens[i] bytes (any bytes; may be empty), scores[i], types[i]
 * for i < n_tokens. Without merges, encoding merges the adjacent pair whose concatenation is the
 * NORMAL or USER_DEFINED token of highest score (SentencePiece BPE). */
g3_status g3_tokenizer_build(g3_tokenizer **out, int32_t n_tokens, const char *const *texts,
                             const size_t *lens, const float *scores, const int32_t *types,
                             g3_err *err);

/* Switches to rank-based merging (Hugging Face BPE): pairs is (n_merges, 2) token ids, row r being
 * the merge of rank r. A pair merges into the token whose text is the concatenation; the lowest
 * rank merges first. Fails with G3_ERR_FORMAT if an id is out of range or the concatenation is
 * not a token. Call once, right after g3_tokenizer_build. */
g3_status g3_tokenizer_set_merges(g3_tokenizer *tok, int64_t n_merges, const int32_t *pairs,
                                  g3_err *err);

void g3_tokenizer_free(g3_tokenizer *tok);

int32_t g3_tokenizer_n_tokens(const g3_tokenizer *tok);

/* Id of the token whose text is exactly text[0:len], or -1. The lowest id wins on duplicates. */
int32_t g3_tokenizer_find(const g3_tokenizer *tok, const char *text, size_t len);

/* Stored text of token id (not NUL-terminated). G3_ERR_ARG if id is out of range. */
g3_status g3_tokenizer_token(const g3_tokenizer *tok, int32_t id, const char **text, size_t *len,
                             g3_err *err);

/* Encodes text[0:len] (any bytes) into *ids (n_ids entries; *ids may be NULL when n_ids is 0).
 * USER_DEFINED tokens are split out of the raw text first (leftmost, then longest match), and
 * CONTROL/UNKNOWN tokens too when parse_special is nonzero; the remaining fragments have ' '
 * replaced by U+2581 and are merged; symbols that are not tokens become <0xXX> byte tokens.
 * No BOS/EOS is added. */
g3_status g3_tokenizer_encode(const g3_tokenizer *tok, const char *text, size_t len,
                              int parse_special, int32_t **ids, size_t *n_ids, g3_err *err);

/* Concatenated bytes of the tokens: NORMAL and USER_DEFINED text with U+2581 -> ' ', BYTE
 * tokens -> their byte, CONTROL/UNKNOWN/UNUSED -> their text if render_special else nothing.
 * G3_ERR_ARG on an out-of-range id. *out is NUL-terminated for convenience (not counted). */
g3_status g3_tokenizer_decode(const g3_tokenizer *tok, const int32_t *ids, size_t n_ids,
                              int render_special, char **out, size_t *out_len, g3_err *err);

#ifdef __cplusplus
}
#endif
#endif /* G3_TEXT_TOKENIZER_H */
