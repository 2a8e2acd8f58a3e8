/* py_quant.c — _core.dequantize / quantize / type_info: NumPy access to the block formats of
 * csrc/quant (traits table and reference kernels).
 *
 * Exceptions: an unknown, removed or uncomputable type id raises gemma3.UnsupportedError naming the
 * type; a non-integer type id or non-array x raises TypeError; sizes that do not fit (buffer too
 * small, length not a multiple of the block size, non-finite input to a block format) raise
 * ValueError stating what was expected. The GIL is released around the C loops.
 */
#include "py.h"
#include "np.h"

#include <math.h>

#include "quant/blocks.h"

/* Reads a ggml type id; returns its traits, or NULL with an exception set (TypeError for a
 * non-integer, UnsupportedError for ids outside 0..G3_TYPE_COUNT-1; removed ids are returned with
 * known == 0 so type_info can describe them). */
static const g3_type_traits *parse_type(g3_module_state *st, PyObject *obj, int *type_out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "type_id must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || v < 0 || v >= G3_TYPE_COUNT) {
        g3_err err;
        if (overflow)
            g3_fail(&err, G3_ERR_UNSUPPORTED, "unknown ggml type id (out of range; valid ids are "
                    "0..%d)", G3_TYPE_COUNT - 1);
        else
            g3_fail(&err, G3_ERR_UNSUPPORTED, "unknown ggml type id %ld (valid ids are 0..%d)", v,
                    G3_TYPE_COUNT - 1);
        g3_py_raise(st, G3_ERR_UNSUPPORTED, &err, NULL);
        return NULL;
    }
    *type_out = (int)v;
    return g3_type_get((int)v);
}

/* As parse_type, and also fails (UnsupportedError) for removed ids and when the type has no
 * kernel for the direction asked (quantize: from_float, else to_float). */
static const g3_type_traits *parse_usable_type(g3_module_state *st, PyObject *obj, int quantize)
{
    int type = -1;
    const g3_type_traits *t = parse_type(st, obj, &type);
    if (!t)
        return NULL;
    g3_err err;
    if (!t->known) {
        g3_fail(&err, G3_ERR_UNSUPPORTED, "ggml type %d (%s) was removed from the format", type,
                t->name);
        g3_py_raise(st, G3_ERR_UNSUPPORTED, &err, NULL);
        return NULL;
    }
    if (quantize ? !t->from_float : !t->to_float) {
        g3_fail(&err, G3_ERR_UNSUPPORTED, "%s to/from ggml type %d (%s) is not implemented",
                quantize ? "quantization" : "dequantization", type, t->name);
        g3_py_raise(st, G3_ERR_UNSUPPORTED, &err, NULL);
        return NULL;
    }
    return t;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(type_id, data, n) -> ndarray\n--\n\n"
"Decode the first n elements of a row of ggml type `type_id` held in `data` (any C-contiguous\n"
"buffer: bytes, bytearray, memoryview, uint8 ndarray; extra trailing bytes are ignored).\n"
"Returns y: (n,) float32. Raises gemma3.UnsupportedError for unknown/removed types or types we\n"
"cannot decode; ValueError if n < 0, n is not a multiple of the block size, or data is too short.");

static PyObject *py_dequantize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "data", "n", NULL};
    g3_module_state *st = g3_py_state(self);
    PyObject *type_obj, *data, *out = NULL;
    Py_ssize_t n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn:dequantize", kwlist, &type_obj, &data, &n))
        return NULL;
    const g3_type_traits *t = parse_usable_type(st, type_obj, 0);
    if (!t)
        return NULL;
    if (n < 0)
        return PyErr_Format(PyExc_ValueError, "n must be >= 0, got %zd", n);
    if (n % t->blck != 0)
        return PyErr_Format(PyExc_ValueError,
                            "n=%zd is not a multiple of the %s block size %lld (expected a multiple "
                            "of %lld)", n, t->name, (long long)t->blck, (long long)t->blck);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const size_t need = (size_t)(n / t->blck) * t->type_size;
    if ((size_t)view.len < need) {
        PyErr_Format(PyExc_ValueError,
                     "data too small: %s of n=%zd needs %zu bytes, got %zd bytes", t->name, n,
                     need, view.len);
        goto error;
    }
    npy_intp dims[1] = {n};
    out = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!out)
        goto error;
    float *dst = (float *)PyArray_DATA((PyArrayObject *)out);
    Py_BEGIN_ALLOW_THREADS
    t->to_float(view.buf, dst, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return out;
error:
    PyBuffer_Release(&view);
    Py_XDECREF(out);
    return NULL;
}

