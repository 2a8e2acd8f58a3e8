/* threading.c — the thread policy: one thread count for OpenMP regions (num_threads clauses) and
 * OpenBLAS, set in one place. Kernels are single-threaded over row ranges; the matmul layer
 * (kernels/matmul.c), the forward driver and the vision tower open the parallel regions.
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
    openblas_set_num_threads(n);
}

int g3_get_threads(void)
{
    if (g3_threads < 1)
        g3_set_threads(0);
    return g3_threads;
}
