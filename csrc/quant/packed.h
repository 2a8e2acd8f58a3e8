/* packed.h — weights repacked for the integer (AVX-512 VNNI) matrix-vector product of decoding.
 *
 * A decode step multiplies every weight by one activation vector, so it should cost what reading
 * the weights costs. The fused dequantize-and-dot kernels (dot_avx512.c) convert each weight to
 * float and are compute-bound at ~6 GB/s per core; here the weights stay integers:
 *
 *   - Rows are interleaved 16 at a time (a "group"), so one vpdpbusd multiplies 4 columns of 16
 *     rows by the same 4 activation bytes and no horizontal sums are ever needed.
 *   - Each weight is stored as an unsigned code u (0..255) with w = scale * (u - c) or, for
 *     Q4_K/Q5_K, w = d*sc*u - dmin*m: the code and every scale are exactly the file's, so the
 *     weights are bit-for-bit what the reference dequantization gives (no re-quantization).
 *   - Activations are quantized per 32-block to X = round(x / s), |X| <= 8355711 (24 bits, the
 *     precision of float32), split into three signed base-256 digits X = 65536*D2 + 256*D1 + D0.
 *     Three vpdpbusd per 64 weights give exact integer sums per digit; they are combined in float.
 *     The only approximation is x ~ s*X: |error| <= s/2 = amax_block * 6e-8, the size of a
 *     float32 rounding; logits agree with the float path to ~1e-6 relative.
 *
 * Group layout, per 32-column block b (in order), 16 rows r:
 *   K-quant super-block header before blocks b % 8 == 0: the file's half d[16] (Q6_K: 32 bytes);
 *   Q4_K/Q5_K: half d[16], half dmin[16], then the 8 blocks' 6-bit scales and mins: 16 bytes
 *   per block j (byte r: low 4 bits of sc | low 4 bits of m << 4) and 8 bytes per block j
 *   (row r's nibble, the low one for even r, in byte r / 2: top 2 bits of sc | of m << 2):
 *   256 bytes, so a group holds exactly the file's bytes of its 16 rows;
 *   values: BYTES (Q8_0 as q+128): chunk j = 0..7 is 64 bytes, bytes 4r..4r+3 = u[r][4j..4j+3].
 *   NIB (Q4_0, Q4_K): chunk j = 0..3, byte 4r+k = u[r][4j+k] low nibble | u[r][16+4j+k] high
 *   nibble. NIB5 (Q5_0, Q5_K): NIB plus a 64-byte plane whose byte 4r+k holds the 5th bit of
 *   u[r][4j+k] at bit j and of u[r][16+4j+k] at bit 4+j. NIB6 (Q6_K, 6-bit codes): NIB plus two
 *   64-byte planes whose byte 4r+k holds bits 4-5 of u[r][4j+k] (first plane) and of
 *   u[r][16+4j+k] (second) at bits 2j, 2j+1 — 6.5625 bits per weight, the file's own size;
 *   scales (32 bytes; none for Q4_K/Q5_K, whose are in the header): half d[16]
 *   (Q8_0/Q4_0/Q5_0) or int8 sc[2][16] per 16-column half (Q6_K).
 * Rows past the end of the matrix are zero codes with zero scales.
 */
#ifndef G3_QUANT_PACKED_H
#define G3_QUANT_PACKED_H

#include "g3.h"

#define G3_PACK_ROWS 16
#define G3_PACK_LIM 8355711 /* largest |X| with three signed base-256 digits: 127 * 65793 */

typedef struct g3_packed_s {
    int type;              /* source ggml type */
    int64_t rows, cols;    /* as the source matrix */
    int64_t groups, nb;    /* ceil(rows / 16); 32-column blocks per row */
    size_t group_bytes;
    uint8_t *data;         /* groups * group_bytes, 64-byte aligned, owned */
    /* (rows) or NULL: per row, |c|_2 + |m|_2 where the row's weights as the kernels see them are
     * w_i = c_i - m_i, c_i the scaled code (scale * (u_i - offset), or d*sc*u_i for Q4_K/Q5_K)
     * and m_i the K-quant sub-block's min (dmin*m, 0 for other types), rounded up; owned. It
     * bounds how far a row's product moves when the activations do (g3_matmul_argmax). */
    float *row_bound;
} g3_packed;

