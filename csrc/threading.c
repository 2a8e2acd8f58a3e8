/* threading.c — the thread policy: one thread pool, ours (pool.c, behind the OpenMP pragmas of
 * the kernels), sized in one place. Kernels are single-threaded over row ranges; the matmul layer
 * (kernels/matmul.c, kernels/gemm.c), the forward driver and the vision tower open the parallel
 * regions (num_threads clauses).
 *
 * OpenBLAS is held at one thread, through its API, the first time we ask for a count: g3_sgemm
 * calls it once per block from inside our regions. Its own pthread pool next to an OpenMP pool made
 * the two spin against each other on two cores. The extension does not link libgomp: how long
 * an idle thread spins is pool.c's decision, not an environment variable's (GOMP_SPINCOUNT was
 * read only if set before any libgomp loaded). Nothing here reads or writes the environment.
 *
 * fork(): a forked child would inherit the pool's bookkeeping but not its threads. The fork
 * handlers join the workers before every fork and keep the pool locked across it; the child starts
 * without workers and each process starts new ones at its next region. OpenBLAS re-creates its
 * own threads after a fork by itself.
 */
#include "threading.h"

#include <cblas.h>
#include <pthread.h>

static int g3_threads = 0;

void omp_set_num_threads(int n); /* pool.c */

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void)
{
    pthread_atfork(g3_pool_fork_prepare, g3_pool_fork_after, g3_pool_fork_after);
}

void g3_set_threads(int n)
{
    pthread_once(&fork_once, install_fork_handler); /* runs before any parallel region */
    if (n < 1)
        n = g3_num_procs();
    g3_threads = n;
    omp_set_num_threads(n);
    openblas_set_num_threads(1); /* every BLAS call runs inside one of our threads */
}

int g3_get_threads(void)
{
    if (g3_threads < 1)
        g3_set_threads(0);
    return g3_threads;
}
