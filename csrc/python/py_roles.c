/* py_roles.c — what crosses from Python into the C structs: the typed configs and the tensor
 * role table.
 *
 * _core.TextConfig(**fields) / _core.VisionConfig(**fields) hold a g3_config / g3_vision_config.
 * Every field is required and keyword-only; ints must be int (not bool, not float), floats a
 * finite real number (not bool); an unknown or missing field is a TypeError naming it. C keeps
 * no default of its own: the values come from gemma3/config.py and gemma3/vision.py, which know
 * the checkpoint's metadata and the documented fallbacks. The field list below is the struct's
 * (its member type is checked against the struct field by _Generic), read-only attributes too.
 *
 * _core.tensor_roles("text" | "vision") exports the role table of model/roles.c to the loaders.
 */
#include "py.h"

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <structmember.h>

#include "model/roles.h"

_Static_assert(sizeof(long long) == sizeof(int64_t), "T_LONGLONG members hold int64_t fields");

typedef struct {
    PyObject_HEAD
    union {
        g3_config text;
        g3_vision_config vision;
    } c;
} ConfigObject;

#define MEMBER(s, u, f, doc)                                                                       \
    {#f, _Generic(((s *)0)->f, int64_t: T_LONGLONG, float: T_FLOAT),                              \
     offsetof(ConfigObject, c.u.f), READONLY, doc}

static PyMemberDef text_members[] = {
    MEMBER(g3_config, text, n_vocab, "vocabulary size (rows of token_embd)"),
    MEMBER(g3_config, text, n_embd, "model width"),
    MEMBER(g3_config, text, n_layer, "decoder layers"),
    MEMBER(g3_config, text, n_head, "query heads"),
    MEMBER(g3_config, text, n_head_kv, "key/value heads"),
    MEMBER(g3_config, text, head_dim, "width of one head"),
    MEMBER(g3_config, text, n_ff, "MLP width"),
    MEMBER(g3_config, text, window, "sliding-window keys incl. the current one (0 = none)"),
    MEMBER(g3_config, text, max_seq, "positions the KV cache holds"),
    MEMBER(g3_config, text, eps, "RMSNorm epsilon"),
    MEMBER(g3_config, text, attn_scale, "query scale, query_pre_attn_scalar ** -0.5"),
    MEMBER(g3_config, text, embd_scale, "token embedding scale, sqrt(n_embd)"),
    MEMBER(g3_config, text, final_softcap, "final logit soft-capping (0 = off)"),
    MEMBER(g3_config, text, rope_base_global, "RoPE base of global layers"),
    MEMBER(g3_config, text, rope_scale_global, "RoPE frequency scale of global layers"),
    MEMBER(g3_config, text, rope_base_local, "RoPE base of sliding-window layers"),
    MEMBER(g3_config, text, rope_scale_local, "RoPE frequency scale of sliding-window layers"),
    {NULL, 0, 0, 0, NULL},
};

static PyMemberDef vision_members[] = {
    MEMBER(g3_vision_config, vision, image_size, "pixels per image side"),
    MEMBER(g3_vision_config, vision, patch_size, "pixels per patch side"),
    MEMBER(g3_vision_config, vision, n_embd, "tower width"),
    MEMBER(g3_vision_config, vision, n_ff, "tower MLP width"),
    MEMBER(g3_vision_config, vision, n_layer, "tower layers"),
    MEMBER(g3_vision_config, vision, n_head, "tower attention heads"),
    MEMBER(g3_vision_config, vision, n_mm_tokens, "tokens per image after pooling"),
    MEMBER(g3_vision_config, vision, n_embd_text, "projector output width"),
    MEMBER(g3_vision_config, vision, eps, "LayerNorm and projector RMSNorm epsilon"),
    {NULL, 0, 0, 0, NULL},
};
#undef MEMBER

static int set_field(PyObject *self, const char *tname, const PyMemberDef *m, PyObject *v)
{
    char *p = (char *)self + m->offset;
    if (m->type == T_LONGLONG) {
        if (!PyIndex_Check(v) || PyBool_Check(v)) { /* int or NumPy integer; not a float */
            PyErr_Format(PyExc_TypeError, "%s field '%s' must be an int, got %.100s", tname,
                         m->name, Py_TYPE(v)->tp_name);
            return -1;
        }
        PyObject *iv = PyNumber_Index(v);
        if (!iv)
            return -1;
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(iv, &overflow);
        Py_DECREF(iv);
        if (overflow) {
            PyErr_Format(PyExc_ValueError, "%s field '%s' is out of range: %R", tname, m->name,
                         v);
            return -1;
        }
        if (x == -1 && PyErr_Occurred())
            return -1;
        memcpy(p, &x, sizeof x);
        return 0;
    }
    if (PyBool_Check(v) || !PyNumber_Check(v) || PyComplex_Check(v) || PyUnicode_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s field '%s' must be a float, got %.100s", tname, m->name,
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred())
        return -1;
    if (!isfinite(x) || fabs(x) > FLT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s field '%s' must be a finite float32, got %R", tname,
                     m->name, v);
        return -1;
    }
    const float f = (float)x;
    memcpy(p, &f, sizeof f);
    return 0;
}

