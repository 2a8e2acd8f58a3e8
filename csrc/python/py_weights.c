/* py_weights.c — binding tensors handed over by the Python loaders to C structs, shared by the
 * text model and the vision tower: matrices as (type_id, rows, cols, ndarray of the encoded
 * bytes), vectors as contiguous float32 arrays. Every array is appended to `keep` so the memory
 * (often a view of a file mapping) lives as long as the object that points into it. */
#include "py.h"
#include "np.h"

#include "model/model.h"

int g3_py_bind_matrix(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
                      const char *name, g3_weight *w, int optional)
{
    PyObject *item = PyDict_GetItemString(weights, name);
    if (!item) {
        if (optional)
            return 0;
        PyErr_Format(ms->FormatError, "missing %s tensor '%s'", what, name);
        return -1;
    }
    int type;
    long long rows, cols;
    PyObject *arr;
    if (!PyArg_ParseTuple(item, "iLLO!;weights entries are (type_id, rows, cols, ndarray)", &type,
                          &rows, &cols, &PyArray_Type, &arr))
        return -1;
    PyArrayObject *a = (PyArrayObject *)arr;
    const g3_type_traits *tt = g3_type_get(type);
    if (!tt->known || !tt->to_float || rows < 1 || cols < 1) {
        PyErr_Format(ms->UnsupportedError,
                     "%s tensor '%s': unsupported type %s (id %d) or shape (%lld, %lld)", what,
                     name, tt->name, type, rows, cols);
        return -1;
    }
    size_t rb = g3_row_size(type, cols);
    if (!rb || !PyArray_IS_C_CONTIGUOUS(a) || (size_t)PyArray_NBYTES(a) != rb * (size_t)rows) {
        PyErr_Format(ms->FormatError,
                     "%s tensor '%s': %zd bytes given, (%lld, %lld) of %s needs %zu contiguous "
                     "bytes",
                     what, name, (Py_ssize_t)PyArray_NBYTES(a), rows, cols, tt->name,
                     rb * (size_t)rows);
        return -1;
    }
    if (PyList_Append(keep, arr) < 0)
        return -1;
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = rb;
    w->data = PyArray_DATA(a);
    return 0;
}

int g3_py_bind_vector(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
                      const char *name, int64_t n, const float **out)
{
    PyObject *arr = PyDict_GetItemString(weights, name);
    if (!arr) {
        PyErr_Format(ms->FormatError, "missing %s tensor '%s'", what, name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)arr;
    if (!PyArray_Check(arr) || PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(a) ||
        PyArray_SIZE(a) != n) {
        PyErr_Format(ms->FormatError,
                     "%s tensor '%s' must be a contiguous float32 array of %lld values", what,
                     name, (long long)n);
        return -1;
    }
    if (PyList_Append(keep, arr) < 0)
        return -1;
    *out = PyArray_DATA(a);
    return 0;
}
