/* py_safetensors.c — _core.Safetensors: a validated, memory-mapped safetensors file from Python.
 *
 * Zero-copy views: raw(i) returns a read-only uint8 ndarray whose base is a small _SafetensorsView
 * owner holding a reference to the Safetensors object, so the mapping outlives every view (the
 * same scheme as py_gguf.c); deallocation of the last reference unmaps.
 */
#include "py.h"
#include "np.h"

#include "io/safetensors.h"

typedef struct {
    PyObject_HEAD
    g3_safetensors *f;
    PyObject *path; /* str */
} STObject;

typedef struct {
    PyObject_HEAD
    STObject *owner;
} STViewObject;

static PyTypeObject *st_view_type; /* set at module exec; only used as an array base */

static PyObject *utf8(const char *s, size_t n)
{
    /* validated UTF-8 (the parser rejects anything else) */
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "strict");
}

static int st_init(STObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&", kwlist, PyUnicode_FSDecoder, &path))
        return -1;
    if (self->f) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_RuntimeError, "Safetensors object already initialised");
        return -1;
    }
    PyObject *enc = PyUnicode_EncodeFSDefault(path);
    if (!enc) {
        Py_DECREF(path);
        return -1;
    }
    g3_err err = {{0}, 0};
    g3_safetensors *f = NULL;
    g3_status st;
    const char *cpath = PyBytes_AS_STRING(enc);
    Py_BEGIN_ALLOW_THREADS st = g3_safetensors_open(cpath, &f, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        g3_module_state *ms = g3_py_state_from_type(Py_TYPE(self));
        if (ms) {
            if (st == G3_ERR_FORMAT || st == G3_ERR_UNSUPPORTED)
                PyErr_Format(st == G3_ERR_FORMAT ? ms->FormatError : ms->UnsupportedError,
                             "%s: %s", cpath, err.msg);
            else
                g3_py_raise(ms, st, &err, cpath);
        }
        Py_DECREF(enc);
        Py_DECREF(path);
        return -1;
    }
    Py_DECREF(enc);
    self->f = f;
    self->path = path;
    return 0;
}

