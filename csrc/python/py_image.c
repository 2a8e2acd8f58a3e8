/* py_image.c — image functions of gemma3._core (used by gemma3/image.py):
 *
 *   webp_decode(data, max_pixels=0) -> (h, w, 3|4) uint8   RGBA when the file has alpha;
 *                                                  larger pictures raise before decoding
 *   image_resize(img (h, w, c) uint8, height, width) -> (height, width, c) uint8   Pillow BILINEAR
 *   image_preprocess(img (h, w, 3) uint8, size) -> (3, size, size) float32        resize, x/127.5-1
 *
 * Inputs may be strided views (a crop of a larger image is used in place). The GIL is released
 * while decoding and resampling; the input array reference is held meanwhile.
 */
#include "py.h"
#include "np.h"

#include "vision/image.h"

static PyObject *raise(PyObject *module, g3_status st, const g3_err *err)
{
    return g3_py_raise(g3_py_state(module), st, err, NULL);
}

static PyObject *py_webp_decode(PyObject *module, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "max_pixels", NULL};
    PyObject *arg;
    unsigned long long max_pixels = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|K", kwlist, &arg, &max_pixels))
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    g3_err err = {{0}, 0};
    g3_webp_info info;
    g3_status st;
    PyObject *arr = NULL;
    Py_BEGIN_ALLOW_THREADS st = g3_webp_probe(buf.buf, (size_t)buf.len, max_pixels, &info, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise(module, st, &err);
        goto error;
    }
    int c = info.has_alpha ? 4 : 3;
    npy_intp dims[3] = {info.height, info.width, c};
    arr = PyArray_SimpleNew(3, dims, NPY_UINT8);
    if (!arr)
        goto error;
    uint8_t *out = PyArray_DATA((PyArrayObject *)arr);
    Py_BEGIN_ALLOW_THREADS st = g3_webp_decode(buf.buf, (size_t)buf.len, &info, c, out, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise(module, st, &err);
        goto error;
    }
    PyBuffer_Release(&buf);
    return arr;
error:
    Py_XDECREF(arr);
    PyBuffer_Release(&buf);
    return NULL;
}

/* (h, w, c) uint8 with pixels contiguous within a row (copied otherwise); new reference */
static PyArrayObject *as_image(PyObject *obj, int want_c)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, NPY_UINT8, NPY_ARRAY_ALIGNED);
    if (!a)
        return NULL;
    if (PyArray_NDIM(a) != 3 || PyArray_DIM(a, 0) < 1 || PyArray_DIM(a, 1) < 1 ||
        PyArray_DIM(a, 2) < 1 || PyArray_DIM(a, 2) > 4 ||
        (want_c && PyArray_DIM(a, 2) != want_c)) {
        PyObject *shape = PyObject_GetAttrString((PyObject *)a, "shape");
        if (shape)
            PyErr_Format(PyExc_ValueError,
                         "image must be a non-empty (height, width, %s) uint8 array, got shape %R",
                         want_c == 3 ? "3" : "1..4", shape);
        Py_XDECREF(shape);
        Py_DECREF(a);
        return NULL;
    }
    if (PyArray_DIM(a, 0) > G3_IMAGE_MAX_SIDE || PyArray_DIM(a, 1) > G3_IMAGE_MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image of %zd x %zd pixels is too large (at most %d per side)",
                     (Py_ssize_t)PyArray_DIM(a, 1), (Py_ssize_t)PyArray_DIM(a, 0),
                     G3_IMAGE_MAX_SIDE);
        Py_DECREF(a);
        return NULL;
    }
    npy_intp c = PyArray_DIM(a, 2);
    if (PyArray_STRIDE(a, 2) != 1 || PyArray_STRIDE(a, 1) != c ||
        PyArray_STRIDE(a, 0) < PyArray_DIM(a, 1) * c) {
        PyArrayObject *cc = (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
        Py_DECREF(a);
        a = cc;
    }
    return a;
}

