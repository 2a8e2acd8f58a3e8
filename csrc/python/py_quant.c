/* py_quant.c — _core.dequantize / quantize / type_info / dot_f32 / matvec / isa: NumPy access to the
 * block formats of csrc/quant (traits table, reference and ISA kernels).
 *
 * Exceptions: an unknown, removed or uncomputable type id raises gemma3.UnsupportedError naming the
 * type; a non-integer type id or non-array x raises TypeError; sizes that do not fit (buffer too
 * small, length not a multiple of the block size, non-finite input to a block format) raise
 * ValueError stating what was expected. The GIL is released around the C loops.
 */
#include "py.h"
#include "np.h"

#include <math.h>
#include <string.h>

#include "kernels/matmul.h"
#include "quant/blocks.h"
#include "quant/packed.h"

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

/* The traits of the same type as t at an explicit ISA level: "auto" keeps t (the selected kernels),
 * "ref"/"scalar", "avx2", "avx512" pick that level's table. NULL with ValueError for an unknown name
 * or a level this CPU cannot run. */
static const g3_type_traits *kernels_for_isa(const g3_type_traits *t, PyObject *type_obj,
                                             const char *isa)
{
    int level;
    if (strcmp(isa, "auto") == 0)
        return t;
    if (strcmp(isa, "ref") == 0 || strcmp(isa, "scalar") == 0)
        level = G3_ISA_SCALAR;
    else if (strcmp(isa, "avx2") == 0)
        level = G3_ISA_AVX2;
    else if (strcmp(isa, "avx512") == 0)
        level = G3_ISA_AVX512;
    else {
        PyErr_Format(PyExc_ValueError,
                     "isa must be 'auto', 'ref', 'scalar', 'avx2' or 'avx512', got '%.50s'", isa);
        return NULL;
    }
    const g3_type_traits *lt = g3_type_get_isa((int)PyLong_AsLong(type_obj), level);
    if (!lt)
        PyErr_Format(PyExc_ValueError, "isa '%s' is not supported by this CPU (best: %s)", isa,
                     g3_isa_name(g3_isa_cpu()));
    return lt;
}

/* x as a 1-D, C-contiguous, aligned float32 ndarray; NULL with TypeError/ValueError otherwise. */
static const float *parse_x(PyObject *xobj, npy_intp *n)
{
    if (!PyArray_Check(xobj)) {
        PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray of float32, not %.100s",
                     Py_TYPE(xobj)->tp_name);
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)xobj;
    if (PyArray_TYPE(x) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(x)) {
        PyErr_Format(PyExc_TypeError, "x must have dtype float32 (native byte order)");
        return NULL;
    }
    if (PyArray_NDIM(x) != 1 || !PyArray_IS_C_CONTIGUOUS(x) || !PyArray_ISALIGNED(x)) {
        PyErr_Format(PyExc_ValueError, "x must be 1-D, C-contiguous and aligned");
        return NULL;
    }
    *n = PyArray_DIM(x, 0);
    return (const float *)PyArray_DATA(x);
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(type_id, data, n, isa='auto') -> ndarray\n--\n\n"
"Decode the first n elements of a row of ggml type `type_id` held in `data` (any C-contiguous\n"
"buffer: bytes, bytearray, memoryview, uint8 ndarray; extra trailing bytes are ignored).\n"
"Returns y: (n,) float32. Raises gemma3.UnsupportedError for unknown/removed types or types we\n"
"cannot decode; ValueError if n < 0, n is not a multiple of the block size, or data is too short.\n"
"isa: 'auto' (the kernels selected at start-up), or 'ref'/'scalar', 'avx2', 'avx512' to run that\n"
"level's kernel (ValueError if this CPU lacks it).");

static PyObject *py_dequantize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "data", "n", "isa", NULL};
    g3_module_state *st = g3_py_state(self);
    PyObject *type_obj, *data, *out = NULL;
    Py_ssize_t n;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn|s:dequantize", kwlist, &type_obj, &data, &n,
                                     &isa))
        return NULL;
    const g3_type_traits *t = parse_usable_type(st, type_obj, 0);
    if (!t || !(t = kernels_for_isa(t, type_obj, isa)))
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

