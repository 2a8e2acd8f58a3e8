/* py_model.c — _core.Model: binds weights given by the Python loader, owns the KV cache, runs
 * forward passes with the GIL released.
 *
 * Model(config: TextConfig, is_global: bytes, weights: dict[key, entry])
 * Keys and shapes are those of the text role table (model/roles.c, _core.tensor_roles("text")):
 * matrices as (type_id, rows, cols, ndarray), float32 vectors as arrays; "output" is optional
 * (tied to token_embd when absent). The arrays are kept referenced for the model's lifetime
 * (they may be views of a file mapping).
 *
 * One call at a time: a second thread entering while a forward runs gets RuntimeError.
 */
#include "py.h"
#include "np.h"

#include <string.h>

#include "kernels/ops.h"
#include "model/model.h"
#include "model/roles.h"
#include "model/run.h"
#include "python/py_hooks.h"
#include "model/state.h"

typedef struct {
    PyObject_HEAD
    g3_model *m;
    PyObject *keep; /* list of arrays whose memory the model points into */
    PyObject *lora_keep; /* list of the active LoRA deltas' A and B arrays, or NULL */
    int busy;
    size_t packed_bytes; /* weights repacked for the integer decode kernels */
} ModelObject;

static g3_module_state *mstate(PyObject *self) { return g3_py_state_from_type(Py_TYPE(self)); }

static int model_init(ModelObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"config", "is_global", "weights", "pack", "kv_type",
                             "prefill_digits", NULL};
    PyObject *cfgo, *weights;
    Py_buffer glob;
    int pack = 1, kv_type = G3_TYPE_F32, digits = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oy*O!|pii", kwlist, &cfgo, &glob, &PyDict_Type,
                                     &weights, &pack, &kv_type, &digits))
        return -1;
    if (digits < 1 || digits > 3) {
        PyBuffer_Release(&glob);
        PyErr_Format(PyExc_ValueError, "prefill_digits must be 1, 2 or 3, got %d", digits);
        return -1;
    }
    g3_module_state *ms = mstate((PyObject *)self);
    g3_config cfg;
    int rc = -1;
    if (self->m) { /* not through done: that would free the live model under its views */
        PyBuffer_Release(&glob);
        PyErr_SetString(PyExc_RuntimeError, "Model already initialised");
        return -1;
    }
    const g3_config *cp = g3_py_text_config(ms, cfgo);
    if (!cp)
        goto done;
    cfg = *cp;
    if (glob.len != cfg.n_layer) {
        PyErr_Format(PyExc_ValueError, "is_global has %zd entries for %lld layers", glob.len,
                     (long long)cfg.n_layer);
        goto done;
    }
    g3_err err = {{0}, 0};
    g3_status st = g3_model_create(&cfg, glob.buf, &self->m, &err);
    if (st) {
        g3_py_raise(ms, st, &err, NULL);
        goto done;
    }
    int64_t dims[G3_DIM_N];
    g3_text_dims(&cfg, dims);
    self->keep = PyList_New(0);
    if (!self->keep || g3_py_bind_roles(ms, self->keep, weights, &g3_text_roles, dims, self->m,
                                        self->m->layers, sizeof *self->m->layers, cfg.n_layer) < 0)
        goto done;
    if ((st = g3_model_check(self->m, &err)) ||
        (st = g3_model_set_kv_type(self->m, kv_type, &err)) ||
        (st = g3_model_set_n_seq(self->m, 1, &err)) ||
        (st = g3_run_reserve_default(self->m, &err))) {
        g3_py_raise(ms, st, &err, NULL);
        goto done;
    }
    if (pack) {
        size_t bytes = 0;
        Py_BEGIN_ALLOW_THREADS st = g3_model_pack(self->m, &bytes, &err);
        Py_END_ALLOW_THREADS
        if (st) {
            g3_py_raise(ms, st, &err, NULL);
            goto done;
        }
        self->packed_bytes = bytes;
    }
    g3_model_set_prefill_digits(self->m, digits);
    rc = 0;
done:
    PyBuffer_Release(&glob);
    if (rc < 0) {
        g3_model_free(self->m);
        self->m = NULL;
        Py_CLEAR(self->keep); /* else a retried __init__ would leak it with every array in it */
    }
    return rc;
}

