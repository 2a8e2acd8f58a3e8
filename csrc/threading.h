/* threading.h — the thread policy: one pool, ours; OpenBLAS held at one thread (threading.c). */
#ifndef G3_THREADING_H
#define G3_THREADING_H

void g3_set_threads(int n); /* n < 1: every core */
int g3_get_threads(void);
int g3_num_procs(void);  /* CPUs this process may run on (affinity mask) */
/* pool.c: join the pool's threads (the next region starts new ones); the fork handlers */
void g3_pool_stop(void);
void g3_pool_fork_prepare(void);
void g3_pool_fork_after(void);

#endif
