/* pool.c — gemma3's own thread pool, behind the OpenMP entry points the compiler emits.
 *
 * Our kernels are written with `#pragma omp parallel ...`; gcc turns each region into a call to
 * GOMP_parallel (and the dynamic-schedule loops into GOMP_loop_*). This file implements those
 * entry points (the subset listed below) on a pool of our own, and the extension is linked without
 * libgomp. Why: how long an idle OpenMP thread spins before it sleeps is libgomp's decision, set
 * only by environment variables read once when the library loads (GOMP_SPINCOUNT,
 * OMP_WAIT_POLICY). Its default spins for up to 300,000 pauses (milliseconds); on a machine whose
 * cores are busy with other work, a spinning waiter burns the time slice its preempted teammate
 * needs: 270M pp512 at 2 threads fell from ~140 to 20-36 t/s at load average 8. The cure used to be
 * an environment variable, which depends on import order and touches the process that imports us.
 * Here the policy is ours: a waiter spins for at most G3_SPIN_NS (short enough to leave a
 * preempted teammate its core, long enough that back-to-back regions of a decode step never
 * sleep), then sleeps on a futex.
 *
 * Semantics kept from OpenMP (what our regions rely on):
 *   - GOMP_parallel(fn, data, n, flags): fn runs on n threads, the caller as thread 0, and returns
 *     when all are done; omp_get_thread_num / omp_get_num_threads inside; n == 0 means the
 *     default (omp_set_num_threads / omp_get_max_threads, which threading.c sets).
 *   - A region opened inside a region runs on one thread (no nesting, as libgomp's default
 *     max-active-levels = 1), and so does a region opened while another thread's region holds the
 *     pool (two models used from two Python threads): never a wait on another caller, so no
 *     deadlock with the GIL, and the results are the same bits (every region partitions outputs).
 *   - dynamic/guided loops (chunks handed out in order from a shared counter), barriers, single,
 *     critical and atomic sections.
 * Symbols are hidden: they bind inside _core only, and never interpose another library's OpenMP
 * (torch's libgomp, llama.cpp's) in the same process. An entry point used by new code but missing
 * here fails the import with "undefined symbol", not silently.
 *
 * fork(): the pool's threads would not exist in a child; threading.c's fork handlers join them
 * before the fork (holding the pool across it), and the next region in either process starts
 * new ones.
 */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "threading.h"

#define G3_HIDDEN __attribute__((visibility("hidden")))
#define G3_POOL_MAX 256    /* threads of one region (more are clamped: results do not change) */
#define G3_WS_MAX 64       /* work-sharing constructs (loops, singles) in one region */
#define G3_SPIN_NS 50000   /* spin at most 50 us before sleeping */