static void model_dealloc(ModelObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    g3_model_free(self->m);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->lora_keep);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int enter(ModelObject *self)
{
    if (!self->m) {
        PyErr_SetString(PyExc_RuntimeError, "model is not initialised");
        return -1;
    }
    /* The C object's own guard: memory safety against any concurrent caller of this private
     * type. gemma3.engine.Engine serializes the public API with its own lock (and its own,
     * user-facing message), so this one only fires for code that calls _core directly. */
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "_core.Model is busy in another thread (a forward pass or cache operation "
                        "is running); callers of the C model must serialize their calls");
        return -1;
    }
    self->busy = 1;
    return 0;
}

/* Output buffer for a capture field: a writable C-contiguous float32 array of n elements. */
static int capture_buffer(PyObject *d, const char *key, npy_intp n, float **out)
{
    PyObject *o = PyDict_GetItemString(d, key);
    *out = NULL;
    if (!o || o == Py_None)
        return 0;
    PyArrayObject *a = (PyArrayObject *)o;
    if (!PyArray_Check(o) || PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_ISCARRAY(a) ||
        PyArray_SIZE(a) != n) {
        PyErr_Format(PyExc_ValueError,
                     "capture buffer '%s' must be a writable C-contiguous float32 array of %zd "
                     "values",
                     key, (Py_ssize_t)n);
        return -1;
    }
    *out = PyArray_DATA(a);
    return 0;
}

/* capture = {layer: {"pattern", "scores", "q", "k", "v", "z", "resid_pre", "resid_mid",
 *                    "resid_post", "attn_out", "mlp_out": float32 arrays, "heads": int32 array,
 *                    "q0": int, "q1": int}, "final_norm": float32 (T, E)} */
static int parse_capture(ModelObject *self, PyObject *capd, npy_intp T, g3_capture *cap,
                         PyObject *keep)
{
    const g3_config *c = &self->m->cfg;
    const npy_intp E = c->n_embd, K = self->m->seqs[0].n_past + T;
    if (!PyDict_Check(capd)) {
        PyErr_SetString(PyExc_TypeError, "capture must be a dict");
        return -1;
    }
    cap->layers = PyMem_Calloc((size_t)c->n_layer, sizeof *cap->layers);
    if (!cap->layers) {
        PyErr_NoMemory();
        return -1;
    }
    if (capture_buffer(capd, "final_norm", T * E, &cap->final_norm) < 0)
        return -1;
    for (int64_t i = 0; i < c->n_layer; i++) {
        PyObject *key = PyLong_FromLongLong(i);
        PyObject *ld = key ? PyDict_GetItemWithError(capd, key) : NULL;
        Py_XDECREF(key);
        if (!ld) {
            if (PyErr_Occurred())
                return -1;
            continue;
        }
        if (!PyDict_Check(ld)) {
            PyErr_Format(PyExc_TypeError, "capture[%lld] must be a dict", (long long)i);
            return -1;
        }
        g3_layer_capture *lc = &cap->layers[i];
        PyObject *heads = PyDict_GetItemString(ld, "heads");
        PyObject *q0 = PyDict_GetItemString(ld, "q0"), *q1 = PyDict_GetItemString(ld, "q1");
        lc->q0 = q0 ? PyLong_AsLongLong(q0) : 0;
        lc->q1 = q1 ? PyLong_AsLongLong(q1) : T;
        if (PyErr_Occurred())
            return -1;
        if (lc->q0 < 0 || lc->q1 > T || lc->q0 > lc->q1) {
            PyErr_Format(PyExc_ValueError, "query range [%lld, %lld) outside [0, %zd)",
                         (long long)lc->q0, (long long)lc->q1, (Py_ssize_t)T);
            return -1;
        }
        if (heads && heads != Py_None) {
            PyArrayObject *h = (PyArrayObject *)PyArray_FROMANY(heads, NPY_INT32, 1, 1,
                                                                NPY_ARRAY_IN_ARRAY);
            if (!h || PyList_Append(keep, (PyObject *)h) < 0) {
                Py_XDECREF(h);
                return -1;
            }
            Py_DECREF(h);
            lc->heads = PyArray_DATA(h);
            lc->n_heads_sel = PyArray_DIM(h, 0);
            for (npy_intp j = 0; j < lc->n_heads_sel; j++)
                if (lc->heads[j] < 0 || lc->heads[j] >= c->n_head) {
                    PyErr_Format(PyExc_ValueError, "head %d out of range (model has %lld heads)",
                                 lc->heads[j], (long long)c->n_head);
                    return -1;
                }
        }
        const npy_intp att = lc->n_heads_sel * (lc->q1 - lc->q0) * K;
        const npy_intp nq = T * c->n_head * c->head_dim, nkv = T * c->n_head_kv * c->head_dim;
        if (capture_buffer(ld, "pattern", att, &lc->pattern) < 0 ||
            capture_buffer(ld, "scores", att, &lc->scores) < 0 ||
            capture_buffer(ld, "q", nq, &lc->q) < 0 || capture_buffer(ld, "z", nq, &lc->z) < 0 ||
            capture_buffer(ld, "k", nkv, &lc->k) < 0 || capture_buffer(ld, "v", nkv, &lc->v) < 0 ||
            capture_buffer(ld, "resid_pre", T * E, &lc->resid_pre) < 0 ||
            capture_buffer(ld, "resid_mid", T * E, &lc->resid_mid) < 0 ||
            capture_buffer(ld, "resid_post", T * E, &lc->resid_post) < 0 ||
            capture_buffer(ld, "attn_out", T * E, &lc->attn_out) < 0 ||
            capture_buffer(ld, "mlp_out", T * E, &lc->mlp_out) < 0)
            return -1;
    }
    return 0;
}

