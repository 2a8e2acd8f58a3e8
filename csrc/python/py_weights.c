/* py_weights.c — binding tensors handed over by the Python loaders to C structs, shared by the
 * text model and the vision tower, by walking the role table (model/roles.h): matrices as
 * (type_id, rows, cols, ndarray of the encoded bytes), vectors as contiguous float32 arrays of the
 * role's rows * cols values. Every array is appended to `keep` so the memory (often a view of a
 * file mapping) lives as long as the object that points into it. Matrix shapes are checked
 * afterwards by g3_model_check / g3_vision_check, which walk the same table. */
#include "py.h"
#include "np.h"

#include <string.h>

#include "model/roles.h"

static int bind_matrix(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
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

static int bind_vector(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
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

static const g3_role *find_role(const g3_role_table *t, const char *key)
{
    for (int j = 0; j < t->n; j++)
        if (!strcmp(t->roles[j].key, key))
            return &t->roles[j];
    return NULL;
}

int g3_py_bind_roles(g3_module_state *ms, PyObject *keep, PyObject *weights,
                     const g3_role_table *t, const int64_t *dims, void *top, void *layers,
                     size_t layer_size, int64_t n_layer)
{
    g3_role_slot s = {.t = t, .top = top, .layers = layers, .layer_size = layer_size,
                      .n_layer = n_layer};
    int more;
    while ((more = g3_role_next(&s)) > 0) {
        const g3_role *r = s.role;
        if (r->kind == G3_ROLE_VECTOR) {
            if (bind_vector(ms, keep, weights, t->what, s.name, dims[r->rows] * dims[r->cols],
                            g3_role_vector(r, s.base)) < 0)
                return -1;
            continue;
        }
        g3_weight *w = g3_role_matrix(r, s.base);
        if (bind_matrix(ms, keep, weights, t->what, s.name, w, r->optional) < 0)
            return -1;
        if (!w->data && r->tie) { /* the tied role is bound before: table order */
            const g3_role *tied = find_role(t, r->tie);
            if (tied && !tied->per_layer && tied->kind == G3_ROLE_MATRIX)
                *w = *g3_role_matrix(tied, top);
        }
    }
    if (more < 0) {
        PyErr_Format(PyExc_ValueError, "%s tensor name too long", t->what);
        return -1;
    }
    return 0;
}
