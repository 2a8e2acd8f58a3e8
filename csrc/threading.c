/* threading.c — the thread policy: one thread pool, ours (OpenMP), sized in one place. Kernels
 * are single-threaded over row ranges; the matmul layer (kernels/matmul.c, kernels/gemm.c), the
 * forward driver and the vision tower open the parallel regions (num_threads clauses).
 *
 * OpenBLAS is held at one thread, through its API, the first time we ask for a count: g3_sgemm
 * calls it once per block from inside our regions. Its own pthread pool next to libgomp's made
 * the two spin against each other on two cores; the old cure was an environment variable
 * (GOMP_SPINCOUNT) that only worked if read before any libgomp loaded (import torch first: 3x
 * slower prefill). Nothing here reads or writes the environment.
 *
 * fork(): libgomp keeps a worker pool per thread that opened a parallel region; a forked child
 * inherits the pool's bookkeeping but not its threads, and its first parallel region waits for
 * them forever (a multiprocessing "fork" pool whose parent already ran a model). Before every
 * fork the forking thread's pool is released (omp_pause_resource_all, OpenMP 5.0): the child
 * starts without one and the parent builds a new one at its next region. OpenBLAS re-creates its
 * own threads after a fork by itself.
 */
#include "threading.h"

#include <cblas.h>
#include <omp.h>
#include <pthread.h>

static int g3_threads = 0;

static void release_pool_before_fork(void)
{
    omp_pause_resource_all(omp_pause_soft); /* no-op inside a parallel region or without a pool */
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(release_pool_before_fork, NULL, NULL); }

void g3_set_threads(int n)
{
    pthread_once(&fork_once, install_fork_handler); /* runs before any parallel region */
    if (n < 1)
        n = omp_get_num_procs();
    g3_threads = n;
    openblas_set_num_threads(1); /* every BLAS call runs inside one of our threads */
}

int g3_get_threads(void)
{
    if (g3_threads < 1)
        g3_set_threads(0);
    return g3_threads;
}
