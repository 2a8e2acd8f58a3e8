/* gemm_bf16.h — C (M, N) = A (M, K) W^T (N, K) with both operands rounded to bfloat16 and
 * float32 accumulation (the vision tower's bf16 mode).
 *
 * Operands live in packed layouts built once:
 *   - weights (g3_bf16_mat): panels of G3_BF16_NR output rows; inside a panel, for each pair of
 *     inputs (2p, 2p + 1), NR 32-bit words holding the two bf16 values (low half = input 2p).
 *     K is padded to even and N to a multiple of NR with zeros. Converted at load.
 *   - activations (g3_bf16_pack_act): rows of (K + 1) / 2 32-bit words (same pairing), the row
 *     count padded to a multiple of G3_BF16_MR (a micro-kernel tile) with zero rows. Rounded per
 *     call, by the caller or per block.
 * float -> bf16 is round-to-nearest-even (NaN kept quiet), as torch's .to(torch.bfloat16).
 *
 * Each C element is one float32 sum over the pairs in increasing order,
 *   acc += a[2p+1] w[2p+1];  acc += a[2p] w[2p]     (every bf16 x bf16 product is exact in float)
 * which is what VDPBF16PS computes per lane. C is cut into blocks whose shape depends only on M and
 * N; threads take whole blocks, so a result has the same bits at any thread count.
 *
 * Variants: the scalar reference (g3_bf16_kern_ref) and AVX-512 BF16 (vdpbf16ps). The choice is
 * kernels/dispatch.c's g3_isa_bf16(); where it says no, the vision tower runs its float32 path
 * instead (csrc/vision/siglip.c), so this kernel is only ever used at its native speed. The
 * reference stays reachable for the tests (g3_bf16_gemm_isa).
 */
#ifndef G3_KERNELS_GEMM_BF16_H
#define G3_KERNELS_GEMM_BF16_H

#include "g3.h"
#include "kernels/matmul.h"

#define G3_BF16_MR 12 /* activation rows per tile (micro-kernel rows) */
#define G3_BF16_NR 32 /* weight rows per panel (micro-kernel columns: two zmm) */

typedef struct {
    int64_t rows, cols;   /* N outputs, K inputs */
    int64_t kp;           /* input pairs: (cols + 1) / 2 */
    int64_t npanel;       /* (rows + NR - 1) / NR */
    uint32_t *data;       /* (npanel, kp, NR) words, owned */
} g3_bf16_mat;

/* A view of packed activations: row r, pair p at data + r * lda + p. */
typedef struct {
    const uint32_t *data;
    int64_t lda;
} g3_bf16_act;

/* A view of packed weights: panel j, pair p at data + j * pstride + p * NR. */
typedef struct {
    const uint32_t *data;
    int64_t pstride;
} g3_bf16_wv;

/* What happens to C after the product: C = [C +] A W^T [+ bias], then gelu_tanh if gelu. */
typedef struct {
    const float *bias; /* (N) or NULL */
    int gelu;          /* apply GELU (tanh form) after the bias */
    int accumulate;    /* add to C instead of overwriting it */
} g3_bf16_epi;

uint16_t g3_f32_to_bf16(float f);
float g3_bf16_to_f32(uint16_t h);

/* Words of packed activations for M rows of K inputs (tiles padded with zero rows). */
size_t g3_bf16_act_words(int64_t M, int64_t K);
/* Rounds rows [r0, r1) of X (M, K) at row stride ldx into packed rows of lda >= (K + 1) / 2
 * words at dst (the rows past M up to the next multiple of MR are zeroed when r1 = M).
 * Single-threaded: callers split by rows. SIMD where the selected level allows (same bits). */
void g3_bf16_pack_rows(const float *X, int64_t ldx, int64_t K, int64_t r0, int64_t r1,
                       int64_t M, uint32_t *dst, int64_t lda);
/* All of X (lda = (K + 1) / 2), parallel over tiles. */
void g3_bf16_pack_act(const float *X, int64_t M, int64_t K, int64_t ldx, uint32_t *dst, int nt);

/* Converts a weight of any dequantizable type (rows dequantized to float32, then rounded). */
g3_status g3_bf16_mat_from_weight(const g3_weight *W, g3_bf16_mat *out, g3_err *err);
/* The same from n float32 matrices stacked by rows (W[i]: rows[i] x cols, contiguous): one packed
 * matrix with sum(rows) outputs (fused q/k/v). */
g3_status g3_bf16_mat_from_weights(int n, const g3_weight *const *W, g3_bf16_mat *out,
                                   g3_err *err);
/* Packs a float32 matrix (rows, cols) at row stride ld into panels at dst (npanel * kp * NR
 * words), single-threaded. Used for keys (rows = keys, cols = head size). */
void g3_bf16_pack_panels(const float *W, int64_t rows, int64_t cols, int64_t ld, uint32_t *dst);
/* Packs the transpose of X (n rows of c values at stride ld, i.e. W = X^T with c outputs and n
 * inputs): values as weights for P V. dst has ((c + NR - 1) / NR) * ((n + 1) / 2) * NR words. */
void g3_bf16_pack_panels_t(const float *X, int64_t n, int64_t c, int64_t ld, uint32_t *dst);
void g3_bf16_mat_free(g3_bf16_mat *m);

/* Single-threaded: C[0:M, 0:N] (ldc) (+)= A W^T over kp pairs, A/W views at their pair 0.
 * accumulate = 0 overwrites C. */
void g3_bf16_gemm_block(g3_bf16_act A, g3_bf16_wv W, int64_t M, int64_t N, int64_t kp, float *C,
                        int64_t ldc, int accumulate);

/* C (M, W->rows) = epilogue(A W^T), A packed by g3_bf16_pack_act with W->cols inputs; blocks of
 * C on nt threads. */
void g3_bf16_gemm(const uint32_t *A, int64_t M, const g3_bf16_mat *W, float *C, int64_t ldc,
                  const g3_bf16_epi *epi, int nt);
/* The same with the variant forced: simd = 0 the scalar reference, 1 the selected one. */
void g3_bf16_gemm_isa(const uint32_t *A, int64_t M, const g3_bf16_mat *W, float *C, int64_t ldc,
                      const g3_bf16_epi *epi, int nt, int simd);

#endif
