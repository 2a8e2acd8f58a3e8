/* py_tokenizer.c — gemma3._core.Tokenizer: a thin owner of a g3_tokenizer (csrc/text/tokenizer.h).
 *
 *   Tokenizer(tokens: list[bytes], scores: (n,) float32, types: (n,) int32, merges=None)
 *   merges: (n_merges, 2) int32 token ids in rank order switches to Hugging Face rank-based BPE.
 *   encode(data: bytes-like, parse_special: bool) -> (n,) int32     GIL released while encoding
 *   decode(ids: int array-like, render_special: bool) -> bytes
 *   token_bytes(id) -> bytes;  find(text: bytes) -> int (-1 if absent);  len(tokenizer)
 */
#include "py.h"
#include "np.h"
#include "text/tokenizer.h"

#include <stdlib.h>

typedef struct {
    PyObject_HEAD
    g3_tokenizer *tok;
} g3_py_tokenizer;

static g3_module_state *g3_tok_state(PyObject *self)
{
    return g3_py_state_from_type(Py_TYPE(self));
}

static PyObject *g3_tok_raise(PyObject *self, g3_status st, const g3_err *err)
{
    g3_module_state *ms = g3_tok_state(self);
    if (!ms)
        return NULL;
    return g3_py_raise(ms, st, err, NULL);
}

static int g3_tok_init(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "scores", "types", "merges", NULL};
    g3_py_tokenizer *t = (g3_py_tokenizer *)self;
    PyObject *tokens, *scores_o, *types_o, *merges_o = Py_None;
    PyArrayObject *scores = NULL, *types = NULL, *merges = NULL;
    const char **texts = NULL;
    size_t *lens = NULL;
    int ret = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO|O:Tokenizer", kwlist, &PyList_Type, &tokens,
                                     &scores_o, &types_o, &merges_o))
        return -1;
    if (t->tok) {
        PyErr_SetString(PyExc_RuntimeError, "Tokenizer is already initialized");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(tokens);
    if (n <= 0 || n > INT32_MAX / 4) {
        PyErr_Format(PyExc_ValueError, "tokens: vocabulary size %zd out of range", n);
        return -1;
    }
    scores = (PyArrayObject *)PyArray_FROMANY(scores_o, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY_RO);
    if (!scores)
        goto error;
    types = (PyArrayObject *)PyArray_FROMANY(types_o, NPY_INT32, 1, 1, NPY_ARRAY_CARRAY_RO);
    if (!types)
        goto error;
    if (PyArray_DIM(scores, 0) != n || PyArray_DIM(types, 0) != n) {
        PyErr_Format(PyExc_ValueError,
                     "scores (%zd,) and types (%zd,) must have one entry per token (%zd)",
                     (Py_ssize_t)PyArray_DIM(scores, 0), (Py_ssize_t)PyArray_DIM(types, 0), n);
        goto error;
    }
    if (merges_o != Py_None) {
        merges = (PyArrayObject *)PyArray_FROMANY(merges_o, NPY_INT32, 2, 2, NPY_ARRAY_CARRAY_RO);
        if (!merges)
            goto error;
        if (PyArray_DIM(merges, 1) != 2) {
            PyErr_SetString(PyExc_ValueError, "merges must have shape (n_merges, 2)");
            goto error;
        }
    }
    texts = PyMem_Malloc((size_t)n * sizeof *texts);
    lens = PyMem_Malloc((size_t)n * sizeof *lens);
    if (!texts || !lens) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyList_GET_ITEM(tokens, i);
        if (!PyBytes_Check(b)) {
            PyErr_Format(PyExc_TypeError, "tokens[%zd] must be bytes, not %.100s", i,
                         Py_TYPE(b)->tp_name);
            goto error;
        }
        texts[i] = PyBytes_AS_STRING(b);
        lens[i] = (size_t)PyBytes_GET_SIZE(b);
    }
    g3_err err = {0};
    g3_status st = g3_tokenizer_build(&t->tok, (int32_t)n, texts, lens,
                                      (const float *)PyArray_DATA(scores),
                                      (const int32_t *)PyArray_DATA(types), &err);
    if (st == G3_OK && merges)
        st = g3_tokenizer_set_merges(t->tok, (int64_t)PyArray_DIM(merges, 0),
                                     (const int32_t *)PyArray_DATA(merges), &err);
    if (st != G3_OK) {
        g3_tokenizer_free(t->tok);
        t->tok = NULL;
        g3_tok_raise(self, st, &err);
        goto error;
    }
    ret = 0;
error:
    PyMem_Free(texts);
    PyMem_Free(lens);
    Py_XDECREF(scores);
    Py_XDECREF(types);
    Py_XDECREF(merges);
    return ret;
}

static void g3_tok_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    g3_tokenizer_free(((g3_py_tokenizer *)self)->tok);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static g3_tokenizer *g3_tok_get(PyObject *self)
{
    g3_tokenizer *tok = ((g3_py_tokenizer *)self)->tok;
    if (!tok)
        PyErr_SetString(PyExc_RuntimeError, "Tokenizer is not initialized");
    return tok;
}