PyDoc_STRVAR(dot_f32_doc,
"dot_f32(type_id, w, x, isa='auto') -> float\n--\n\n"
"Fused dequantize-and-dot of one weight row: sum_i dequant(w)[i] * x[i] in float32.\n"
"w: C-contiguous buffer (e.g. uint8 ndarray) holding at least one row of len(x) elements of\n"
"type_id; x: (n,) float32, n a multiple of the block size. isa as for dequantize. Raises\n"
"gemma3.UnsupportedError for types without a dot kernel, ValueError for bad sizes or an ISA\n"
"this CPU lacks.");

/* Shared argument checks of dot_f32 and matvec: type with a dot kernel at the asked ISA, x, and a
 * buffer of at least rows rows of len(x) elements. On success the view must be released. */
static const g3_type_traits *parse_dot_args(g3_module_state *st, PyObject *type_obj,
                                            PyObject *wobj, PyObject *xobj, const char *isa,
                                            Py_ssize_t rows, Py_buffer *view, const float **x,
                                            npy_intp *n)
{
    const g3_type_traits *t = parse_usable_type(st, type_obj, 0);
    if (!t || !(t = kernels_for_isa(t, type_obj, isa)))
        return NULL;
    if (!t->dot_f32) {
        g3_err err;
        g3_fail(&err, G3_ERR_UNSUPPORTED, "no dot_f32 kernel for ggml type %s", t->name);
        g3_py_raise(st, G3_ERR_UNSUPPORTED, &err, NULL);
        return NULL;
    }
    if (!(*x = parse_x(xobj, n)))
        return NULL;
    if (*n % t->blck != 0) {
        PyErr_Format(PyExc_ValueError, "len(x)=%zd is not a multiple of the %s block size %lld",
                     (Py_ssize_t)*n, t->name, (long long)t->blck);
        return NULL;
    }
    if (PyObject_GetBuffer(wobj, view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const size_t row = (size_t)(*n / t->blck) * t->type_size;
    if (rows > 0 && row > (size_t)PY_SSIZE_T_MAX / (size_t)rows) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "rows * row size overflows");
        return NULL;
    }
    if ((size_t)view->len < row * (size_t)rows) {
        PyErr_Format(PyExc_ValueError, "w too small: %zd rows of %s x %zd need %zu bytes, got %zd",
                     rows, t->name, (Py_ssize_t)*n, row * (size_t)rows, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    return t;
}

static PyObject *py_dot_f32(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "w", "x", "isa", NULL};
    PyObject *type_obj, *wobj, *xobj;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|s:dot_f32", kwlist, &type_obj, &wobj, &xobj,
                                     &isa))
        return NULL;
    Py_buffer view;
    const float *x;
    npy_intp n;
    const g3_type_traits *t =
        parse_dot_args(g3_py_state(self), type_obj, wobj, xobj, isa, 1, &view, &x, &n);
    if (!t)
        return NULL;
    float r;
    Py_BEGIN_ALLOW_THREADS
    r = t->dot_f32(view.buf, x, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyFloat_FromDouble((double)r);
}

PyDoc_STRVAR(matvec_doc,
"matvec(type_id, w, rows, cols, x, isa='auto') -> ndarray\n--\n\n"
"y = W @ x for W: (rows, cols) of type_id stored row after row in w, x: (cols,) float32;\n"
"returns y: (rows,) float32, one dot_f32 per row on one thread (GIL released). For tests and\n"
"benchmarks of the kernels; the model uses the threaded matmul. Errors as for dot_f32.");

