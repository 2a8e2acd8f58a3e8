/* py_hooks.c — the `hooks=` argument of _core.Model.forward: a plan of interventions
 * (model/hooks.h) built by gemma3/hooks.py, and the way back into Python for callback ops.
 *
 * hooks = (ops, dispatch)
 *   ops: list of (layer, point, kind, col0, ncols, src, scale, pos, indexed) tuples, one
 *        g3_hook_op each: src None or float32 (n_src, ncols); pos None or int64 (n_pos,)
 *   dispatch: None, or dispatch(op_index, layer, point, x, pos0) -> array of x.size float32
 *        values called for G3_HOOK_CALL ops; x is a fresh (T, W) float32 copy of the activation
 *        (so a Python function that keeps it never holds a pointer into the run state), and the
 *        returned values are copied back.
 *
 * The forward runs with the GIL released; a callback takes it back on the forward's thread
 * (the tstate saved in g3_py_hooks), and an exception it raises is fetched there, the pass
 * stops (G3_ERR_INTERRUPTED) and g3_py_hooks_finish restores the exception for the caller.
 */
#include "py.h"
#include "np.h"

#include <string.h>

#include "model/hooks.h"
#include "python/py_hooks.h"

static int call_python(void *ctx, int64_t op, int64_t layer, int point, float *x, int64_t T,
                       int64_t W, int64_t pos0)
{
    g3_py_hooks *ph = ctx;
    PyEval_RestoreThread(ph->ts);
    int rc = -1;
    npy_intp dims[2] = {(npy_intp)T, (npy_intp)W};
    PyObject *arr = PyArray_SimpleNew(2, dims, NPY_FLOAT32), *r = NULL;
    PyArrayObject *back = NULL;
    if (!arr)
        goto done;
    memcpy(PyArray_DATA((PyArrayObject *)arr), x, sizeof(float) * (size_t)(T * W));
    r = PyObject_CallFunction(ph->dispatch, "LLiOL", (long long)op, (long long)layer, point, arr,
                              (long long)pos0);
    if (!r)
        goto done;
    back = (PyArrayObject *)PyArray_FROMANY(r, NPY_FLOAT32, 0, 0, NPY_ARRAY_IN_ARRAY);
    if (!back)
        goto done;
    if (PyArray_SIZE(back) != (npy_intp)(T * W)) {
        PyErr_Format(PyExc_ValueError, "a hook returned %zd values for an activation of %lld",
                     (Py_ssize_t)PyArray_SIZE(back), (long long)(T * W));
        goto done;
    }
    memcpy(x, PyArray_DATA(back), sizeof(float) * (size_t)(T * W));
    rc = 0;
done:
    Py_XDECREF(back);
    Py_XDECREF(r);
    Py_XDECREF(arr);
    if (rc && !ph->exc_type)
        PyErr_Fetch(&ph->exc_type, &ph->exc_value, &ph->exc_tb);
    ph->ts = PyEval_SaveThread();
    return rc;
}

static int parse_op(PyObject *item, Py_ssize_t i, g3_hook_op *o, PyObject *keep)
{
    long long layer, col0, ncols;
    int point, kind, indexed;
    float scale;
    PyObject *src_o, *pos_o;
    if (!PyTuple_Check(item) ||
        !PyArg_ParseTuple(item, "LiiLLOfOp", &layer, &point, &kind, &col0, &ncols, &src_o,
                          &scale, &pos_o, &indexed)) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "hook op %zd must be (layer, point, kind, col0, ncols, src, scale, pos, "
                         "indexed)",
                         i);
        }
        return -1;
    }
    *o = (g3_hook_op){.layer = layer, .point = point, .kind = kind, .col0 = col0, .ncols = ncols,
                      .scale = scale, .indexed = indexed};
    if (src_o != Py_None) {
        PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(src_o, NPY_FLOAT32, 2, 2,
                                                            NPY_ARRAY_IN_ARRAY);
        if (!a || PyList_Append(keep, (PyObject *)a) < 0) {
            Py_XDECREF(a);
            return -1;
        }
        Py_DECREF(a);
        if (PyArray_DIM(a, 1) != ncols) {
            PyErr_Format(PyExc_ValueError, "hook op %zd: source rows have %zd values, not %lld",
                         i, (Py_ssize_t)PyArray_DIM(a, 1), ncols);
            return -1;
        }
        o->src = PyArray_DATA(a);
        o->n_src = PyArray_DIM(a, 0);
    }
    if (pos_o != Py_None) {
        PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(pos_o, NPY_INT64, 1, 1,
                                                            NPY_ARRAY_IN_ARRAY);
        if (!a || PyList_Append(keep, (PyObject *)a) < 0) {
            Py_XDECREF(a);
            return -1;
        }
        Py_DECREF(a);
        o->pos = PyArray_DATA(a);
        o->n_pos = PyArray_DIM(a, 0);
    }
    return 0;
}

int g3_py_hooks_parse(PyObject *spec, const g3_config *c, g3_py_hooks *ph)
{
    memset(ph, 0, sizeof *ph);
    PyObject *ops, *dispatch;
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "O!O", &PyList_Type, &ops, &dispatch)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "hooks must be a tuple (list of ops, dispatch or None)");
        return -1;
    }
    if (dispatch != Py_None && !PyCallable_Check(dispatch)) {
        PyErr_SetString(PyExc_TypeError, "hooks dispatch must be callable or None");
        return -1;
    }
    const Py_ssize_t n = PyList_GET_SIZE(ops);
    ph->keep = PyList_New(0);
    ph->ops = PyMem_Calloc(n ? (size_t)n : 1, sizeof *ph->ops);
    if (!ph->keep || !ph->ops) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_op(PyList_GET_ITEM(ops, i), i, &ph->ops[i], ph->keep) < 0)
            return -1;
    ph->dispatch = Py_NewRef(dispatch);
    ph->h = (g3_hooks){.ops = ph->ops, .n_ops = n,
                       .fn = dispatch != Py_None ? call_python : NULL, .ctx = ph};
    g3_err err = {{0}, 0};
    if (g3_hooks_check(c, &ph->h, &err)) {
        PyErr_SetString(PyExc_ValueError, err.msg);
        return -1;
    }
    return 0;
}

int g3_py_hooks_finish(g3_py_hooks *ph)
{
    if (!ph->exc_type)
        return 0;
    PyErr_Restore(ph->exc_type, ph->exc_value, ph->exc_tb);
    ph->exc_type = ph->exc_value = ph->exc_tb = NULL;
    return -1;
}

void g3_py_hooks_clear(g3_py_hooks *ph)
{
    PyMem_Free(ph->ops);
    Py_XDECREF(ph->keep);
    Py_XDECREF(ph->dispatch);
    Py_XDECREF(ph->exc_type);
    Py_XDECREF(ph->exc_value);
    Py_XDECREF(ph->exc_tb);
    memset(ph, 0, sizeof *ph);
}