/* forward(ids: int32 1-D, logits: 0|1|2|3, embd: float32 (T, E) or None, embd_mask: uint8 (T) or
 * None, capture: dict or None, seqs, lens, hooks: see py_hooks.c or None) -> float32 (rows, vocab),
 * int32 (T) arg-max ids (logits=3) or None */
static PyObject *model_forward(ModelObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ids",  "logits", "embd",  "embd_mask", "capture",
                             "seqs", "lens",   "hooks", NULL};
    PyObject *ids_o, *embd_o = Py_None, *mask_o = Py_None, *cap_o = Py_None;
    PyObject *seqs_o = Py_None, *lens_o = Py_None, *hooks_o = Py_None;
    int mode = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iOOOOOO", kwlist, &ids_o, &mode, &embd_o,
                                     &mask_o, &cap_o, &seqs_o, &lens_o, &hooks_o))
        return NULL;
    if (mode < 0 || mode > 3)
        return PyErr_Format(PyExc_ValueError, "logits mode must be 0, 1, 2 or 3, got %d", mode);
    if (enter(self) < 0)
        return NULL;
    PyArrayObject *ids = NULL, *embd = NULL, *mask = NULL, *out = NULL, *seqs = NULL, *lens = NULL;
    PyArrayObject *ids_out = NULL;
    PyObject *ret = NULL, *keep = NULL;
    g3_capture cap = {NULL, NULL};
    g3_py_hooks hk;
    memset(&hk, 0, sizeof hk);
    const g3_config *c = &self->m->cfg;
    ids = (PyArrayObject *)PyArray_FROMANY(ids_o, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (!ids)
        goto done;
    npy_intp T = PyArray_DIM(ids, 0);
    if (embd_o != Py_None) {
        embd = (PyArrayObject *)PyArray_FROMANY(embd_o, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
        mask = embd ? (PyArrayObject *)PyArray_FROMANY(mask_o, NPY_UINT8, 1, 1, NPY_ARRAY_IN_ARRAY)
                    : NULL;
        if (!embd || !mask)
            goto done;
        if (PyArray_DIM(embd, 0) != T || PyArray_DIM(embd, 1) != c->n_embd ||
            PyArray_DIM(mask, 0) != T) {
            PyErr_Format(PyExc_ValueError,
                         "embd must be (%zd, %lld) float32 and embd_mask (%zd,) uint8", (Py_ssize_t)T,
                         (long long)c->n_embd, (Py_ssize_t)T);
            goto done;
        }
    }
    npy_intp n_groups = 1;
    if ((seqs_o == Py_None) != (lens_o == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "seqs and lens go together");
        goto done;
    }
    if (seqs_o != Py_None) {
        seqs = (PyArrayObject *)PyArray_FROMANY(seqs_o, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY);
        lens = seqs ? (PyArrayObject *)PyArray_FROMANY(lens_o, NPY_INT64, 1, 1, NPY_ARRAY_IN_ARRAY)
                    : NULL;
        if (!seqs || !lens)
            goto done;
        n_groups = PyArray_DIM(seqs, 0);
        if (PyArray_DIM(lens, 0) != n_groups || n_groups < 1) {
            PyErr_SetString(PyExc_ValueError, "seqs and lens must have the same non-zero length");
            goto done;
        }
    }
    if (cap_o != Py_None) {
        if (n_groups != 1) {
            PyErr_SetString(PyExc_ValueError, "capture works on single-sequence calls only");
            goto done;
        }
        keep = PyList_New(0);
        if (!keep || parse_capture(self, cap_o, T, &cap, keep) < 0)
            goto done;
    }
    if (hooks_o != Py_None && g3_py_hooks_parse(hooks_o, c, &hk) < 0)
        goto done;
    if (mode) { /* mode 3: scratch rows for the arg-max, which `ids_out` returns */
        npy_intp dims[2] = {mode == 1 ? n_groups : T, c->n_vocab};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!out)
            goto done;
    }
    if (mode == 3 && !(ids_out = (PyArrayObject *)PyArray_SimpleNew(1, &T, NPY_INT32)))
        goto done;
    g3_batch b = {
        .n_tokens = T,
        .ids = PyArray_DATA(ids),
        .embd = embd ? PyArray_DATA(embd) : NULL,
        .embd_mask = mask ? PyArray_DATA(mask) : NULL,
        .logits_mode = mode,
        .logits = out ? PyArray_DATA(out) : NULL,
        .argmax = ids_out ? PyArray_DATA(ids_out) : NULL,
        .capture = cap_o != Py_None ? &cap : NULL,
        .n_groups = n_groups,
        .group_seq = seqs ? PyArray_DATA(seqs) : NULL,
        .group_len = lens ? PyArray_DATA(lens) : NULL,
        .hooks = hooks_o != Py_None ? &hk.h : NULL,
    };
    g3_err err = {{0}, 0};
    g3_status st;
    hk.ts = PyEval_SaveThread(); /* a callback hook takes the GIL back through hk.ts */
    st = g3_model_forward(self->m, &b, &err);
    PyEval_RestoreThread(hk.ts);
    if (g3_py_hooks_finish(&hk) < 0)
        goto done;
    if (st) {
        g3_py_raise(mstate((PyObject *)self), st == G3_ERR_ARG ? G3_ERR_ARG : st, &err, NULL);
        goto done;
    }
    if (ids_out) {
        ret = (PyObject *)ids_out;
        ids_out = NULL;
    } else {
        ret = out ? (PyObject *)out : Py_NewRef(Py_None);
        out = NULL;
    }
done:
    self->busy = 0;
    Py_XDECREF(ids_out);
    PyMem_Free(cap.layers);
    g3_py_hooks_clear(&hk);
    Py_XDECREF(keep);
    Py_XDECREF(seqs);
    Py_XDECREF(lens);
    Py_XDECREF(ids);
    Py_XDECREF(embd);
    Py_XDECREF(mask);
    Py_XDECREF(out);
    return ret;
}

