/* py_hooks.h — the parsed `hooks=` argument of _core.Model.forward (see py_hooks.c). */
#ifndef G3_PY_HOOKS_H
#define G3_PY_HOOKS_H

#include "py.h"

#include "model/hooks.h"

typedef struct {
    g3_hooks h;          /* what the forward reads; h.ctx points back here */
    g3_hook_op *ops;     /* (n_ops) PyMem */
    PyObject *keep;      /* the source / position arrays the ops point into */
    PyObject *dispatch;  /* the Python side of callback ops, or None */
    PyThreadState *ts;   /* set by the caller when it releases the GIL around the forward */
    PyObject *exc_type, *exc_value, *exc_tb; /* what a callback raised */
} g3_py_hooks;

/* Parses spec into ph (which the caller clears with g3_py_hooks_clear in any case). */
int g3_py_hooks_parse(PyObject *spec, const g3_config *c, g3_py_hooks *ph);
/* After the forward: -1 with the callback's exception set if one raised, else 0. */
int g3_py_hooks_finish(g3_py_hooks *ph);
void g3_py_hooks_clear(g3_py_hooks *ph);

#endif
