/* py_vision.c — _core.VisionTower: binds the SigLIP tower + projector weights given by
 * gemma3/vision.py and encodes images with the GIL released.
 *
 * VisionTower(config: VisionConfig, weights: dict, bf16: bool = False)
 *   bf16: convert the matrices to bf16 once and compute in the bf16 mode (siglip.h,
 *     g3_vision_use_bf16); the attribute `compute` says which mode runs ("bf16" only where the
 *     CPU and G3_ISA offer the bf16 kernel, else "f32").
 *   weights: keys and shapes of the vision role table (model/roles.c,
 *     _core.tensor_roles("vision")): matrices as (type_id, rows, cols, ndarray), float32 vectors
 *     as arrays (mm.soft_emb_norm holds the full multiplier 1 + w).
 * The arrays are kept referenced for the tower's lifetime (they may be views of a file mapping).
 * One call at a time: a second thread entering while an encode runs gets RuntimeError.
 */
#include "py.h"
#include "np.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/attention_vision.h"
#include "kernels/dispatch.h"

#include "model/roles.h"
#include "vision/siglip.h"

typedef struct {
    PyObject_HEAD
    g3_vision *v;
    PyObject *keep; /* arrays whose memory the tower points into */
    int busy;
} VisionObject;

static g3_module_state *vstate(PyObject *self) { return g3_py_state_from_type(Py_TYPE(self)); }

/* The checkpoint between tower layers: takes the GIL back just long enough to run Python's
 * signal handlers, so Ctrl-C raises KeyboardInterrupt within a layer rather than after every
 * image of the call. Runs on the thread that released the GIL (signals only act on the main
 * thread; elsewhere PyErr_CheckSignals is a no-op). */
typedef struct {
    PyThreadState *ts;
} released_gil;

static int check_signals(void *ctx)
{
    released_gil *g = ctx;
    PyEval_RestoreThread(g->ts);
    const int stop = PyErr_CheckSignals() < 0; /* the exception stays set for the caller */
    g->ts = PyEval_SaveThread();
    return stop;
}

static int vision_init(VisionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"config", "weights", "bf16", NULL};
    PyObject *co, *w;
    int bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!|p", kwlist, &co, &PyDict_Type, &w, &bf16))
        return -1;
    if (self->v) {
        PyErr_SetString(PyExc_RuntimeError, "VisionTower already initialised");
        return -1;
    }
    g3_module_state *ms = vstate((PyObject *)self);
    const g3_vision_config *c = g3_py_vision_config(ms, co);
    if (!c)
        return -1;
    g3_err err = {{0}, 0};
    g3_status st = g3_vision_create(c, &self->v, &err);
    if (st) {
        g3_py_raise(ms, st, &err, NULL);
        return -1;
    }
    g3_vision *v = self->v;
    int64_t dims[G3_DIM_N];
    g3_vision_dims(&v->cfg, dims);
    self->keep = PyList_New(0);
    if (!self->keep || g3_py_bind_roles(ms, self->keep, w, &g3_vision_roles, dims, v, v->layers,
                                        sizeof *v->layers, v->cfg.n_layer) < 0)
        goto fail;
    if ((st = g3_vision_check(v, &err))) {
        g3_py_raise(ms, st, &err, NULL);
        goto fail;
    }
    if (bf16) {
        Py_BEGIN_ALLOW_THREADS
        st = g3_vision_use_bf16(v, 1, &err);
        Py_END_ALLOW_THREADS
        if (st) {
            g3_py_raise(ms, st, &err, NULL);
            goto fail;
        }
    }
    return 0;
fail:
    g3_vision_free(self->v);
    self->v = NULL;
    Py_CLEAR(self->keep);
    return -1;
}

static void vision_dealloc(VisionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    g3_vision_free(self->v);
    Py_XDECREF(self->keep);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Writable C-contiguous float32 array of exactly n elements, or None. */
static int out_buffer(PyObject *o, const char *what, npy_intp n, float **out)
{
    *out = NULL;
    if (!o || o == Py_None)
        return 0;
    PyArrayObject *a = (PyArrayObject *)o;
    if (!PyArray_Check(o) || PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_ISCARRAY(a) ||
        PyArray_SIZE(a) != n) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a writable C-contiguous float32 array of %zd values", what,
                     (Py_ssize_t)n);
        return -1;
    }
    *out = PyArray_DATA(a);
    return 0;
}

