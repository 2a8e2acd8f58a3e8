/* threading.h — the thread policy: one pool, ours; OpenBLAS held at one thread (threading.c). */
#ifndef G3_THREADING_H
#define G3_THREADING_H

void g3_set_threads(int n); /* n < 1: every core */
int g3_get_threads(void);

#endif
