/* py_gguf.c — _core.GGUF: a validated, memory-mapped GGUF file seen from Python.
 *
 * Zero-copy views: raw(name) returns a read-only uint8 ndarray whose base is a small _GGUFView
 * owner holding a reference to the GGUF object, so the mapping outlives every view; close() unmaps
 * only when no view is alive (else raises BufferError), and deallocation always unmaps.
 */
#include "py.h"
#include "np.h"

#include "io/gguf.h"

#include <string.h>

typedef struct {
    PyObject_HEAD
    g3_gguf *g;
    PyObject *path;      /* str */
    Py_ssize_t n_views;  /* live raw() views */
} GGUFObject;

typedef struct {
    PyObject_HEAD
    GGUFObject *owner;
} GGUFViewObject;

static PyTypeObject *g3_view_type; /* set at module exec; only used as an array base */

static int gguf_check_open(GGUFObject *self)
{
    if (!self->g) {
        PyErr_SetString(PyExc_ValueError, "the GGUF file is closed");
        return -1;
    }
    return 0;
}

static PyObject *str_from(g3_str s)
{
    return PyUnicode_DecodeUTF8(s.ptr, (Py_ssize_t)s.len, "surrogateescape");
}

static int gguf_init(GGUFObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&", kwlist, PyUnicode_FSDecoder, &path))
        return -1;
    if (self->g) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_RuntimeError, "GGUF object already initialised");
        return -1;
    }
    PyObject *enc = PyUnicode_EncodeFSDefault(path);
    if (!enc) {
        Py_DECREF(path);
        return -1;
    }
    g3_err err = {{0}, 0};
    g3_gguf *g = NULL;
    g3_status st;
    const char *cpath = PyBytes_AS_STRING(enc);
    Py_BEGIN_ALLOW_THREADS st = g3_gguf_open(cpath, &g, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        g3_module_state *ms = g3_py_state_from_type(Py_TYPE(self));
        if (ms) {
            /* prefix the path on format errors so the user sees which file */
            if (st == G3_ERR_FORMAT || st == G3_ERR_UNSUPPORTED) {
                PyErr_Format(st == G3_ERR_FORMAT ? ms->FormatError : ms->UnsupportedError,
                             "%s: %s", cpath, err.msg);
            } else {
                g3_py_raise(ms, st, &err, cpath);
            }
        }
        Py_DECREF(enc);
        Py_DECREF(path);
        return -1;
    }
    Py_DECREF(enc);
    self->g = g;
    Py_XSETREF(self->path, path); /* __init__ again after close() replaces the old path */
    return 0;
}