static PyObject *g3_tok_encode(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "parse_special", NULL};
    Py_buffer buf;
    int parse_special = 0;
    g3_tokenizer *tok = g3_tok_get(self);
    if (!tok)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|p:encode", kwlist, &buf, &parse_special))
        return NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    g3_err err = {0};
    g3_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = g3_tokenizer_encode(tok, buf.buf, (size_t)buf.len, parse_special, &ids, &n, &err);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&buf);
    if (st != G3_OK)
        return g3_tok_raise(self, st, &err);
    npy_intp dim = (npy_intp)n;
    PyObject *out = PyArray_SimpleNew(1, &dim, NPY_INT32);
    if (out && n)
        memcpy(PyArray_DATA((PyArrayObject *)out), ids, n * sizeof *ids);
    free(ids);
    return out;
}

static PyObject *g3_tok_decode(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ids", "render_special", NULL};
    PyObject *ids_o;
    int render_special = 0;
    g3_tokenizer *tok = g3_tok_get(self);
    if (!tok)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:decode", kwlist, &ids_o, &render_special))
        return NULL;
    /* integers only (floats are an error, not truncated), widened to int64 for the range check */
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(ids_o, NULL, 0, 1, 0, NULL);
    if (!a0)
        return NULL;
    if (PyArray_SIZE(a0) > 0 && !PyArray_ISINTEGER(a0) && !PyArray_ISBOOL(a0)) {
        PyErr_Format(PyExc_TypeError, "ids must be integers, got an array of %s",
                     PyArray_DESCR(a0)->typeobj->tp_name);
        Py_DECREF(a0);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY((PyObject *)a0, NPY_INT64, 0, 1,
                                                        NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(a0);
    if (!a)
        return NULL;
    npy_intp n = PyArray_SIZE(a);
    const int64_t *src = (const int64_t *)PyArray_DATA(a);
    int32_t vocab = g3_tokenizer_n_tokens(tok);
    int32_t *ids = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *ids);
    if (!ids) {
        Py_DECREF(a);
        return PyErr_NoMemory();
    }
    for (npy_intp i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= vocab) {
            PyErr_Format(PyExc_ValueError,
                         "token id %lld (at position %zd) out of range for a vocabulary of size %d",
                         (long long)src[i], (Py_ssize_t)i, (int)vocab);
            PyMem_Free(ids);
            Py_DECREF(a);
            return NULL;
        }
        ids[i] = (int32_t)src[i];
    }
    Py_DECREF(a);
    char *out = NULL;
    size_t out_len = 0;
    g3_err err = {0};
    g3_status st = g3_tokenizer_decode(tok, ids, (size_t)n, render_special, &out, &out_len, &err);
    PyMem_Free(ids);
    if (st != G3_OK)
        return g3_tok_raise(self, st, &err);
    PyObject *res = PyBytes_FromStringAndSize(out, (Py_ssize_t)out_len);
    free(out);
    return res;
}

static PyObject *g3_tok_token_bytes(PyObject *self, PyObject *arg)
{
    g3_tokenizer *tok = g3_tok_get(self);
    if (!tok)
        return NULL;
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    int32_t vocab = g3_tokenizer_n_tokens(tok);
    if (id < 0 || id >= vocab)
        return PyErr_Format(PyExc_ValueError,
                            "token id %lld out of range for a vocabulary of size %d", id,
                            (int)vocab);
    const char *text;
    size_t len;
    g3_err err = {0};
    g3_status st = g3_tokenizer_token(tok, (int32_t)id, &text, &len, &err);
    if (st != G3_OK)
        return g3_tok_raise(self, st, &err);
    return PyBytes_FromStringAndSize(text, (Py_ssize_t)len);
}

static PyObject *g3_tok_find(PyObject *self, PyObject *arg)
{
    g3_tokenizer *tok = g3_tok_get(self);
    if (!tok)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    int32_t id = g3_tokenizer_find(tok, buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return PyLong_FromLong(id);
}

static Py_ssize_t g3_tok_len(PyObject *self)
{
    g3_tokenizer *tok = g3_tok_get(self);
    return tok ? g3_tokenizer_n_tokens(tok) : -1;
}

static PyMethodDef g3_tok_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))g3_tok_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(data: bytes, parse_special: bool = False) -> (n,) int32 token ids (no BOS)."},
    {"decode", (PyCFunction)(void (*)(void))g3_tok_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(ids: int array-like, render_special: bool = False) -> bytes."},
    {"token_bytes", g3_tok_token_bytes, METH_O, "token_bytes(id) -> the stored text of a token."},
    {"find", g3_tok_find, METH_O, "find(text: bytes) -> token id, or -1 if no token has it."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot g3_tok_slots[] = {
    {Py_tp_doc, "Tokenizer(tokens: list[bytes], scores: (n,) float32, types: (n,) int32, "
                "merges: (m, 2) int32 | None = None)\n\nPrivate core of gemma3.Tokenizer."},
    {Py_tp_init, g3_tok_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, g3_tok_dealloc},
    {Py_tp_methods, g3_tok_methods},
    {Py_sq_length, g3_tok_len},
    {0, NULL},
};

static PyType_Spec g3_tok_spec = {
    .name = "gemma3._core.Tokenizer",
    .basicsize = sizeof(g3_py_tokenizer),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = g3_tok_slots,
};

PyMethodDef g3_py_tokenizer_methods[] = {{NULL, NULL, 0, NULL}};

int g3_py_tokenizer_init(PyObject *module, g3_module_state *st)
{
    st->TokenizerType = PyType_FromModuleAndSpec(module, &g3_tok_spec, NULL);
    if (!st->TokenizerType)
        return -1;
    return PyModule_AddObjectRef(module, "Tokenizer", st->TokenizerType);
}