/* encode(pixels (n, 3, S, S) float32, hidden=None | (n, P, D), attn_layer=-1,
 *        attn=None | (n, heads, P, P)) -> (n, n_mm_tokens, n_embd_text) float32 */
static PyObject *vision_encode(VisionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"pixels", "hidden", "attn_layer", "attn", NULL};
    PyObject *px_o, *hid_o = Py_None, *attn_o = Py_None;
    long long attn_layer = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OLO", kwlist, &px_o, &hid_o, &attn_layer,
                                     &attn_o))
        return NULL;
    if (!self->v)
        return PyErr_Format(PyExc_RuntimeError, "VisionTower is not initialised");
    if (self->busy)
        return PyErr_Format(PyExc_RuntimeError,
                            "this vision tower is already encoding in another thread");
    const g3_vision *v = self->v;
    const g3_vision_config *c = &v->cfg;
    PyArrayObject *px = (PyArrayObject *)PyArray_FROMANY(px_o, NPY_FLOAT32, 4, 4,
                                                         NPY_ARRAY_IN_ARRAY);
    if (!px)
        return NULL;
    PyArrayObject *out = NULL;
    PyObject *ret = NULL;
    const npy_intp n = PyArray_DIM(px, 0), P = v->n_patches, D = c->n_embd;
    if (PyArray_DIM(px, 1) != 3 || PyArray_DIM(px, 2) != c->image_size ||
        PyArray_DIM(px, 3) != c->image_size) {
        PyErr_Format(PyExc_ValueError,
                     "pixel_values must be (n, 3, %lld, %lld) float32, got shape (%zd, %zd, %zd, "
                     "%zd)",
                     (long long)c->image_size, (long long)c->image_size, PyArray_DIM(px, 0),
                     PyArray_DIM(px, 1), PyArray_DIM(px, 2), PyArray_DIM(px, 3));
        goto done;
    }
    if (attn_layer >= c->n_layer || (attn_o != Py_None && attn_layer < 0)) {
        PyErr_Format(PyExc_ValueError, "attention layer %lld out of range (the tower has %lld)",
                     attn_layer, (long long)c->n_layer);
        goto done;
    }
    float *hid, *att;
    if (out_buffer(hid_o, "hidden", n * P * D, &hid) < 0 ||
        out_buffer(attn_o, "attn", n * c->n_head * P * P, &att) < 0)
        goto done;
    npy_intp dims[3] = {n, c->n_mm_tokens, c->n_embd_text};
    out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (!out)
        goto done;
    {
        const float *pd = PyArray_DATA(px);
        float *od = PyArray_DATA(out);
        const size_t img = (size_t)3 * c->image_size * c->image_size;
        const size_t oimg = (size_t)c->n_mm_tokens * c->n_embd_text;
        g3_err err = {{0}, 0};
        g3_status st = G3_OK;
        self->busy = 1; /* also guards the GIL windows of check_signals */
        released_gil gil = {PyEval_SaveThread()};
        const g3_checkpoint cp = {check_signals, &gil};
        for (npy_intp i = 0; i < n && !st; i++) {
            g3_vision_capture cap = {
                .hidden = hid ? hid + (size_t)i * P * D : NULL,
                .attn_layer = att ? attn_layer : -1,
                .attn = att ? att + (size_t)i * c->n_head * P * P : NULL,
            };
            st = g3_vision_encode(v, pd + i * img, od + i * oimg, &cap, &cp, &err);
        }
        PyEval_RestoreThread(gil.ts);
        self->busy = 0;
        if (st) { /* G3_ERR_INTERRUPTED: KeyboardInterrupt is already set, g3_py_raise keeps it */
            g3_py_raise(vstate((PyObject *)self), st, &err, NULL);
            goto done;
        }
    }
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(px);
    Py_XDECREF(out);
    return ret;
}