static void gguf_dealloc(GGUFObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    g3_gguf_close(self->g);
    self->g = NULL;
    Py_XDECREF(self->path);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *scalar_value(int type, const uint8_t *p)
{
    switch (type) {
    case G3_GGUF_U8: return PyLong_FromUnsignedLong(*p);
    case G3_GGUF_I8: return PyLong_FromLong(*(const int8_t *)p);
    case G3_GGUF_U16: { uint16_t v; memcpy(&v, p, 2); return PyLong_FromUnsignedLong(v); }
    case G3_GGUF_I16: { int16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case G3_GGUF_U32: { uint32_t v; memcpy(&v, p, 4); return PyLong_FromUnsignedLong(v); }
    case G3_GGUF_I32: { int32_t v; memcpy(&v, p, 4); return PyLong_FromLong(v); }
    case G3_GGUF_F32: { float v; memcpy(&v, p, 4); return PyFloat_FromDouble(v); }
    case G3_GGUF_BOOL: return PyBool_FromLong(*p != 0);
    case G3_GGUF_U64: { uint64_t v; memcpy(&v, p, 8); return PyLong_FromUnsignedLongLong(v); }
    case G3_GGUF_I64: { int64_t v; memcpy(&v, p, 8); return PyLong_FromLongLong(v); }
    case G3_GGUF_F64: { double v; memcpy(&v, p, 8); return PyFloat_FromDouble(v); }
    }
    PyErr_Format(PyExc_SystemError, "bad scalar type %d", type);
    return NULL;
}

static int numpy_type(int t)
{
    switch (t) {
    case G3_GGUF_U8: return NPY_UINT8;
    case G3_GGUF_I8: return NPY_INT8;
    case G3_GGUF_U16: return NPY_UINT16;
    case G3_GGUF_I16: return NPY_INT16;
    case G3_GGUF_U32: return NPY_UINT32;
    case G3_GGUF_I32: return NPY_INT32;
    case G3_GGUF_F32: return NPY_FLOAT32;
    case G3_GGUF_BOOL: return NPY_BOOL;
    case G3_GGUF_U64: return NPY_UINT64;
    case G3_GGUF_I64: return NPY_INT64;
    case G3_GGUF_F64: return NPY_FLOAT64;
    }
    return -1;
}

static PyObject *kv_value(const g3_gguf_kv *kv)
{
    if (kv->type == G3_GGUF_STRING) {
        g3_str s;
        g3_gguf_kv_strings(kv, &s);
        return str_from(s);
    }
    if (kv->type != G3_GGUF_ARRAY)
        return scalar_value(kv->type, kv->data);
    if (kv->arr_type == G3_GGUF_STRING) {
        if (kv->n > (uint64_t)PY_SSIZE_T_MAX / sizeof(g3_str))
            return PyErr_NoMemory();
        g3_str *ss = PyMem_Malloc((kv->n ? kv->n : 1) * sizeof *ss);
        if (!ss)
            return PyErr_NoMemory();
        g3_gguf_kv_strings(kv, ss);
        PyObject *list = PyList_New((Py_ssize_t)kv->n);
        for (uint64_t i = 0; list && i < kv->n; i++) {
            PyObject *o = str_from(ss[i]);
            if (!o) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, o);
        }
        PyMem_Free(ss);
        return list;
    }
    npy_intp dims[1] = {(npy_intp)kv->n};
    PyObject *arr = PyArray_SimpleNew(1, dims, numpy_type(kv->arr_type));
    if (arr && kv->nbytes)
        memcpy(PyArray_DATA((PyArrayObject *)arr), kv->data, kv->nbytes);
    return arr;
}

static PyObject *gguf_metadata(GGUFObject *self, PyObject *unused)
{
    if (gguf_check_open(self) < 0)
        return NULL;
    PyObject *d = PyDict_New();
    for (uint64_t i = 0; d && i < self->g->n_kv; i++) {
        const g3_gguf_kv *kv = &self->g->kv[i];
        PyObject *k = str_from(kv->key), *v = k ? kv_value(kv) : NULL;
        if (!v || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return d;
}

/* [(name, shape (NumPy order), type_id, type_name, nbytes, file_offset)] in file order */
static PyObject *gguf_tensor_infos(GGUFObject *self, PyObject *unused)
{
    if (gguf_check_open(self) < 0)
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)self->g->n_tensors);
    for (uint64_t i = 0; list && i < self->g->n_tensors; i++) {
        const g3_gguf_tensor *t = &self->g->tensor[i];
        PyObject *shape = PyTuple_New(t->n_dims ? t->n_dims : 1);
        if (!shape) {
            Py_CLEAR(list);
            break;
        }
        for (uint32_t j = 0; j < (t->n_dims ? t->n_dims : 1); j++) {
            PyObject *d = PyLong_FromLongLong(t->n_dims ? t->ne[t->n_dims - 1 - j] : 1);
            if (!d) { /* a NULL item would reach Python as a broken tuple */
                Py_CLEAR(shape);
                break;
            }
            PyTuple_SET_ITEM(shape, j, d);
        }
        if (!shape) {
            Py_CLEAR(list);
            break;
        }
        PyObject *name = str_from(t->name);
        PyObject *item = name ? Py_BuildValue("(NNisKK)", name, shape, t->type,
                                              g3_type_get(t->type)->name,
                                              (unsigned long long)t->nbytes,
                                              (unsigned long long)(self->g->data_off + t->offset))
                              : NULL;
        if (!name)
            Py_DECREF(shape);
        if (!item) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static const g3_gguf_tensor *lookup(GGUFObject *self, PyObject *name)
{
    if (gguf_check_open(self) < 0)
        return NULL;
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "tensor name must be str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    /* names are listed with surrogateescape (str_from), so encode the same way: a name that is
     * not valid UTF-8 in the file must still be found by the str we handed out */
    PyObject *b = PyUnicode_AsEncodedString(name, "utf-8", "surrogateescape");
    if (!b)
        return NULL;
    const char *s = PyBytes_AS_STRING(b);
    uint64_t n = (uint64_t)PyBytes_GET_SIZE(b);
    const g3_gguf_tensor *found = NULL;
    for (uint64_t i = 0; i < self->g->n_tensors && !found; i++) {
        const g3_gguf_tensor *t = &self->g->tensor[i];
        if (t->name.len == n && memcmp(t->name.ptr, s, (size_t)n) == 0)
            found = t;
    }
    Py_DECREF(b);
    if (!found)
        PyErr_Format(PyExc_KeyError, "no tensor named %R in this GGUF file", name);
    return found;
}

static PyObject *gguf_raw(GGUFObject *self, PyObject *name)
{
    const g3_gguf_tensor *t = lookup(self, name);
    if (!t)
        return NULL;
    GGUFViewObject *owner = PyObject_New(GGUFViewObject, g3_view_type);
    if (!owner)
        return NULL;
    Py_INCREF(self);
    owner->owner = self;
    self->n_views++;
    npy_intp dims[1] = {(npy_intp)t->nbytes};
    PyObject *arr = PyArray_New(&PyArray_Type, 1, dims, NPY_UINT8, NULL, (void *)t->data, 0,
                                NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (!arr) {
        Py_DECREF(owner);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)owner) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* release(name) -> int: drops the resident pages of a tensor's bytes (model/loading: a matrix
 * the kernels read from its packed copy). Only for our own file mapping: a GGUF opened over a
 * caller's buffer is left alone (dropping anonymous pages would zero them). */
static PyObject *gguf_release(GGUFObject *self, PyObject *name)
{
    const g3_gguf_tensor *t = lookup(self, name);
    if (!t)
        return NULL;
    if (!self->g->mapped)
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(
        g3_map_release(self->g->base, self->g->size, t->data, t->nbytes));
}

static PyObject *gguf_dequantize(GGUFObject *self, PyObject *name)
{
    const g3_gguf_tensor *t = lookup(self, name);
    if (!t)
        return NULL;
    const g3_type_traits *tt = g3_type_get(t->type);
    if (!tt->to_float) {
        g3_module_state *ms = g3_py_state_from_type(Py_TYPE(self));
        if (ms)
            PyErr_Format(ms->UnsupportedError,
                         "tensor '%U': dequantization of ggml type %s (id %d) is not supported",
                         name, tt->name, t->type);
        return NULL;
    }
    npy_intp dims[4];
    int nd = t->n_dims ? (int)t->n_dims : 1;
    for (int j = 0; j < nd; j++)
        dims[j] = t->n_dims ? (npy_intp)t->ne[t->n_dims - 1 - j] : 1;
    PyObject *arr = PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!arr)
        return NULL;
    int64_t n = (int64_t)(t->nbytes / tt->type_size) * tt->blck;
    float *dst = PyArray_DATA((PyArrayObject *)arr);
    Py_BEGIN_ALLOW_THREADS tt->to_float(t->data, dst, n);
    Py_END_ALLOW_THREADS
    return arr;
}

static PyObject *gguf_close(GGUFObject *self, PyObject *unused)
{
    if (self->n_views > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close: %zd zero-copy view(s) of this file are still alive", self->n_views);
        return NULL;
    }
    g3_gguf_close(self->g);
    self->g = NULL;
    Py_RETURN_NONE;
}

static PyObject *gguf_get_closed(GGUFObject *self, void *c) { return PyBool_FromLong(!self->g); }

#define GGUF_INT_GETTER(field)                                                                     \
    static PyObject *gguf_get_##field(GGUFObject *self, void *c)                                  \
    {                                                                                              \
        if (gguf_check_open(self) < 0)                                                             \
            return NULL;                                                                           \
        return PyLong_FromUnsignedLongLong(self->g->field);                                       \
    }
GGUF_INT_GETTER(version)
GGUF_INT_GETTER(alignment)
GGUF_INT_GETTER(data_off)
GGUF_INT_GETTER(size)

static PyObject *gguf_get_path(GGUFObject *self, void *c)
{
    return Py_NewRef(self->path ? self->path : Py_None);
}

static PyMethodDef gguf_methods[] = {
    {"metadata", (PyCFunction)gguf_metadata, METH_NOARGS, "dict of every key/value pair"},
    {"tensor_infos", (PyCFunction)gguf_tensor_infos, METH_NOARGS,
     "[(name, shape, type_id, type_name, nbytes, file_offset)]"},
    {"raw", (PyCFunction)gguf_raw, METH_O, "zero-copy read-only uint8 view of a tensor's bytes"},
    {"dequantize", (PyCFunction)gguf_dequantize, METH_O, "tensor as float32 (NumPy order)"},
    {"release", (PyCFunction)gguf_release, METH_O,
     "drop the resident pages of a tensor's bytes (read again from the file if touched)"},
    {"close", (PyCFunction)gguf_close, METH_NOARGS, "unmap the file (no view may be alive)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef gguf_getset[] = {
    {"closed", (getter)gguf_get_closed, NULL, NULL, NULL},
    {"version", (getter)gguf_get_version, NULL, NULL, NULL},
    {"alignment", (getter)gguf_get_alignment, NULL, NULL, NULL},
    {"data_offset", (getter)gguf_get_data_off, NULL, NULL, NULL},
    {"size", (getter)gguf_get_size, NULL, NULL, NULL},
    {"path", (getter)gguf_get_path, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot gguf_slots[] = {
    {Py_tp_init, gguf_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, gguf_dealloc},
    {Py_tp_methods, gguf_methods},
    {Py_tp_getset, gguf_getset},
    {Py_tp_doc, "GGUF(path): a validated read-only mapping of a GGUF file (private)"},
    {0, NULL},
};

static PyType_Spec gguf_spec = {
    .name = "gemma3._core.GGUF",
    .basicsize = sizeof(GGUFObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = gguf_slots,
};

static void view_dealloc(GGUFViewObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->owner) {
        self->owner->n_views--;
        Py_DECREF(self->owner);
    }
    PyObject_Free(self);
    Py_DECREF(tp);
}

static PyType_Slot view_slots[] = {
    {Py_tp_dealloc, view_dealloc},
    {Py_tp_doc, "keeps a GGUF mapping alive while a zero-copy view exists"},
    {0, NULL},
};

static PyType_Spec view_spec = {
    .name = "gemma3._core._GGUFView",
    .basicsize = sizeof(GGUFViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = view_slots,
};

int g3_py_gguf_init(PyObject *module, g3_module_state *st)
{
    st->GGUFType = PyType_FromModuleAndSpec(module, &gguf_spec, NULL);
    if (!st->GGUFType || PyModule_AddObjectRef(module, "GGUF", st->GGUFType) < 0)
        return -1;
    PyObject *vt = PyType_FromModuleAndSpec(module, &view_spec, NULL);
    if (!vt)
        return -1;
    g3_view_type = (PyTypeObject *)vt; /* one reference kept for the process lifetime */
    return 0;
}