static int config_fill(PyObject *self, PyObject *args, PyObject *kw, const PyMemberDef *members,
                       const char *tname)
{
    if (PyTuple_GET_SIZE(args)) {
        PyErr_Format(PyExc_TypeError, "%s() takes keyword arguments only", tname);
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (kw && PyDict_Next(kw, &pos, &key, &value)) {
        const char *k = PyUnicode_AsUTF8(key);
        if (!k)
            return -1;
        const PyMemberDef *m = members;
        while (m->name && strcmp(m->name, k))
            m++;
        if (!m->name) {
            PyErr_Format(PyExc_TypeError, "%s() got an unknown field '%s'", tname, k);
            return -1;
        }
    }
    for (const PyMemberDef *m = members; m->name; m++) {
        PyObject *v = kw ? PyDict_GetItemString(kw, m->name) : NULL;
        if (!v) {
            PyErr_Format(PyExc_TypeError, "%s() is missing the required field '%s'", tname,
                         m->name);
            return -1;
        }
        if (set_field(self, tname, m, v) < 0)
            return -1;
    }
    return 0;
}

static int text_init(PyObject *self, PyObject *args, PyObject *kw)
{
    return config_fill(self, args, kw, text_members, "TextConfig");
}

static int vision_init(PyObject *self, PyObject *args, PyObject *kw)
{
    return config_fill(self, args, kw, vision_members, "VisionConfig");
}

static PyObject *config_repr_of(PyObject *self, const PyMemberDef *members, const char *tname)
{
    PyObject *parts = PyList_New(0), *sep = NULL, *body = NULL, *ret = NULL;
    for (const PyMemberDef *m = members; parts && m->name; m++) {
        const char *p = (const char *)self + m->offset;
        PyObject *v;
        if (m->type == T_LONGLONG) {
            long long x;
            memcpy(&x, p, sizeof x);
            v = PyLong_FromLongLong(x);
        } else {
            float x;
            memcpy(&x, p, sizeof x);
            v = PyFloat_FromDouble(x);
        }
        PyObject *s = v ? PyUnicode_FromFormat("%s=%R", m->name, v) : NULL;
        Py_XDECREF(v);
        if (!s || PyList_Append(parts, s) < 0)
            Py_CLEAR(parts);
        Py_XDECREF(s);
    }
    if (parts && (sep = PyUnicode_FromString(", ")) && (body = PyUnicode_Join(sep, parts)))
        ret = PyUnicode_FromFormat("%s(%U)", tname, body);
    Py_XDECREF(parts);
    Py_XDECREF(sep);
    Py_XDECREF(body);
    return ret;
}

static PyObject *text_repr(PyObject *self)
{
    return config_repr_of(self, text_members, "TextConfig");
}

static PyObject *vision_repr(PyObject *self)
{
    return config_repr_of(self, vision_members, "VisionConfig");
}

/* {symbol: value} for the shape symbols [lo, hi) of one family and "1" (model/roles.h) */
static PyObject *dims_dict(const int64_t *dims, int lo, int hi)
{
    PyObject *d = PyDict_New();
    for (int i = lo; d && i <= hi; i++) {
        const int j = i == hi ? G3_DIM_ONE : i;
        PyObject *v = PyLong_FromLongLong(dims[j]);
        if (!v || PyDict_SetItemString(d, g3_dim_names[j], v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyObject *text_dims(PyObject *self, void *unused)
{
    int64_t dims[G3_DIM_N];
    g3_text_dims(&((ConfigObject *)self)->c.text, dims);
    return dims_dict(dims, G3_DIM_VOCAB, G3_DIM_FF + 1);
}

static PyObject *vision_dims(PyObject *self, void *unused)
{
    int64_t dims[G3_DIM_N];
    g3_vision_dims(&((ConfigObject *)self)->c.vision, dims);
    return dims_dict(dims, G3_DIM_V_EMBD, G3_DIM_V_TEXT + 1);
}

static PyGetSetDef text_getset[] = {
    {"dims", text_dims, NULL, "values of the tensor-shape symbols of tensor_roles('text')", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef vision_getset[] = {
    {"dims", vision_dims, NULL, "values of the tensor-shape symbols of tensor_roles('vision')",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static void config_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyType_Slot text_slots[] = {
    {Py_tp_init, text_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, config_dealloc},
    {Py_tp_members, text_members},
    {Py_tp_getset, text_getset},
    {Py_tp_repr, text_repr},
    {Py_tp_doc, "TextConfig(**fields): the text decoder's g3_config; every field required "
                "(private; built by gemma3.config.Gemma3Config.to_core)"},
    {0, NULL},
};

static PyType_Slot vision_slots[] = {
    {Py_tp_init, vision_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, config_dealloc},
    {Py_tp_members, vision_members},
    {Py_tp_getset, vision_getset},
    {Py_tp_repr, vision_repr},
    {Py_tp_doc, "VisionConfig(**fields): the vision tower's g3_vision_config; every field "
                "required (private; built by gemma3.vision.VisionConfig.to_core)"},
    {0, NULL},
};

static PyType_Spec text_spec = {
    .name = "gemma3._core.TextConfig",
    .basicsize = sizeof(ConfigObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = text_slots,
};

static PyType_Spec vision_spec = {
    .name = "gemma3._core.VisionConfig",
    .basicsize = sizeof(ConfigObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = vision_slots,
};

static const g3_config *cast(PyObject *o, PyObject *type, const char *what)
{
    if (!type || !PyObject_TypeCheck(o, (PyTypeObject *)type)) {
        PyErr_Format(PyExc_TypeError, "config must be a gemma3._core.%s, got %.100s", what,
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    return &((ConfigObject *)o)->c.text;
}

const struct g3_config_s *g3_py_text_config(g3_module_state *ms, PyObject *o)
{
    return cast(o, ms->TextConfigType, "TextConfig");
}

const struct g3_vision_config_s *g3_py_vision_config(g3_module_state *ms, PyObject *o)
{
    return cast(o, ms->VisionConfigType, "VisionConfig") ? &((ConfigObject *)o)->c.vision : NULL;
}

/* ---- tensor_roles --------------------------------------------------------------------------- */
static PyObject *conv_names(unsigned conv)
{
    static const struct {
        unsigned flag;
        const char *name;
    } names[] = {{G3_CONV_ADD_ONE, "add_one"},
                 {G3_CONV_FLATTEN, "flatten"},
                 {G3_CONV_TRANSPOSE, "transpose"},
                 {G3_CONV_KEEP_F32, "keep_f32"}};
    PyObject *t = PyTuple_New(0);
    for (size_t i = 0; t && i < sizeof names / sizeof *names; i++) {
        if (!(conv & names[i].flag))
            continue;
        PyObject *s = PyUnicode_FromString(names[i].name);
        if (!s || _PyTuple_Resize(&t, PyTuple_GET_SIZE(t) + 1) < 0) {
            Py_XDECREF(s);
            Py_XDECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, PyTuple_GET_SIZE(t) - 1, s);
    }
    return t;
}

static PyObject *role_dict(const g3_role *r)
{
    PyObject *hf = conv_names(r->hf_conv), *gg = conv_names(r->gguf_conv);
    PyObject *d = hf && gg ? Py_BuildValue(
                                 "{s:s,s:s,s:z,s:s,s:z,s:O,s:s,s:O,s:z,s:(ss),s:O,s:O,s:s,s:n}", "key",
                                 r->key, "gguf", r->gguf, "gguf_alt", r->gguf_alt, "hf", r->hf,
                                 "hf_alt", r->hf_alt, "per_layer",
                                 r->per_layer ? Py_True : Py_False, "kind",
                                 r->kind == G3_ROLE_MATRIX ? "matrix" : "vector", "optional",
                                 r->optional ? Py_True : Py_False, "tie", r->tie, "shape",
                                 g3_dim_names[r->rows], g3_dim_names[r->cols], "hf_conv", hf,
                                 "gguf_conv", gg, "field", r->field, "offset",
                                 (Py_ssize_t)r->offset)
                           : NULL;
    Py_XDECREF(hf);
    Py_XDECREF(gg);
    return d;
}

/* tensor_roles(kind: "text" | "vision") -> tuple of dicts, in table (= file write) order */
static PyObject *py_tensor_roles(PyObject *mod, PyObject *arg)
{
    const char *kind = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!kind) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "kind must be 'text' or 'vision', got %.100s",
                         Py_TYPE(arg)->tp_name);
        return NULL;
    }
    const g3_role_table *t = !strcmp(kind, "text")     ? &g3_text_roles
                             : !strcmp(kind, "vision") ? &g3_vision_roles
                                                       : NULL;
    if (!t)
        return PyErr_Format(PyExc_ValueError, "kind must be 'text' or 'vision', got %R", arg);
    PyObject *out = PyTuple_New(t->n);
    for (int i = 0; out && i < t->n; i++) {
        PyObject *d = role_dict(&t->roles[i]);
        if (!d)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, i, d);
    }
    return out;
}

static PyMethodDef roles_methods[] = {
    {"tensor_roles", py_tensor_roles, METH_O,
     "tensor_roles(kind: 'text' | 'vision') -> tuple of role dicts (csrc/model/roles.c)"},
    {NULL, NULL, 0, NULL},
};

int g3_py_roles_init(PyObject *module, g3_module_state *st)
{
    st->TextConfigType = PyType_FromModuleAndSpec(module, &text_spec, NULL);
    if (!st->TextConfigType || PyModule_AddObjectRef(module, "TextConfig", st->TextConfigType) < 0)
        return -1;
    st->VisionConfigType = PyType_FromModuleAndSpec(module, &vision_spec, NULL);
    if (!st->VisionConfigType ||
        PyModule_AddObjectRef(module, "VisionConfig", st->VisionConfigType) < 0)
        return -1;
    return PyModule_AddFunctions(module, roles_methods);
}