static PyObject *py_matvec(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "w", "rows", "cols", "x", "isa", NULL};
    PyObject *type_obj, *wobj, *xobj;
    Py_ssize_t rows, cols;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnO|s:matvec", kwlist, &type_obj, &wobj, &rows,
                                     &cols, &xobj, &isa))
        return NULL;
    if (rows < 0)
        return PyErr_Format(PyExc_ValueError, "rows must be >= 0, got %zd", rows);
    Py_buffer view;
    const float *x;
    npy_intp n;
    const g3_type_traits *t =
        parse_dot_args(g3_py_state(self), type_obj, wobj, xobj, isa, rows, &view, &x, &n);
    if (!t)
        return NULL;
    if (n != cols) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "len(x)=%zd does not match cols=%zd", (Py_ssize_t)n,
                            cols);
    }
    npy_intp dims[1] = {rows};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!out) {
        PyBuffer_Release(&view);
        return NULL;
    }
    float *y = (float *)PyArray_DATA((PyArrayObject *)out);
    const size_t row = (size_t)(n / t->blck) * t->type_size;
    const uint8_t *w = view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
        y[r] = t->dot_f32(w + (size_t)r * row, x, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(packed_matvec_doc,
"packed_matvec(type_id, w, rows, cols, x, repeat=1) -> ndarray\n--\n\n"
"y = W @ x through the decode path: W repacked into 16-row groups (quant/packed.h) and multiplied\n"
"with x quantized to 24-bit integers per 32-block (AVX-512 VNNI). W as for matvec, x: (cols,)\n"
"float32. Raises UnsupportedError where the CPU or the type has no packed kernel\n"
"(packed_supported(type_id) tells). repeat runs the product (not the packing) that many times,\n"
"for benchmarks. For tests and benchmarks; the model packs at load.");

static PyObject *py_packed_matvec(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "w", "rows", "cols", "x", "repeat", NULL};
    PyObject *type_obj, *wobj, *xobj;
    Py_ssize_t rows, cols, repeat = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnO|n:packed_matvec", kwlist, &type_obj,
                                     &wobj, &rows, &cols, &xobj, &repeat))
        return NULL;
    if (repeat < 1)
        return PyErr_Format(PyExc_ValueError, "repeat must be >= 1, got %zd", repeat);
    if (rows < 1)
        return PyErr_Format(PyExc_ValueError, "rows must be >= 1, got %zd", rows);
    g3_module_state *ms = g3_py_state(self);
    Py_buffer view;
    const float *x;
    npy_intp n;
    const g3_type_traits *t = parse_dot_args(ms, type_obj, wobj, xobj, "auto", rows, &view, &x, &n);
    if (!t)
        return NULL;
    int type = -1;
    if (!parse_type(ms, type_obj, &type)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (n != cols || !g3_pack_supported(type)) {
        PyBuffer_Release(&view);
        if (n != cols)
            return PyErr_Format(PyExc_ValueError, "len(x)=%zd does not match cols=%zd",
                                (Py_ssize_t)n, cols);
        return PyErr_Format(ms->UnsupportedError, "no packed kernel for %s on this CPU", t->name);
    }
    npy_intp dims[1] = {rows};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    void *xbuf = malloc(g3_xq_bytes(n));
    g3_packed *P = NULL;
    g3_err err = {{0}, 0};
    g3_status st = G3_OK;
    if (!out || !xbuf) {
        PyBuffer_Release(&view);
        free(xbuf);
        Py_XDECREF(out);
        return out ? PyErr_NoMemory() : NULL;
    }
    float *y = (float *)PyArray_DATA((PyArrayObject *)out);
    Py_BEGIN_ALLOW_THREADS
    st = g3_pack(type, view.buf, rows, n, (size_t)(n / t->blck) * t->type_size, 1, 0, &P,
                 &err);
    if (!st) {
        g3_xq xq;
        g3_xq_init(&xq, n, xbuf);
        for (Py_ssize_t i = 0; i < repeat; i++) {
            g3_xq_prepare(&xq, x);
            g3_packed_matvec(P, &xq, 0, P->groups, y);
        }
    }
    Py_END_ALLOW_THREADS
    g3_packed_free(P);
    free(xbuf);
    PyBuffer_Release(&view);
    if (st) {
        Py_DECREF(out);
        return g3_py_raise(ms, st, &err, NULL);
    }
    return out;
}

/* The inputs of packed_gemm / packed_argmax: a packable type, w holding `rows` rows of `cols`
 * values and x a (T, cols) float32 matrix. On success *view holds w (release it). */
typedef struct {
    int type;
    const g3_type_traits *t;
    Py_buffer view;
    size_t row;
    npy_intp T;
    const float *x;
} packed_inputs;

