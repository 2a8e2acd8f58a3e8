/* gemm.h — float32 matrix products on our own thread pool.
 *
 * C (M, N) = alpha * A (M, K) op(B), row-major, C overwritten. op(B) = B^T with B (N, K)
 * (G3_GEMM_BT: weights and keys), or B (K, N) (G3_GEMM_B: values).
 *
 * C is cut into blocks whose shape depends only on M and N (never on the thread count); the
 * blocks are shared out over our OpenMP threads, and each is one cblas_sgemm call with OpenBLAS
 * held at one thread (threading.c). So OpenBLAS never starts a thread pool of its own next to
 * ours (two pools on two cores starve each other, whatever the spin policy), and an element of C
 * gets the same bits at any thread count.
 */
#ifndef G3_KERNELS_GEMM_H
#define G3_KERNELS_GEMM_H

#include <stdint.h>

enum { G3_GEMM_B = 0, G3_GEMM_BT = 1 };

void g3_sgemm(int op_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
              const float *B, int64_t ldb, float *C, int64_t ldc, int nt);

#endif