static PyObject *model_reset(ModelObject *self, PyObject *args)
{
    int seq = -1;
    if (!PyArg_ParseTuple(args, "|i", &seq))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    g3_model_reset(self->m, seq);
    self->busy = 0;
    Py_RETURN_NONE;
}

/* set_lora(deltas): deltas is a sequence of (key, A, Bt, scale) — key a per-layer matrix of the
 * role table ("blk.3.attn_q"), A (rank, cols) and Bt = B^T (rank, rows) float32 — replacing the active
 * ones (empty: none). The arrays stay referenced while attached; every sequence's cache empties. */
static PyObject *model_set_lora(ModelObject *self, PyObject *arg)
{
    g3_module_state *ms = mstate((PyObject *)self);
    PyObject *seq = PySequence_Fast(arg, "set_lora() takes a sequence of (key, A, Bt, scale)");
    if (!seq)
        return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *keep = PyList_New(0);
    g3_lora_spec *specs = n ? PyMem_Calloc((size_t)n, sizeof *specs) : NULL;
    PyObject *ret = NULL;
    if (!keep || (n && !specs)) {
        if (n && !specs)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t d = 0; d < n; d++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, d), *key, *ao, *bo;
        double scale;
        if (!PyTuple_Check(it) || !PyArg_ParseTuple(it, "UOOd", &key, &ao, &bo, &scale)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError,
                             "LoRA delta %zd must be a tuple (key, A, Bt, scale)", d);
            goto done;
        }
        PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(ao, NPY_FLOAT32, 2, 2,
                                                            NPY_ARRAY_IN_ARRAY);
        if (!a || PyList_Append(keep, (PyObject *)a) < 0) {
            Py_XDECREF(a);
            goto done;
        }
        Py_DECREF(a);
        PyArrayObject *b = (PyArrayObject *)PyArray_FROMANY(bo, NPY_FLOAT32, 2, 2,
                                                            NPY_ARRAY_IN_ARRAY);
        if (!b || PyList_Append(keep, (PyObject *)b) < 0) {
            Py_XDECREF(b);
            goto done;
        }
        Py_DECREF(b);
        if (!(specs[d].key = PyUnicode_AsUTF8(key)))
            goto done;
        specs[d].A = PyArray_DATA(a);
        specs[d].Bt = PyArray_DATA(b);
        specs[d].a_rows = PyArray_DIM(a, 0);
        specs[d].a_cols = PyArray_DIM(a, 1);
        specs[d].bt_rows = PyArray_DIM(b, 0);
        specs[d].bt_cols = PyArray_DIM(b, 1);
        specs[d].rank = specs[d].a_rows;
        specs[d].scale = (float)scale;
    }
    if (enter(self) < 0)
        goto done;
    g3_err err = {{0}, 0};
    g3_status st = g3_model_set_lora(self->m, specs, n, &err);
    self->busy = 0;
    if (st) {
        g3_py_raise(ms, st, &err, NULL);
        goto done;
    }
    Py_XSETREF(self->lora_keep, n ? keep : NULL); /* the old arrays are no longer pointed into */
    if (n)
        keep = NULL;
    ret = Py_NewRef(Py_None);