static void st_dealloc(STObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    g3_safetensors_close(self->f);
    self->f = NULL;
    Py_XDECREF(self->path);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int st_check(STObject *self)
{
    if (!self->f) {
        PyErr_SetString(PyExc_ValueError, "the Safetensors object is not initialised");
        return -1;
    }
    return 0;
}

/* [(name, dtype, shape, begin, end)] in header order; begin/end are absolute file offsets */
static PyObject *st_tensor_infos(STObject *self, PyObject *unused)
{
    if (st_check(self) < 0)
        return NULL;
    const g3_safetensors *f = self->f;
    PyObject *list = PyList_New((Py_ssize_t)f->n_tensors);
    for (uint64_t i = 0; list && i < f->n_tensors; i++) {
        const g3_st_tensor *t = &f->tensor[i];
        PyObject *shape = PyTuple_New(t->n_dims);
        for (int j = 0; shape && j < t->n_dims; j++) {
            PyObject *d = PyLong_FromLongLong(t->shape[j]);
            if (!d) {
                Py_CLEAR(shape);
                break;
            }
            PyTuple_SET_ITEM(shape, j, d);
        }
        PyObject *name = shape ? utf8(t->name, t->name_len) : NULL;
        PyObject *item = name ? Py_BuildValue("(NsNKK)", name, g3_st_dtype_name(t->dtype), shape,
                                              (unsigned long long)(f->data_off + t->begin),
                                              (unsigned long long)(f->data_off + t->end))
                              : NULL;
        if (!name)
            Py_XDECREF(shape);
        if (!item) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static PyObject *st_metadata(STObject *self, PyObject *unused)
{
    if (st_check(self) < 0)
        return NULL;
    PyObject *d = PyDict_New();
    for (uint64_t i = 0; d && i < self->f->n_meta; i++) {
        const g3_st_meta *m = &self->f->meta[i];
        PyObject *k = utf8(m->key, m->key_len), *v = k ? utf8(m->value, m->value_len) : NULL;
        if (!v || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return d;
}

/* raw(index): the tensor's bytes as a read-only uint8 view */
static PyObject *st_raw(STObject *self, PyObject *arg)
{
    if (st_check(self) < 0)
        return NULL;
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || (uint64_t)i >= self->f->n_tensors) {
        PyErr_Format(PyExc_IndexError, "tensor index %zd out of range (%llu tensors)", i,
                     (unsigned long long)self->f->n_tensors);
        return NULL;
    }
    const g3_st_tensor *t = &self->f->tensor[i];
    STViewObject *owner = PyObject_New(STViewObject, st_view_type);
    if (!owner)
        return NULL;
    owner->owner = (STObject *)Py_NewRef(self);
    npy_intp dims[1] = {(npy_intp)(t->end - t->begin)};
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

#define ST_INT_GETTER(field)                                                                       \
    static PyObject *st_get_##field(STObject *self, void *c)                                      \
    {                                                                                              \
        if (st_check(self) < 0)                                                                    \
            return NULL;                                                                           \
        return PyLong_FromUnsignedLongLong(self->f->field);                                       \
    }
ST_INT_GETTER(header_len)
ST_INT_GETTER(data_off)
ST_INT_GETTER(size)

static PyObject *st_get_path(STObject *self, void *c)
{
    return Py_NewRef(self->path ? self->path : Py_None);
}

static PyMethodDef st_methods[] = {
    {"tensor_infos", (PyCFunction)st_tensor_infos, METH_NOARGS,
     "[(name, dtype, shape, begin, end)] in header order (absolute file offsets)"},
    {"metadata", (PyCFunction)st_metadata, METH_NOARGS, "the __metadata__ dict (str -> str)"},
    {"raw", (PyCFunction)st_raw, METH_O, "raw(index): zero-copy read-only uint8 view"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef st_getset[] = {
    {"header_length", (getter)st_get_header_len, NULL, NULL, NULL},
    {"data_offset", (getter)st_get_data_off, NULL, NULL, NULL},
    {"size", (getter)st_get_size, NULL, NULL, NULL},
    {"path", (getter)st_get_path, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot st_slots[] = {
    {Py_tp_init, st_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, st_dealloc},
    {Py_tp_methods, st_methods},
    {Py_tp_getset, st_getset},
    {Py_tp_doc, "Safetensors(path): a validated read-only mapping of a safetensors file (private)"},
    {0, NULL},
};

static PyType_Spec st_spec = {
    .name = "gemma3._core.Safetensors",
    .basicsize = sizeof(STObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = st_slots,
};

static void view_dealloc(STViewObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->owner);
    PyObject_Free(self);
    Py_DECREF(tp);
}

static PyType_Slot view_slots[] = {
    {Py_tp_dealloc, view_dealloc},
    {Py_tp_doc, "keeps a safetensors mapping alive while a zero-copy view exists"},
    {0, NULL},
};

static PyType_Spec view_spec = {
    .name = "gemma3._core._SafetensorsView",
    .basicsize = sizeof(STViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = view_slots,
};

int g3_py_safetensors_init(PyObject *module, g3_module_state *st)
{
    PyObject *tp = PyType_FromModuleAndSpec(module, &st_spec, NULL);
    if (!tp)
        return -1;
    int rc = PyModule_AddObjectRef(module, "Safetensors", tp);
    Py_DECREF(tp); /* the module keeps it */
    if (rc < 0)
        return -1;
    PyObject *vt = PyType_FromModuleAndSpec(module, &view_spec, NULL);
    if (!vt)
        return -1;
    st_view_type = (PyTypeObject *)vt; /* one reference kept for the process lifetime */
    return 0;
}