/* ---- waiting: spin briefly, then futex ------------------------------------------------------ */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(atomic_uint *a, unsigned v)
{
    syscall(SYS_futex, (unsigned *)a, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *a)
{
    syscall(SYS_futex, (unsigned *)a, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static atomic_int g_sleepers; /* threads inside futex_wait (wakers skip the syscall at 0) */

/* Returns once *a != old. */
static void wait_change(atomic_uint *a, unsigned old)
{
    int64_t t0 = 0;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(a, memory_order_acquire) != old)
            return;
        cpu_relax();
        if ((i & 255) == 0) {
            int64_t t = now_ns();
            if (!t0)
                t0 = t;
            else if (t - t0 > G3_SPIN_NS)
                break;
        }
    }
    atomic_fetch_add(&g_sleepers, 1);
    while (atomic_load(a) == old)
        futex_wait(a, old); /* returns at once if *a already changed: no lost wake-up */
    atomic_fetch_sub(&g_sleepers, 1);
}

/* After changing *a (seq_cst): wake whoever sleeps on it. */
static void wake(atomic_uint *a)
{
    if (atomic_load(&g_sleepers) > 0)
        futex_wake_all(a);
}

/* ---- the team of the running region --------------------------------------------------------- */
typedef struct {
    atomic_uint state; /* 0 free, 1 being set up, 2 ready */
    atomic_long next;
    long end, incr, chunk; /* chunk already multiplied by incr */
    atomic_int single;     /* GOMP_single_start: first arrival wins */
} g3_ws;

typedef struct {
    void (*fn)(void *);
    void *data;
    unsigned n;
    int combined;         /* ws[0] was set up by the caller (a combined parallel loop) */
    unsigned n_ack;       /* every worker of the pool acknowledges every region (members after
                           * running their part): no worker can miss a region or read the next
                           * one's fields, whatever the team sizes */
    atomic_uint done;     /* acknowledgements so far (the caller waits for n_ack) */
    atomic_uint bar_count, bar_gen;
    g3_ws ws[G3_WS_MAX];  /* used in order by every member: the used ones are a prefix */
} g3_team;

typedef struct {
    g3_team *team;
    unsigned tid, ws_next; /* this thread's number; its next work-share index */
    g3_ws *ws;             /* the loop it is in */
} g3_tls;

static _Thread_local g3_tls tls;

static struct {
    pthread_mutex_t lock;   /* held by the thread whose region uses the pool */
    atomic_uint gen;        /* bumped to start a region (and to stop) */
    atomic_int quit;
    unsigned n_workers;
    pthread_t workers[G3_POOL_MAX];
    unsigned gen_at_start[G3_POOL_MAX]; /* pool.gen when worker i was created */
    g3_team team;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static atomic_int icv_threads; /* omp_set_num_threads; 0: every core */

static void run_member(g3_team *t, unsigned tid)
{
    g3_tls saved = tls;
    tls = (g3_tls){t, tid, 0, NULL};
    if (t->combined) { /* GOMP_parallel_loop_*: fn calls GOMP_loop_*_next straight away */
        tls.ws_next = 1;
        tls.ws = &t->ws[0];
    }
    t->fn(t->data);
    tls = saved;
}

static void *worker_main(void *arg)
{
    const unsigned id = (unsigned)(uintptr_t)arg; /* 1 .. */
    unsigned seen = pool.gen_at_start[id];       /* the region that started it is after this */
    for (;;) {
        wait_change(&pool.gen, seen);
        seen = atomic_load(&pool.gen);
        if (atomic_load(&pool.quit))
            return NULL;
        g3_team *t = &pool.team;
        const unsigned n_ack = t->n_ack;
        if (id < t->n)
            run_member(t, id);
        if (atomic_fetch_add(&t->done, 1) + 1 == n_ack)
            wake(&t->done);
    }
}

/* Starts workers up to n - 1 (fewer if the system refuses threads: the region then runs on
 * fewer, with the same results). Called with pool.lock held. */
static unsigned grow(unsigned n)
{
    while (pool.n_workers + 1 < n) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 8u << 20);
        pool.gen_at_start[pool.n_workers + 1] = atomic_load(&pool.gen);
        int rc = pthread_create(&pool.workers[pool.n_workers], &a, worker_main,
                                (void *)(uintptr_t)(pool.n_workers + 1));
        pthread_attr_destroy(&a);
        if (rc)
            break;
        pool.n_workers++;
    }
    return pool.n_workers + 1 < n ? pool.n_workers + 1 : n;
}

static void stop_locked(void)
{
    if (!pool.n_workers)
        return;
    atomic_store(&pool.quit, 1);
    atomic_fetch_add(&pool.gen, 1);
    futex_wake_all(&pool.gen);
    for (unsigned i = 0; i < pool.n_workers; i++)
        pthread_join(pool.workers[i], NULL);
    pool.n_workers = 0;
    atomic_store(&pool.quit, 0);
}

void g3_pool_stop(void)
{
    pthread_mutex_lock(&pool.lock);
    stop_locked();
    pthread_mutex_unlock(&pool.lock);
}

/* pthread_atfork: the pool is held, without threads, across the fork (no region can start
 * between the join and the fork), and released in both processes after it. */
void g3_pool_fork_prepare(void)
{
    pthread_mutex_lock(&pool.lock);
    stop_locked();
}