/* Activations of one token quantized for the packed kernels (g3_xq_prepare). */
typedef struct {
    int64_t cols, nb;
    int8_t *digit[3];  /* (cols) D0, D1, D2 */
    float *scale;      /* (nb) s per block: x ~ s * X */
    float *xsum;       /* (nb) float sum of x per block (Q4_K/Q5_K mins) */
    int32_t *dsum;     /* (nb, 2 halves, 3 digits): sums of each digit over 16 columns */
} g3_xq;

/* Activation precision of the prefill GEMM (g3_packed_gemm); each value is its digit count. */
enum {
    G3_PREFILL_8BIT = 1,  /* one digit, |X| <= 127 per 32-block: opt-in, the class of llama.cpp's Q8 */
    G3_PREFILL_16BIT = 2, /* two digits, |X| <= 32639: opt-in, two thirds of the integer work */
    G3_PREFILL_EXACT = 3  /* three digits, 24 bits: the decode kernels' activations (default) */
};

/* 1 if the CPU (and G3_ISA) allow the packed kernels and `type` has one. */
int g3_pack_supported(int type);
/* Packs a (rows, cols) matrix of `type` stored row after row (row_bytes apart), on `threads`
 * OpenMP threads; with `bounds`, also computes P->row_bound (left NULL if a row's is not
 * finite: a matrix with Inf/NaN weights gets no bound). */
g3_status g3_pack(int type, const uint8_t *data, int64_t rows, int64_t cols, size_t row_bytes,
                  int threads, int bounds, g3_packed **out, g3_err *err);
void g3_packed_free(g3_packed *p);

/* Bytes g3_xq_init needs for `cols` (a multiple of 32) and the layout over such a buffer. */
size_t g3_xq_bytes(int64_t cols);
void g3_xq_init(g3_xq *xq, int64_t cols, void *buf);
void g3_xq_prepare(g3_xq *xq, const float *x);
/* The same with ndig (1..3) digits: |X| <= 127, 32639 or G3_PACK_LIM (8-, 16- or 24-bit
 * activations per 32-block); digits above ndig are zero. ndig = 3 is g3_xq_prepare. */
void g3_xq_prepare_digits(g3_xq *xq, const float *x, int ndig);
/* |a^ - b^|_2 in double, a^ and b^ the activations two quantizations of one vector stand for
 * (x ~ s * X per 32-block); the same cols. */
double g3_xq_distance(const g3_xq *a, const g3_xq *b);
/* Intervals for g3_matmul_argmax: v[i] becomes an upper end of v[i] +- bound[i] * rad (rounded
 * up); returns the largest lower end (rounded down), or NaN if an end is not finite. */
float g3_bound_rows(float *v, const float *bound, float rad, int64_t n);
/* 1 if one of v[0..n) (n <= 16) is >= thr. */
int g3_any_at_least(const float *v, int64_t n, float thr);
/* y[r] for the rows of groups [g0, g1) of one token; y has P->rows entries. */
void g3_packed_matvec(const g3_packed *P, const g3_xq *xq, int64_t g0, int64_t g1, float *y);
/* The same for T tokens (xq[0..T)) in one pass over the weights, y (T, P->rows); each token's
 * rows are bit-identical to g3_packed_matvec's. Tokens are taken G3_PACK_MAX_TOKENS at a time. */
#define G3_PACK_MAX_TOKENS 16
void g3_packed_matmat(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                      float *y);
/* The same with xq prepared by g3_xq_prepare_digits(.., ndig), ndig 1 or 3 (g3_packed_matmat). */
void g3_packed_matmat_digits(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                             float *y, int ndig);

/* Prompt processing: x quantized for `mode` (a G3_PREFILL_*); then y (T, P->rows),
 * the rows of groups [g0, g1), for the T tokens xq[0..T). Tokens are taken 8 at a time against
 * one group's unpacked codes; a row's result depends only on its token, never on T, g0 or g1
 * (G3_PREFILL_EXACT: bit-identical to g3_packed_matvec's for that token). */
void g3_xq_prepare_prefill(g3_xq *xq, const float *x, int mode);
void g3_packed_gemm(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1, float *y,
                    int mode);

#endif