static PyObject *vision_get(VisionObject *self, void *which)
{
    if (!self->v)
        return PyErr_Format(PyExc_RuntimeError, "VisionTower is not initialised");
    const g3_vision *v = self->v;
    switch ((int)(intptr_t)which) {
    case 0:
        return PyLong_FromLongLong(v->n_patches);
    case 1:
        return PyLong_FromLongLong(v->cfg.n_mm_tokens);
    case 3:
        return PyUnicode_FromString(v->bf16 ? "bf16" : "f32");
    default:
        return PyLong_FromLongLong(v->pool);
    }
}

/* Float32 C-contiguous 2-D array (a copy or a view). */
static PyArrayObject *mat2(PyObject *o, const char *what)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    if (!a)
        PyErr_Format(PyExc_ValueError, "%s must be a 2-D float32 array", what);
    return a;
}

/* bf16_gemm(a (M, K), w (N, K), bias=None, gelu=False, c=None, simd=True) -> (M, N) float32:
 * the bf16 kernel of the tower's bf16 mode (c given: accumulated into a copy of c); simd=False
 * runs the scalar reference. For the NumPy twin in tests/test_vision.py. */
static PyObject *vision_bf16_gemm(PyObject *cls, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"a", "w", "bias", "gelu", "c", "simd", NULL};
    PyObject *ao, *wo, *bo = Py_None, *co = Py_None;
    int gelu = 0, simd = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OpOp", kwlist, &ao, &wo, &bo, &gelu, &co,
                                     &simd))
        return NULL;
    PyArrayObject *a = mat2(ao, "a"), *w = a ? mat2(wo, "w") : NULL, *b = NULL, *out = NULL;
    uint32_t *act = NULL;
    g3_bf16_mat m = {0};
    PyObject *ret = NULL;
    if (!w)
        goto done;
    const npy_intp M = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1), N = PyArray_DIM(w, 0);
    if (PyArray_DIM(w, 1) != K || M < 1 || N < 1 || K < 1) {
        PyErr_SetString(PyExc_ValueError, "bf16_gemm: a (M, K) and w (N, K), all sizes >= 1");
        goto done;
    }
    if (bo != Py_None) {
        b = (PyArrayObject *)PyArray_FROMANY(bo, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (!b || PyArray_DIM(b, 0) != N) {
            PyErr_SetString(PyExc_ValueError, "bf16_gemm: bias must have N values");
            goto done;
        }
    } else if (gelu) {
        PyErr_SetString(PyExc_ValueError, "bf16_gemm: gelu needs a bias");
        goto done;
    }
    if (co != Py_None) {
        out = (PyArrayObject *)PyArray_FROMANY(co, NPY_FLOAT32, 2, 2,
                                               NPY_ARRAY_CARRAY | NPY_ARRAY_ENSURECOPY);
        if (!out || PyArray_DIM(out, 0) != M || PyArray_DIM(out, 1) != N) {
            PyErr_SetString(PyExc_ValueError, "bf16_gemm: c must be (M, N)");
            goto done;
        }
    } else {
        npy_intp dims[2] = {M, N};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!out)
            goto done;
    }
    g3_weight W = {.type = 0, .rows = N, .cols = K, .row_bytes = (size_t)K * 4,
                   .data = PyArray_DATA(w)};
    g3_err err = {{0}, 0};
    act = malloc(sizeof(uint32_t) * g3_bf16_act_words(M, K));
    if (!act || g3_bf16_mat_from_weight(&W, &m, &err)) {
        PyErr_NoMemory();
        goto done;
    }
    const g3_bf16_epi epi = {b ? PyArray_DATA(b) : NULL, gelu, co != Py_None};
    Py_BEGIN_ALLOW_THREADS
    const int nt = g3_get_threads();
    g3_bf16_pack_act(PyArray_DATA(a), M, K, K, act, nt);
    g3_bf16_gemm_isa(act, M, &m, PyArray_DATA(out), N, &epi, nt, simd);
    Py_END_ALLOW_THREADS
    ret = (PyObject *)out;
    out = NULL;