static int parse_packed_inputs(g3_module_state *ms, PyObject *type_obj, PyObject *wobj,
                               Py_ssize_t rows, Py_ssize_t cols, PyObject *xobj, packed_inputs *in)
{
    in->type = -1;
    const g3_type_traits *t = in->t = parse_usable_type(ms, type_obj, 0);
    if (!t || !parse_type(ms, type_obj, &in->type))
        return -1;
    if (rows < 1 || cols < 1) {
        PyErr_Format(PyExc_ValueError, "rows and cols must be >= 1, got %zd, %zd", rows, cols);
        return -1;
    }
    if (!g3_pack_supported(in->type)) {
        PyErr_Format(ms->UnsupportedError, "no packed kernel for %s on this CPU", t->name);
        return -1;
    }
    if (cols % t->blck) {
        PyErr_Format(PyExc_ValueError, "cols=%zd is not a multiple of the %s block size %lld", cols,
                     t->name, (long long)t->blck);
        return -1;
    }
    if (!PyArray_Check(xobj) || PyArray_TYPE((PyArrayObject *)xobj) != NPY_FLOAT32 ||
        !PyArray_ISNOTSWAPPED((PyArrayObject *)xobj)) {
        PyErr_SetString(PyExc_TypeError, "x must be a numpy.ndarray of float32 (native order)");
        return -1;
    }
    PyArrayObject *xa = (PyArrayObject *)xobj;
    if (PyArray_NDIM(xa) != 2 || PyArray_DIM(xa, 1) != cols || PyArray_DIM(xa, 0) < 1 ||
        PyArray_DIM(xa, 0) > INT32_MAX || !PyArray_IS_C_CONTIGUOUS(xa) || !PyArray_ISALIGNED(xa)) {
        PyErr_Format(PyExc_ValueError, "x must be (T >= 1, cols=%zd), C-contiguous and aligned",
                     cols);
        return -1;
    }
    in->T = PyArray_DIM(xa, 0);
    in->x = (const float *)PyArray_DATA(xa);
    in->row = (size_t)(cols / t->blck) * t->type_size;
    if (PyObject_GetBuffer(wobj, &in->view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if ((size_t)rows > (size_t)PY_SSIZE_T_MAX / in->row ||
        (size_t)in->view.len < in->row * (size_t)rows) {
        PyBuffer_Release(&in->view);
        PyErr_Format(PyExc_ValueError, "w too small: %zd rows of %s x %zd need %zu bytes", rows,
                     t->name, cols, in->row * (size_t)rows);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(packed_gemm_doc,
"packed_gemm(type_id, w, rows, cols, x, mode=3, repeat=1) -> ndarray\n--\n\n"
"Y = X @ W^T through the prefill path: W repacked into 16-row groups (quant/packed.h), X (T, cols)\n"
"float32 quantized per token and 32-block (mode 3: 24-bit, 2: 16-bit, 1: 8-bit) and multiplied 8 tokens at a\n"
"time (g3_packed_gemm). Returns (T, rows) float32. Raises UnsupportedError where the CPU or the\n"
"type has no packed kernel. repeat runs the product (not the packing) that many times, for\n"
"benchmarks. For tests and benchmarks; the model packs at load.");

static PyObject *py_packed_gemm(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "w", "rows", "cols", "x", "mode", "repeat", NULL};
    PyObject *type_obj, *wobj, *xobj;
    Py_ssize_t rows, cols, repeat = 1;
    int mode = G3_PREFILL_EXACT;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnO|in:packed_gemm", kwlist, &type_obj, &wobj,
                                     &rows, &cols, &xobj, &mode, &repeat))
        return NULL;
    if (repeat < 1)
        return PyErr_Format(PyExc_ValueError, "repeat must be >= 1, got %zd", repeat);
    if (mode != G3_PREFILL_EXACT && mode != G3_PREFILL_16BIT && mode != G3_PREFILL_8BIT)
        return PyErr_Format(PyExc_ValueError, "mode must be 3 (24-bit), 2 (16-bit) or 1 (8-bit), got %d",
                            mode);
    g3_module_state *ms = g3_py_state(self);
    packed_inputs in;
    if (parse_packed_inputs(ms, type_obj, wobj, rows, cols, xobj, &in) < 0)
        return NULL;
    const npy_intp T = in.T;
    const float *x = in.x;
    const size_t row = in.row;
    const int type = in.type;
    npy_intp dims[2] = {T, rows};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    const size_t xb = g3_xq_bytes(cols);
    void *xbuf = malloc((xb + sizeof(g3_xq)) * (size_t)T);
    if (!out || !xbuf) {
        PyBuffer_Release(&in.view);
        free(xbuf);
        Py_XDECREF(out);
        return out ? PyErr_NoMemory() : NULL;
    }
    float *y = (float *)PyArray_DATA((PyArrayObject *)out);
    g3_packed *P = NULL;
    g3_err err = {{0}, 0};
    g3_status st = G3_OK;
    Py_BEGIN_ALLOW_THREADS
    st = g3_pack(type, in.view.buf, rows, cols, row, 1, 0, &P, &err);
    if (!st) {
        g3_xq *xq = xbuf;
        for (npy_intp i = 0; i < T; i++)
            g3_xq_init(&xq[i], cols, (uint8_t *)xbuf + sizeof(g3_xq) * (size_t)T + xb * (size_t)i);
        for (Py_ssize_t r = 0; r < repeat; r++) {
            for (npy_intp i = 0; i < T; i++)
                g3_xq_prepare_prefill(&xq[i], x + i * cols, mode);
            g3_packed_gemm(P, xq, (int)T, 0, P->groups, y, mode);
        }
    }
    Py_END_ALLOW_THREADS
    g3_packed_free(P);
    free(xbuf);
    PyBuffer_Release(&in.view);
    if (st) {
        Py_DECREF(out);
        return g3_py_raise(ms, st, &err, NULL);
    }
    return out;
}

PyDoc_STRVAR(packed_argmax_doc,
"packed_argmax(type_id, w, rows, cols, x) -> (ids, exact, logits)\n--\n\n"
"The greedy arg-max of each row of X @ W^T through g3_matmul_argmax: W repacked with its row\n"
"bounds, X (T, cols) float32. ids: (T,) int32; exact: the (row, 16-row group) pairs computed\n"
"exactly, -1 if the full product was taken; logits: g3_matmul's full (T, rows) product, the\n"
"reference the ids must match. For tests; the model packs its LM head at load.");

static PyObject *py_packed_argmax(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"type_id", "w", "rows", "cols", "x", NULL};
    PyObject *type_obj, *wobj, *xobj;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnO:packed_argmax", kwlist, &type_obj, &wobj,
                                     &rows, &cols, &xobj))
        return NULL;
    g3_module_state *ms = g3_py_state(self);
    packed_inputs in;
    if (parse_packed_inputs(ms, type_obj, wobj, rows, cols, xobj, &in) < 0)
        return NULL;
    npy_intp dims[2] = {in.T, rows};
    PyObject *ids = PyArray_SimpleNew(1, dims, NPY_INT32);
    PyObject *full = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    float *scratch = malloc(sizeof(float) * (size_t)in.T * (size_t)rows);
    if (!ids || !full || !scratch) {
        PyBuffer_Release(&in.view);
        free(scratch);
        Py_XDECREF(ids);
        Py_XDECREF(full);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    g3_weight W = {.type = in.type, .rows = rows, .cols = cols, .row_bytes = in.row,
                   .data = in.view.buf};
    g3_matmul_ws ws = {0};
    g3_packed *P = NULL;
    g3_err err = {{0}, 0};
    int64_t exact = -1;
    g3_status st;
    Py_BEGIN_ALLOW_THREADS
    g3_matmul_ws_need(&ws, &W, 2 * in.T, g3_get_threads()); /* room for both quantizations */
    st = g3_matmul_ws_alloc(&ws, &err);
    if (!st)
        st = g3_pack(in.type, in.view.buf, rows, cols, in.row, 1, 1, &P, &err);
    if (!st) {
        W.packed = P;
        st = g3_matmul_argmax(&W, in.x, in.T, PyArray_DATA((PyArrayObject *)ids), scratch, &exact,
                              &ws, &err);
    }
    if (!st)
        st = g3_matmul(&W, in.x, in.T, PyArray_DATA((PyArrayObject *)full), &ws, &err);
    Py_END_ALLOW_THREADS
    g3_packed_free(P);
    g3_matmul_ws_free(&ws);
    free(scratch);
    PyBuffer_Release(&in.view);
    if (st) {
        Py_DECREF(ids);
        Py_DECREF(full);
        return g3_py_raise(ms, st, &err, NULL);
    }
    return Py_BuildValue("(NLN)", ids, (long long)exact, full);
}