done:
    PyMem_Free(specs);
    Py_XDECREF(keep);
    Py_DECREF(seq);
    return ret;
}

static PyObject *model_set_n_seq(ModelObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (enter(self) < 0)
        return NULL;
    g3_err err = {{0}, 0};
    g3_status st = g3_model_set_n_seq(self->m, (int)(n > 4096 ? 4097 : n), &err);
    self->busy = 0;
    if (st)
        return g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
    Py_RETURN_NONE;
}

static PyObject *model_copy_seq(ModelObject *self, PyObject *args)
{
    int src, dst;
    if (!PyArg_ParseTuple(args, "ii", &src, &dst))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    g3_err err = {{0}, 0};
    g3_status st;
    Py_BEGIN_ALLOW_THREADS st = g3_model_copy_seq(self->m, src, dst, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st)
        return g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
    Py_RETURN_NONE;
}

static PyObject *model_seq_n_past(ModelObject *self, PyObject *arg)
{
    long s = PyLong_AsLong(arg);
    if (s == -1 && PyErr_Occurred())
        return NULL;
    if (!self->m || s < 0 || s >= self->m->n_seq)
        return PyErr_Format(PyExc_IndexError, "no sequence %ld", s);
    return PyLong_FromLongLong(self->m->seqs[s].n_past);
}

static PyObject *model_truncate(ModelObject *self, PyObject *arg)
{
    long long n;
    int seq = 0;
    if (!PyArg_ParseTuple(arg, "L|i", &n, &seq))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    int ok = g3_model_truncate(self->m, seq, n);
    self->busy = 0;
    return PyBool_FromLong(ok);
}

/* state_save(seq=0, rings_only=False) -> uint8 array: the sequence's KV state (model/state.h). */
static PyObject *model_state_save(ModelObject *self, PyObject *args)
{
    int seq = 0, rings_only = 0;
    if (!PyArg_ParseTuple(args, "|ip", &seq, &rings_only))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    g3_err err = {{0}, 0};
    const int64_t n = seq >= 0 && seq < self->m->n_seq ? self->m->seqs[seq].n_past : 0;
    npy_intp dims[1] = {(npy_intp)g3_state_bytes(self->m, n, rings_only)};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_UINT8);
    if (!out) {
        self->busy = 0;
        return NULL;
    }
    g3_status st;
    Py_BEGIN_ALLOW_THREADS st = g3_state_save(self->m, seq, rings_only,
                                              PyArray_DATA((PyArrayObject *)out),
                                              (size_t)dims[0], &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st) {
        Py_DECREF(out);
        return g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
    }
    return out;
}