void g3_pool_fork_after(void) { pthread_mutex_unlock(&pool.lock); }

static unsigned default_threads(void)
{
    int n = atomic_load(&icv_threads);
    return n > 0 ? (unsigned)n : (unsigned)g3_num_procs();
}

static void parallel(void (*fn)(void *), void *data, unsigned n, const g3_ws *first)
{
    if (n == 0)
        n = default_threads();
    if (n > G3_POOL_MAX)
        n = G3_POOL_MAX;
    if (n > 1 && (tls.team || pthread_mutex_trylock(&pool.lock) != 0))
        n = 1; /* nested, or the pool is another caller's: run here, alone */
    if (n > 1)
        n = grow(n);
    g3_team *t;
    g3_team solo;
    if (n > 1) {
        t = &pool.team;
        for (unsigned i = 0; i < G3_WS_MAX && atomic_load(&t->ws[i].state); i++)
            atomic_store(&t->ws[i].state, 0);
    } else {
        t = &solo;
        memset(t, 0, sizeof *t);
    }
    t->fn = fn;
    t->data = data;
    t->n = n;
    t->n_ack = pool.n_workers;
    t->combined = first != NULL;
    atomic_store(&t->done, 0);
    atomic_store(&t->bar_count, 0);
    if (first) { /* a combined parallel loop: the first work share is set up before the start */
        g3_ws *w = &t->ws[0];
        w->end = first->end;
        w->incr = first->incr;
        w->chunk = first->chunk;
        atomic_store(&w->next, atomic_load(&first->next));
        atomic_store(&w->single, 0);
        atomic_store(&w->state, 2);
    }
    if (n > 1) {
        atomic_fetch_add(&pool.gen, 1);
        wake(&pool.gen);
    }
    run_member(t, 0);
    if (n > 1) {
        for (unsigned d; (d = atomic_load(&t->done)) != t->n_ack;)
            wait_change(&t->done, d);
        pthread_mutex_unlock(&pool.lock);
    }
}

/* ---- work sharing ---------------------------------------------------------------------------- */
static g3_ws *ws_enter(void)
{
    g3_team *t = tls.team;
    const unsigned k = tls.ws_next++;
    if (k >= G3_WS_MAX)
        return NULL;
    g3_ws *w = &t->ws[k];
    unsigned expect = 0;
    if (atomic_compare_exchange_strong(&w->state, &expect, 1u))
        return w; /* the caller sets it up and publishes state = 2 */
    while (atomic_load_explicit(&w->state, memory_order_acquire) != 2)
        cpu_relax();
    return w;
}

static bool loop_next(long *istart, long *iend)
{
    g3_ws *w = tls.ws;
    if (!w)
        return false;
    const long s = atomic_fetch_add(&w->next, w->chunk);
    if (w->incr > 0 ? s >= w->end : s <= w->end)
        return false;
    long e = s + w->chunk;
    if (w->incr > 0 ? e > w->end : e < w->end)
        e = w->end;
    *istart = s;
    *iend = e;
    return true;
}

static void ws_setup(g3_ws *w, long start, long end, long incr, long chunk)
{
    if (chunk < 1)
        chunk = 1;
    w->end = ((incr > 0 && start > end) || (incr < 0 && start < end)) ? start : end;
    w->incr = incr;
    w->chunk = chunk * incr;
    atomic_store(&w->next, start);
    atomic_store(&w->single, 0);
}

static bool loop_start(long start, long end, long incr, long chunk, long *istart, long *iend)
{
    if (!tls.team) { /* orphaned loop outside any region: this thread does it all */
        static _Thread_local g3_ws own;
        ws_setup(&own, start, end, incr, end - start > 0 ? end - start : start - end);
        tls.ws = &own;
        bool r = loop_next(istart, iend);
        tls.ws = NULL;
        return r;
    }
    g3_ws *w = ws_enter();
    if (w && atomic_load(&w->state) == 1) {
        ws_setup(w, start, end, incr, chunk);
        atomic_store_explicit(&w->state, 2, memory_order_release);
    }
    tls.ws = w;
    return loop_next(istart, iend);
}