static PyObject *py_packed_supported(PyObject *self, PyObject *arg)
{
    long type = PyLong_AsLong(arg);
    if (type == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(type >= 0 && type < G3_TYPE_COUNT && g3_pack_supported((int)type));
}

PyDoc_STRVAR(isa_doc,
"isa() -> dict\n--\n\n"
"Kernel selection, as the dispatcher (kernels/dispatch.c) made it: {'cpu': best ISA this CPU runs,\n"
"'selected': the level in use (lowered by the G3_ISA environment variable, read once), 'env':\n"
"G3_ISA or None, 'to_float': {type: isa}, 'dot_f32': {type: isa}, 'kernels': {float kernel: isa}\n"
"(dot, axpy, expsum, softmax, geglu, gelu_bias, rmsnorm, layernorm, rope), 'packed': 'avx512vnni'\n"
"or 'off'} with ISA names 'scalar', 'avx2', 'avx512'.");

static PyObject *py_isa(PyObject *self, PyObject *unused)
{
    PyObject *d = NULL, *tf = NULL, *dot = NULL, *fk = NULL;
    const char *env = g3_isa_env();
    if (!(tf = PyDict_New()) || !(dot = PyDict_New()) || !(fk = PyDict_New()))
        goto error;
    const char *names[32];
    int isa[32];
    const int nk = g3_float_kernels_report(names, isa, 32);
    for (int i = 0; i < nk; i++) {
        PyObject *v = PyUnicode_FromString(g3_isa_name(isa[i]));
        if (!v || PyDict_SetItemString(fk, names[i], v) < 0) {
            Py_XDECREF(v);
            goto error;
        }
        Py_DECREF(v);
    }
    for (int type = 0; type < G3_TYPE_COUNT; type++) {
        const g3_type_traits *t = g3_type_get(type);
        for (int which = 0; which < 2; which++) {
            const int isa = g3_type_kernel_isa(type, which);
            if (isa < 0)
                continue;
            PyObject *v = PyUnicode_FromString(g3_isa_name(isa));
            if (!v || PyDict_SetItemString(which ? dot : tf, t->name, v) < 0) {
                Py_XDECREF(v);
                goto error;
            }
            Py_DECREF(v);
        }
    }
    d = Py_BuildValue("{s:s,s:s,s:z,s:O,s:O,s:O,s:s}", "cpu", g3_isa_name(g3_isa_cpu()),
                      "selected", g3_isa_name(g3_isa_selected()), "env", env, "to_float", tf,
                      "dot_f32", dot, "kernels", fk, "packed",
                      g3_isa_vnni() ? "avx512vnni" : "off");
error:
    Py_XDECREF(tf);
    Py_XDECREF(dot);
    Py_XDECREF(fk);
    return d;
}

PyMethodDef g3_py_quant_methods[] = {
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_VARARGS | METH_KEYWORDS,
     dequantize_doc},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_VARARGS | METH_KEYWORDS,
     quantize_doc},
    {"type_info", py_type_info, METH_O, type_info_doc},
    {"dot_f32", (PyCFunction)(void (*)(void))py_dot_f32, METH_VARARGS | METH_KEYWORDS, dot_f32_doc},
    {"matvec", (PyCFunction)(void (*)(void))py_matvec, METH_VARARGS | METH_KEYWORDS, matvec_doc},
    {"isa", py_isa, METH_NOARGS, isa_doc},
    {"packed_matvec", (PyCFunction)(void (*)(void))py_packed_matvec, METH_VARARGS | METH_KEYWORDS,
     packed_matvec_doc},
    {"packed_argmax", (PyCFunction)(void (*)(void))py_packed_argmax, METH_VARARGS | METH_KEYWORDS,
     packed_argmax_doc},
    {"packed_gemm", (PyCFunction)(void (*)(void))py_packed_gemm, METH_VARARGS | METH_KEYWORDS,
     packed_gemm_doc},
    {"packed_supported", py_packed_supported, METH_O,
     "packed_supported(type_id) -> bool: whether the decode path packs this type on this CPU"},
    {NULL, NULL, 0, NULL},
};