PyDoc_STRVAR(quantize_doc,
"quantize(type_id, x) -> ndarray\n--\n\n"
"Encode x: (n,) float32, C-contiguous, as a row of ggml type `type_id`, n a multiple of the\n"
"block size. Returns (row_size,) uint8. Raises TypeError if x is not a float32 ndarray;\n"
"ValueError for a wrong shape or layout, a length that is not a multiple of the block size, or\n"
"non-finite values for block formats; gemma3.UnsupportedError for types we cannot encode.");

static PyObject *py_quantize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "x", NULL};
    g3_module_state *st = g3_py_state(self);
    PyObject *type_obj, *xobj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:quantize", kwlist, &type_obj, &xobj))
        return NULL;
    const g3_type_traits *t = parse_usable_type(st, type_obj, 1);
    if (!t)
        return NULL;
    if (!PyArray_Check(xobj))
        return PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray of float32, not %.100s",
                            Py_TYPE(xobj)->tp_name);
    PyArrayObject *x = (PyArrayObject *)xobj;
    if (PyArray_TYPE(x) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(x))
        return PyErr_Format(PyExc_TypeError, "x must have dtype float32 (native byte order)");
    if (PyArray_NDIM(x) != 1)
        return PyErr_Format(PyExc_ValueError, "x must be 1-D, got %d dimensions", PyArray_NDIM(x));
    if (!PyArray_IS_C_CONTIGUOUS(x) || !PyArray_ISALIGNED(x))
        return PyErr_Format(PyExc_ValueError, "x must be C-contiguous and aligned");
    const npy_intp n = PyArray_DIM(x, 0);
    if (n % t->blck != 0)
        return PyErr_Format(PyExc_ValueError,
                            "len(x)=%zd is not a multiple of the %s block size %lld",
                            (Py_ssize_t)n, t->name, (long long)t->blck);
    const float *src = (const float *)PyArray_DATA(x);
    if (t->blck > 1) { /* block scales are computed from max/min: they need finite input */
        npy_intp bad = -1;
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp i = 0; i < n; i++) {
            if (!isfinite(src[i])) {
                bad = i;
                break;
            }
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0)
            return PyErr_Format(PyExc_ValueError, "x[%zd] is %s; %s needs finite input",
                                (Py_ssize_t)bad, isnan(src[bad]) ? "nan" : "inf", t->name);
    }
    npy_intp dims[1] = {(npy_intp)((size_t)(n / t->blck) * t->type_size)};
    PyObject *out = PyArray_ZEROS(1, dims, NPY_UINT8, 0);
    if (!out)
        return NULL;
    void *dst = PyArray_DATA((PyArrayObject *)out);
    Py_INCREF(x); /* keep x alive and unchanged in shape while the GIL is released */
    Py_BEGIN_ALLOW_THREADS
    t->from_float(src, dst, n);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    return out;
}

PyDoc_STRVAR(type_info_doc,
"type_info(type_id) -> (name, known, blck, type_size, can_dequantize, can_quantize)\n--\n\n"
"Facts about a ggml type id 0..42: known is False for ids removed from the format (blck and\n"
"type_size are then 0). Raises gemma3.UnsupportedError for ids outside 0..42.");

static PyObject *py_type_info(PyObject *self, PyObject *arg)
{
    int type = -1;
    const g3_type_traits *t = parse_type(g3_py_state(self), arg, &type);
    if (!t)
        return NULL;
    return Py_BuildValue("(sOLnOO)", t->name, t->known ? Py_True : Py_False, (long long)t->blck,
                         (Py_ssize_t)t->type_size, t->to_float ? Py_True : Py_False,
                         t->from_float ? Py_True : Py_False);
}

PyMethodDef g3_py_quant_methods[] = {
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_VARARGS | METH_KEYWORDS,
     dequantize_doc},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_VARARGS | METH_KEYWORDS,
     quantize_doc},
    {"type_info", py_type_info, METH_O, type_info_doc},
    {NULL, NULL, 0, NULL},
};