/* ---- the entry points gcc emits (hidden: bound inside _core only) ----------------------------- */
G3_HIDDEN void GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags)
{
    (void)flags;
    parallel(fn, data, n, NULL);
}

G3_HIDDEN void GOMP_barrier(void)
{
    g3_team *t = tls.team;
    if (!t || t->n < 2)
        return;
    const unsigned gen = atomic_load(&t->bar_gen);
    if (atomic_fetch_add(&t->bar_count, 1) + 1 == t->n) {
        atomic_store(&t->bar_count, 0);
        atomic_fetch_add(&t->bar_gen, 1);
        wake(&t->bar_gen);
    } else {
        wait_change(&t->bar_gen, gen);
    }
}

#define G3_LOOP_ENTRIES(kind)                                                                      \
    G3_HIDDEN bool GOMP_loop_##kind##_start(long s, long e, long i, long c, long *is, long *ie)   \
    {                                                                                              \
        return loop_start(s, e, i, c, is, ie);                                                     \
    }                                                                                              \
    G3_HIDDEN bool GOMP_loop_##kind##_next(long *is, long *ie) { return loop_next(is, ie); }      \
    G3_HIDDEN void GOMP_parallel_loop_##kind(void (*fn)(void *), void *data, unsigned n, long s,   \
                                             long e, long i, long c, unsigned flags)               \
    {                                                                                              \
        (void)flags;                                                                               \
        g3_ws w;                                                                                   \
        ws_setup(&w, s, e, i, c);                                                                  \
        parallel(fn, data, n, &w);                                                                 \
    }
/* every schedule hands out chunks in order from the shared counter (guided as dynamic) */
G3_LOOP_ENTRIES(dynamic)
G3_LOOP_ENTRIES(nonmonotonic_dynamic)
G3_LOOP_ENTRIES(guided)
G3_LOOP_ENTRIES(nonmonotonic_guided)

G3_HIDDEN void GOMP_loop_end_nowait(void) { tls.ws = NULL; }

G3_HIDDEN void GOMP_loop_end(void)
{
    tls.ws = NULL;
    GOMP_barrier();
}

G3_HIDDEN bool GOMP_single_start(void)
{
    if (!tls.team || tls.team->n < 2)
        return true;
    g3_ws *w = ws_enter();
    if (w && atomic_load(&w->state) == 1) {
        ws_setup(w, 0, 0, 1, 1);
        atomic_store_explicit(&w->state, 2, memory_order_release);
    }
    return w && atomic_fetch_add(&w->single, 1) == 0;
}

static pthread_mutex_t critical = PTHREAD_MUTEX_INITIALIZER;
G3_HIDDEN void GOMP_critical_start(void) { pthread_mutex_lock(&critical); }
G3_HIDDEN void GOMP_critical_end(void) { pthread_mutex_unlock(&critical); }
G3_HIDDEN void GOMP_atomic_start(void) { pthread_mutex_lock(&critical); }
G3_HIDDEN void GOMP_atomic_end(void) { pthread_mutex_unlock(&critical); }

G3_HIDDEN int omp_get_thread_num(void) { return tls.team ? (int)tls.tid : 0; }
G3_HIDDEN int omp_get_num_threads(void) { return tls.team ? (int)tls.team->n : 1; }
G3_HIDDEN int omp_in_parallel(void) { return tls.team && tls.team->n > 1; }
G3_HIDDEN int omp_get_max_threads(void) { return (int)default_threads(); }
G3_HIDDEN void omp_set_num_threads(int n) { atomic_store(&icv_threads, n > 0 ? n : 0); }
G3_HIDDEN int omp_get_num_procs(void) { return g3_num_procs(); }

G3_HIDDEN double omp_get_wtime(void) { return (double)now_ns() * 1e-9; }

int g3_num_procs(void)
{
    cpu_set_t s;
    if (sched_getaffinity(0, sizeof s, &s) == 0 && CPU_COUNT(&s) > 0)
        return CPU_COUNT(&s);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
