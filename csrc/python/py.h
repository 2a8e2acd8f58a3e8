/* py.h — shared declarations of the CPython binding layer (csrc/python/).
 *
 * Each binding file exports a NULL-terminated PyMethodDef table and, where it defines types, an
 * init hook called from the module's exec slot. Exceptions live in the module state; binding code
 * raises them with g3_py_raise(), which maps a g3_status to the documented Python exception.
 */
#ifndef G3_PY_H
#define G3_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "g3.h"

typedef struct {
    PyObject *FormatError;      /* ValueError subclass */
    PyObject *UnsupportedError; /* NotImplementedError subclass */
    PyObject *GGUFType;
    PyObject *ModelType;
    PyObject *TokenizerType;
} g3_module_state;

extern struct PyModuleDef g3_module_def;

/* Module state from any object whose type was created from the module, or from the module. */
g3_module_state *g3_py_state_from_type(PyTypeObject *tp);
g3_module_state *g3_py_state(PyObject *module);

/* Sets the Python exception matching st (path used for OSError) and returns NULL. */
PyObject *g3_py_raise(g3_module_state *st, g3_status status, const g3_err *err, const char *path);

/* py_weights.c: bind weights[name] into C structs (see there); what names the owner in
 * messages ("model", "vision"). optional: a missing matrix leaves w untouched. */
struct g3_weight_s;
int g3_py_bind_matrix(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
                      const char *name, struct g3_weight_s *w, int optional);
int g3_py_bind_vector(g3_module_state *ms, PyObject *keep, PyObject *weights, const char *what,
                      const char *name, int64_t n, const float **out);

extern PyMethodDef g3_py_quant_methods[];
extern PyMethodDef g3_py_kernel_methods[];
extern PyMethodDef g3_py_tokenizer_methods[];
extern PyMethodDef g3_py_image_methods[];
int g3_py_gguf_init(PyObject *module, g3_module_state *st);
int g3_py_model_init(PyObject *module, g3_module_state *st);
int g3_py_tokenizer_init(PyObject *module, g3_module_state *st);
int g3_py_safetensors_init(PyObject *module, g3_module_state *st);
int g3_py_vision_init(PyObject *module, g3_module_state *st);

#endif