/* state_load(data: bytes-like, n, seq=0, rings_only=False): the sequence holds that state. */
static PyObject *model_state_load(ModelObject *self, PyObject *args)
{
    Py_buffer buf;
    long long n;
    int seq = 0, rings_only = 0;
    if (!PyArg_ParseTuple(args, "y*L|ip", &buf, &n, &seq, &rings_only))
        return NULL;
    if (enter(self) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    g3_err err = {{0}, 0};
    g3_status st;
    Py_BEGIN_ALLOW_THREADS st = g3_state_load(self->m, seq, n, rings_only, buf.buf,
                                              (size_t)buf.len, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&buf);
    if (st)
        return g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
    Py_RETURN_NONE;
}

static PyObject *model_state_bytes(ModelObject *self, PyObject *args)
{
    long long n;
    int rings_only = 0;
    if (!PyArg_ParseTuple(args, "L|p", &n, &rings_only))
        return NULL;
    if (!self->m || n < 0)
        return PyErr_Format(PyExc_ValueError, "state_bytes needs n >= 0 on a live model");
    return PyLong_FromSize_t(g3_state_bytes(self->m, n, rings_only));
}

/* head(x: float32 (n, E), normalize: bool) -> (n, vocab): the LM head (after the final norm when
 * normalize), for the logit lens. */
static PyObject *model_head(ModelObject *self, PyObject *args)
{
    PyObject *xo;
    int normalize = 1;
    if (!PyArg_ParseTuple(args, "O|p", &xo, &normalize))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    const g3_config *c = &self->m->cfg;
    PyObject *ret = NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(xo, NPY_FLOAT32, 2, 2,
                                                        NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
    if (!x)
        goto done;
    if (PyArray_DIM(x, 1) != c->n_embd) {
        PyErr_Format(PyExc_ValueError, "x must be (n, %lld) float32", (long long)c->n_embd);
        goto done;
    }
    npy_intp dims[2] = {PyArray_DIM(x, 0), c->n_vocab};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out)
        goto done;
    g3_err err = {{0}, 0};
    g3_status st = G3_OK;
    float *xd = PyArray_DATA(x);
    g3_matmul_ws ws = {0}; /* its own scratch: any n, and the run state is the forward's */
    Py_BEGIN_ALLOW_THREADS
    if (normalize)
        for (npy_intp r = 0; r < dims[0]; r++)
            g3_rmsnorm_f32(xd + r * c->n_embd, self->m->output_norm, xd + r * c->n_embd,
                           c->n_embd, c->eps);
    g3_matmul_ws_need(&ws, &self->m->output, dims[0], g3_get_threads());
    if (dims[0] > 0 && !(st = g3_matmul_ws_alloc(&ws, &err)))
        st = g3_matmul(&self->m->output, xd, dims[0], PyArray_DATA(out), &ws, &err);
    g3_matmul_ws_free(&ws);
    Py_END_ALLOW_THREADS
    if (st) {
        Py_DECREF(out);
        g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
        goto done;
    }
    ret = (PyObject *)out;
done:
    self->busy = 0;
    Py_XDECREF(x);
    return ret;
}

/* View of a cache buffer keeping the model alive, in the stored type: (n_slots, n_head_kv,
 * head_dim) float32 / float16 / uint16 (bf16 bits), or (n_slots, n_head_kv, head bytes) uint8
 * (q8_0 blocks); gemma3/inspect.py converts to float32. */
static PyObject *cache_view(ModelObject *self, uint8_t *buf, int64_t n_slots)
{
    const g3_model *m = self->m;
    const g3_config *c = &m->cfg;
    npy_intp dims[3] = {n_slots, c->n_head_kv, c->head_dim};
    int npt = NPY_FLOAT32;
    if (m->kv_type == G3_TYPE_F16)
        npt = NPY_FLOAT16;
    else if (m->kv_type == G3_TYPE_BF16)
        npt = NPY_UINT16;
    else if (m->kv_type != G3_TYPE_F32) {
        npt = NPY_UINT8;
        dims[2] = (npy_intp)m->kv_head_bytes;
    }
    PyObject *a = PyArray_New(&PyArray_Type, 3, dims, npt, NULL, buf, 0,
                              NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (!a)
        return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)a, (PyObject *)self) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* kv_buffers(layer) -> (k, v, is_global): the layer's whole cache; slot = position for global
 * layers, position % n_slots for local rings. */
static PyObject *model_kv_buffers(ModelObject *self, PyObject *arg)
{
    long long i = PyLong_AsLongLong(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (!self->m)
        return PyErr_Format(PyExc_RuntimeError, "model is not initialised");
    if (i < 0 || i >= self->m->cfg.n_layer)
        return PyErr_Format(PyExc_IndexError, "layer %lld out of range (%lld layers)", i,
                            (long long)self->m->cfg.n_layer);
    g3_layer *L = &self->m->layers[i];
    PyObject *k = cache_view(self, self->m->seqs[0].k[i], L->n_slots);
    PyObject *v = k ? cache_view(self, self->m->seqs[0].v[i], L->n_slots) : NULL;
    if (!v) {
        Py_XDECREF(k);
        return NULL;
    }
    return Py_BuildValue("(NNO)", k, v, L->is_global ? Py_True : Py_False);
}

static PyObject *model_get_n_past(ModelObject *self, void *c)
{
    return PyLong_FromLongLong(self->m ? self->m->seqs[0].n_past : 0);
}

static PyObject *model_get_n_seq(ModelObject *self, void *c)
{
    return PyLong_FromLong(self->m ? self->m->n_seq : 0);
}

static PyObject *model_get_kv_type(ModelObject *self, void *c)
{
    return PyLong_FromLong(self->m ? self->m->kv_type : G3_TYPE_F32);
}

static PyObject *model_get_cache_bytes(ModelObject *self, void *c)
{
    return PyLong_FromSize_t(self->m ? g3_model_cache_bytes(self->m) : 0);
}

/* profile(enable: bool | None) -> dict of this model's seconds per op since the last call
 * (resets them); enable switches timing on or off (None: unchanged). */
static PyObject *model_profile(ModelObject *self, PyObject *args)
{
    int enable = -1;
    if (!PyArg_ParseTuple(args, "|p", &enable))
        return NULL;
    if (enter(self) < 0)
        return NULL;
    g3_profile *p = &self->m->prof;
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < G3_PROF_N; i++) {
        PyObject *v = PyFloat_FromDouble(p->seconds[i]);
        if (!v || PyDict_SetItemString(d, g3_prof_names[i], v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    if (d) {
        PyObject *f = PyLong_FromLongLong(p->forwards), *t = PyLong_FromLongLong(p->tokens);
        if (!f || !t || PyDict_SetItemString(d, "forwards", f) < 0 ||
            PyDict_SetItemString(d, "tokens", t) < 0)
            Py_CLEAR(d);
        Py_XDECREF(f);
        Py_XDECREF(t);
    }
    int was = p->enabled;
    memset(p, 0, sizeof *p);
    p->enabled = enable < 0 ? was : enable;
    self->busy = 0;
    return d;
}

static PyObject *model_get_run_bytes(ModelObject *self, void *c)
{
    return PyLong_FromSize_t(self->m ? g3_run_bytes(self->m) : 0);
}

/* check_feed(ids: int32 1-D, embd_mask: uint8 (n,) or None, at: int = seq 0's n_past): raises
 * ValueError unless forward() would accept these ids fed to sequence 0 from position `at`: the
 * rule is g3_model_check_tokens, the one forward applies per call. For callers that feed one
 * input in several calls and must refuse it whole before the first call touches the cache. */
static PyObject *model_check_feed(ModelObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ids", "embd_mask", "at", NULL};
    PyObject *ids_o, *mask_o = Py_None;
    long long at = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OL", kwlist, &ids_o, &mask_o, &at))
        return NULL;
    if (!self->m)
        return PyErr_Format(PyExc_RuntimeError, "model is not initialised");
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROMANY(ids_o, NPY_INT32, 1, 1,
                                                          NPY_ARRAY_IN_ARRAY);
    PyArrayObject *mask = NULL;
    PyObject *ret = NULL;
    int entered = 0; /* reading seq 0's n_past needs the guard; an explicit `at` reads config only */
    if (!ids)
        return NULL;
    const npy_intp n = PyArray_DIM(ids, 0);
    if (mask_o != Py_None) {
        mask = (PyArrayObject *)PyArray_FROMANY(mask_o, NPY_UINT8, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (!mask)
            goto done;
        if (PyArray_DIM(mask, 0) != n) {
            PyErr_Format(PyExc_ValueError, "embd_mask must be (%zd,) uint8", (Py_ssize_t)n);
            goto done;
        }
    }
    if (at < 0) {
        if (enter(self) < 0)
            goto done;
        entered = 1;
        at = self->m->seqs[0].n_past;
    }
    g3_err err = {{0}, 0};
    g3_status st = g3_model_check_tokens(self->m, at, PyArray_DATA(ids),
                                         mask ? PyArray_DATA(mask) : NULL, n, &err);
    if (st) {
        g3_py_raise(mstate((PyObject *)self), st, &err, NULL);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    if (entered)
        self->busy = 0;
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    return ret;
}

static PyMethodDef model_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))model_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(ids, logits=1, embd=None, embd_mask=None)"},
    {"reset", (PyCFunction)model_reset, METH_VARARGS,
     "reset(seq=-1): forget the cached positions of one sequence (or all)"},
    {"set_n_seq", (PyCFunction)model_set_n_seq, METH_O, "number of independent KV caches"},
    {"set_lora", (PyCFunction)model_set_lora, METH_O,
     "set_lora([(key, A (rank, cols), Bt (rank, rows), scale), ...]): the active LoRA deltas "
     "(replaces the previous ones; empties every KV cache)"},
    {"seq_n_past", (PyCFunction)model_seq_n_past, METH_O, "positions cached in a sequence"},
    {"copy_seq", (PyCFunction)model_copy_seq, METH_VARARGS,
     "copy_seq(src, dst): dst gets src's cached context"},
    {"head", (PyCFunction)model_head, METH_VARARGS,
     "head(x (n, E), normalize=True) -> (n, vocab) logits of residual vectors"},
    {"kv_buffers", (PyCFunction)model_kv_buffers, METH_O,
     "kv_buffers(layer) -> (k, v, is_global): read-only views of the layer's cache"},
    {"check_feed", (PyCFunction)(void (*)(void))model_check_feed, METH_VARARGS | METH_KEYWORDS,
     "check_feed(ids, embd_mask=None, at=n_past): ValueError unless forward accepts them"},
    {"truncate", (PyCFunction)model_truncate, METH_VARARGS,
     "truncate(n, seq=0) -> bool: keep the first n positions if the local rings allow it"},
    {"state_save", (PyCFunction)model_state_save, METH_VARARGS,
     "state_save(seq=0, rings_only=False) -> uint8 array of the sequence's KV state"},
    {"state_load", (PyCFunction)model_state_load, METH_VARARGS,
     "state_load(data, n, seq=0, rings_only=False): the sequence holds the saved state"},
    {"state_bytes", (PyCFunction)model_state_bytes, METH_VARARGS,
     "state_bytes(n, rings_only=False) -> bytes of a state of n positions"},
    {"profile", (PyCFunction)model_profile, METH_VARARGS,
     "profile(enable=None) -> this model's per-op seconds of forward passes since the last call "
     "(resets)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *model_get_packed_bytes(ModelObject *self, void *c)
{
    return PyLong_FromSize_t(self->m ? self->packed_bytes : 0);
}

static PyObject *model_get_fingerprint(ModelObject *self, void *c)
{
    if (!self->m)
        return PyErr_Format(PyExc_RuntimeError, "model is not initialised");
    return PyLong_FromUnsignedLongLong(g3_state_fingerprint(self->m));
}

static PyGetSetDef model_getset[] = {
    {"fingerprint", (getter)model_get_fingerprint, NULL,
     "64-bit digest of the configuration and weights (what KV states are tied to)", NULL},
    {"packed_bytes", (getter)model_get_packed_bytes, NULL,
     "bytes of weights repacked for the integer decode kernels (0: float decode kernels)", NULL},
    {"n_past", (getter)model_get_n_past, NULL, "positions in the KV cache", NULL},
    {"kv_type", (getter)model_get_kv_type, NULL,
     "ggml type id of the cached K/V (0 f32, 1 f16, 8 q8_0, 30 bf16)", NULL},
    {"cache_bytes", (getter)model_get_cache_bytes, NULL,
     "bytes reserved by one sequence's KV cache", NULL},
    {"n_seq", (getter)model_get_n_seq, NULL, "sequences with a KV cache", NULL},
    {"run_bytes", (getter)model_get_run_bytes, NULL,
     "bytes of forward-pass buffers (grown between calls when a call needs more)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot model_slots[] = {
    {Py_tp_init, model_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, model_dealloc},
    {Py_tp_methods, model_methods},
    {Py_tp_getset, model_getset},
    {Py_tp_doc, "Model(config, is_global, weights): the C decoder (private)"},
    {0, NULL},
};

static PyType_Spec model_spec = {
    .name = "gemma3._core.Model",
    .basicsize = sizeof(ModelObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = model_slots,
};

static PyObject *py_set_threads(PyObject *mod, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > 4096)
        return PyErr_Format(PyExc_ValueError, "n_threads must be 0 (all cores) or 1..4096, got %ld",
                            n);
    g3_set_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *mod, PyObject *unused)
{
    return PyLong_FromLong(g3_get_threads());
}

static PyMethodDef thread_methods[] = {
    {"set_num_threads", py_set_threads, METH_O, "threads for OpenMP and BLAS (0 = all cores)"},
    {"get_num_threads", py_get_threads, METH_NOARGS, "current thread count"},
    {NULL, NULL, 0, NULL},
};

int g3_py_model_init(PyObject *module, g3_module_state *st)
{
    st->ModelType = PyType_FromModuleAndSpec(module, &model_spec, NULL);
    if (!st->ModelType || PyModule_AddObjectRef(module, "Model", st->ModelType) < 0 ||
        PyModule_AddIntConstant(module, "KV_RING_MARGIN", G3_KV_RING_MARGIN) < 0)
        return -1;
    return PyModule_AddFunctions(module, thread_methods);
}