static int parse_side(PyObject *o, int *out, const char *what)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 1 || v > G3_IMAGE_MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "%s must be in 1..%d, got %ld", what, G3_IMAGE_MAX_SIDE, v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static PyObject *py_image_resize(PyObject *module, PyObject *args)
{
    PyObject *obj, *ho, *wo;
    int h, w;
    if (!PyArg_ParseTuple(args, "OOO", &obj, &ho, &wo) || parse_side(ho, &h, "height") < 0 ||
        parse_side(wo, &w, "width") < 0)
        return NULL;
    PyArrayObject *a = as_image(obj, 0);
    if (!a)
        return NULL;
    int c = (int)PyArray_DIM(a, 2);
    npy_intp dims[3] = {h, w, c};
    PyObject *out = PyArray_SimpleNew(3, dims, NPY_UINT8);
    if (!out) {
        Py_DECREF(a);
        return NULL;
    }
    g3_err err = {{0}, 0};
    g3_status st;
    const uint8_t *src = PyArray_DATA(a);
    uint8_t *dst = PyArray_DATA((PyArrayObject *)out);
    int sw = (int)PyArray_DIM(a, 1), sh = (int)PyArray_DIM(a, 0);
    size_t stride = (size_t)PyArray_STRIDE(a, 0);
    Py_BEGIN_ALLOW_THREADS st = g3_image_resize_bilinear_u8(src, sw, sh, stride, c, dst, w, h, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    if (st) {
        Py_DECREF(out);
        return raise(module, st, &err);
    }
    return out;
}

static PyObject *py_image_preprocess(PyObject *module, PyObject *args)
{
    PyObject *obj, *so;
    int size;
    if (!PyArg_ParseTuple(args, "OO", &obj, &so) || parse_side(so, &size, "size") < 0)
        return NULL;
    PyArrayObject *a = as_image(obj, 3);
    if (!a)
        return NULL;
    npy_intp dims[3] = {3, size, size};
    PyObject *out = PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    uint8_t *tmp = PyMem_RawMalloc((size_t)size * (size_t)size * 3);
    if (!out || !tmp) {
        Py_DECREF(a);
        Py_XDECREF(out);
        PyMem_RawFree(tmp);
        return out ? PyErr_NoMemory() : NULL;
    }
    g3_err err = {{0}, 0};
    g3_status st;
    const uint8_t *src = PyArray_DATA(a);
    float *dst = PyArray_DATA((PyArrayObject *)out);
    int sw = (int)PyArray_DIM(a, 1), sh = (int)PyArray_DIM(a, 0);
    size_t stride = (size_t)PyArray_STRIDE(a, 0);
    Py_BEGIN_ALLOW_THREADS st =
        g3_image_resize_bilinear_u8(src, sw, sh, stride, 3, tmp, size, size, &err);
    if (!st)
        g3_image_to_chw_f32(tmp, size, size, dst);
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    PyMem_RawFree(tmp);
    if (st) {
        Py_DECREF(out);
        return raise(module, st, &err);
    }
    return out;
}

PyMethodDef g3_py_image_methods[] = {
    {"webp_decode", (PyCFunction)(void (*)(void))py_webp_decode, METH_VARARGS | METH_KEYWORDS,
     "webp_decode(data, max_pixels=0) -> (h, w, 3|4) uint8 (RGBA when the file has alpha); "
     "pictures over max_pixels (0: 2^28) raise ValueError before decoding"},
    {"image_resize", py_image_resize, METH_VARARGS,
     "image_resize(img (h, w, c) uint8, height, width) -> uint8: Pillow-exact BILINEAR"},
    {"image_preprocess", py_image_preprocess, METH_VARARGS,
     "image_preprocess(img (h, w, 3) uint8, size) -> (3, size, size) float32, x/127.5 - 1"},
    {NULL, NULL, 0, NULL},
};
