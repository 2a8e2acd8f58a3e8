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
    PyObject *TextConfigType;   /* py_roles.c */
    PyObject *VisionConfigType;
} g3_module_state;

extern struct PyModuleDef g3_module_def;

/* Module state from any object whose type was created from the module, or from the module. */
g3_module_state *g3_py_state_from_type(PyTypeObject *tp);
g3_module_state *g3_py_state(PyObject *module);

/* Sets the Python exception matching st (path used for OSError) and returns NULL. */
PyObject *g3_py_raise(g3_module_state *st, g3_status status, const g3_err *err, const char *path);

/* py_roles.c: the C struct inside a _core.TextConfig / _core.VisionConfig, or NULL with a
 * TypeError set. */
struct g3_config_s;
struct g3_vision_config_s;
const struct g3_config_s *g3_py_text_config(g3_module_state *ms, PyObject *o);
const struct g3_vision_config_s *g3_py_vision_config(g3_module_state *ms, PyObject *o);

/* py_weights.c: binds weights[key] for every role of a table (model/roles.h) into the structs:
 * top (the model / tower) and n_layer layers of layer_size bytes at layers. The arrays are
 * appended to keep. A missing optional role with a tie gets the tied role's binding. */
struct g3_role_table_s;
int g3_py_bind_roles(g3_module_state *ms, PyObject *keep, PyObject *weights,
                     const struct g3_role_table_s *t, const int64_t *dims, void *top, void *layers,
                     size_t layer_size, int64_t n_layer);

extern PyMethodDef g3_py_quant_methods[];
extern PyMethodDef g3_py_kernel_methods[];
extern PyMethodDef g3_py_tokenizer_methods[];
extern PyMethodDef g3_py_image_methods[];
int g3_py_gguf_init(PyObject *module, g3_module_state *st);
int g3_py_model_init(PyObject *module, g3_module_state *st);
int g3_py_tokenizer_init(PyObject *module, g3_module_state *st);
int g3_py_safetensors_init(PyObject *module, g3_module_state *st);
int g3_py_vision_init(PyObject *module, g3_module_state *st);
int g3_py_roles_init(PyObject *module, g3_module_state *st);

#endif