done:
    free(act);
    g3_bf16_mat_free(&m);
    Py_XDECREF(a);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(out);
    return ret;
}

/* attn_head(q (P, hd), k (P, hd), v (P, hd), scale, bf16=False) -> z (P, hd): the tower's fused
 * attention for one head (online softmax over key blocks). */
static PyObject *vision_attn_head(PyObject *cls, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"q", "k", "v", "scale", "bf16", NULL};
    PyObject *qo, *ko, *vo;
    float scale;
    int bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOf|p", kwlist, &qo, &ko, &vo, &scale, &bf16))
        return NULL;
    PyArrayObject *q = mat2(qo, "q"), *k = q ? mat2(ko, "k") : NULL, *v = k ? mat2(vo, "v") : NULL;
    PyArrayObject *z = NULL;
    if (!v)
        goto done;
    const npy_intp P = PyArray_DIM(q, 0), hd = PyArray_DIM(q, 1);
    if (P < 1 || hd < 1 || PyArray_DIM(k, 0) != P || PyArray_DIM(v, 0) != P ||
        PyArray_DIM(k, 1) != hd || PyArray_DIM(v, 1) != hd) {
        PyErr_SetString(PyExc_ValueError, "attn_head: q, k, v must all be (P, hd)");
        goto done;
    }
    npy_intp dims[2] = {P, hd};
    z = (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_FLOAT32, 0);
    if (!z)
        goto done;
    g3_status st;
    Py_BEGIN_ALLOW_THREADS
    st = g3_attn_fused_head(PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), P, hd, scale,
                            PyArray_DATA(z), bf16);
    Py_END_ALLOW_THREADS
    if (st) {
        Py_CLEAR(z);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    return (PyObject *)z;
}

static PyObject *vision_bf16_available(PyObject *cls, PyObject *unused)
{
    return PyBool_FromLong(g3_isa_bf16());
}

static PyMethodDef vision_methods[] = {
    {"bf16_gemm", (PyCFunction)(void (*)(void))vision_bf16_gemm,
     METH_VARARGS | METH_KEYWORDS | METH_STATIC,
     "bf16_gemm(a, w, bias=None, gelu=False, c=None, simd=True) -> (M, N) float32"},
    {"attn_head", (PyCFunction)(void (*)(void))vision_attn_head,
     METH_VARARGS | METH_KEYWORDS | METH_STATIC,
     "attn_head(q, k, v, scale, bf16=False) -> (P, hd) float32"},
    {"bf16_available", vision_bf16_available, METH_NOARGS | METH_STATIC,
     "whether the bf16 kernel runs here (CPU avx512bf16 and G3_ISA at avx512)"},
    {"encode", (PyCFunction)(void (*)(void))vision_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(pixels (n, 3, S, S), hidden=None, attn_layer=-1, attn=None) -> (n, M, n_embd_text)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef vision_getset[] = {
    {"n_patches", (getter)vision_get, NULL, "patches per image", (void *)0},
    {"n_mm_tokens", (getter)vision_get, NULL, "projected tokens per image", (void *)1},
    {"pool", (getter)vision_get, NULL, "average-pooling kernel (patches per token side)",
     (void *)2},
    {"compute", (getter)vision_get, NULL, "'bf16' or 'f32': the mode the products run in",
     (void *)3},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot vision_slots[] = {
    {Py_tp_init, vision_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, vision_dealloc},
    {Py_tp_methods, vision_methods},
    {Py_tp_getset, vision_getset},
    {Py_tp_doc, "VisionTower(config, weights): the C SigLIP tower + projector (private)"},
    {0, NULL},
};

static PyType_Spec vision_spec = {
    .name = "gemma3._core.VisionTower",
    .basicsize = sizeof(VisionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = vision_slots,
};

int g3_py_vision_init(PyObject *module, g3_module_state *st)
{
    PyObject *tp = PyType_FromModuleAndSpec(module, &vision_spec, NULL);
    if (!tp)
        return -1;
    int rc = PyModule_AddObjectRef(module, "VisionTower", tp);
    Py_DECREF(tp);
    return rc;
}
