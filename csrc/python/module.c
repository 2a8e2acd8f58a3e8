/* module.c — gemma3._core: multi-phase init, module state holding the exception types, and the
 * mapping from g3_status to Python exceptions. */
#include "py.h"
#define G3_NUMPY_IMPORT
#include "np.h"

#include <errno.h>

g3_module_state *g3_py_state(PyObject *module)
{
    return (g3_module_state *)PyModule_GetState(module);
}

g3_module_state *g3_py_state_from_type(PyTypeObject *tp)
{
    PyObject *m = PyType_GetModuleByDef(tp, &g3_module_def);
    return m ? g3_py_state(m) : NULL;
}

PyObject *g3_py_raise(g3_module_state *st, g3_status status, const g3_err *err, const char *path)
{
    const char *msg = err ? err->msg : "unknown error";
    switch (status) {
    case G3_ERR_FORMAT:
        PyErr_SetString(st->FormatError, msg);
        break;
    case G3_ERR_UNSUPPORTED:
        PyErr_SetString(st->UnsupportedError, msg);
        break;
    case G3_ERR_NOMEM:
        PyErr_SetString(PyExc_MemoryError, msg);
        break;
    case G3_ERR_IO: {
        int e = err && err->sys_errno ? err->sys_errno : EIO;
        PyObject *args = Py_BuildValue("(iss)", e, msg, path ? path : "");
        if (args) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        break;
    }
    case G3_ERR_STATE:
        PyErr_SetString(PyExc_RuntimeError, msg);
        break;
    case G3_ERR_INTERRUPTED: /* the checkpoint that stopped the work normally set the error */
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyboardInterrupt, msg);
        break;
    default:
        PyErr_SetString(PyExc_ValueError, msg);
        break;
    }
    return NULL;
}

static int g3_exec(PyObject *m)
{
    g3_module_state *st = g3_py_state(m);
    import_array1(-1);
    st->FormatError = PyErr_NewExceptionWithDoc(
        "gemma3.FormatError", "A checkpoint or input file is malformed.", PyExc_ValueError, NULL);
    if (!st->FormatError || PyModule_AddObjectRef(m, "FormatError", st->FormatError) < 0)
        return -1;
    st->UnsupportedError = PyErr_NewExceptionWithDoc(
        "gemma3.UnsupportedError", "Valid content this version cannot handle.",
        PyExc_NotImplementedError, NULL);
    if (!st->UnsupportedError ||
        PyModule_AddObjectRef(m, "UnsupportedError", st->UnsupportedError) < 0)
        return -1;
    if (PyModule_AddFunctions(m, g3_py_quant_methods) < 0 ||
        PyModule_AddFunctions(m, g3_py_kernel_methods) < 0 ||
        PyModule_AddFunctions(m, g3_py_tokenizer_methods) < 0)
        return -1;
    if (g3_py_roles_init(m, st) < 0 || g3_py_gguf_init(m, st) < 0 ||
        g3_py_model_init(m, st) < 0 || g3_py_tokenizer_init(m, st) < 0 ||
        g3_py_vision_init(m, st) < 0)
        return -1;
    if (g3_py_safetensors_init(m, st) < 0 || PyModule_AddFunctions(m, g3_py_image_methods) < 0)
        return -1;
    return 0;
}

static int g3_traverse(PyObject *m, visitproc visit, void *arg)
{
    g3_module_state *st = g3_py_state(m);
    Py_VISIT(st->FormatError);
    Py_VISIT(st->UnsupportedError);
    Py_VISIT(st->GGUFType);
    Py_VISIT(st->ModelType);
    Py_VISIT(st->TokenizerType);
    Py_VISIT(st->TextConfigType);
    Py_VISIT(st->VisionConfigType);
    return 0;
}

static int g3_clear(PyObject *m)
{
    g3_module_state *st = g3_py_state(m);
    Py_CLEAR(st->FormatError);
    Py_CLEAR(st->UnsupportedError);
    Py_CLEAR(st->GGUFType);
    Py_CLEAR(st->ModelType);
    Py_CLEAR(st->TokenizerType);
    Py_CLEAR(st->TextConfigType);
    Py_CLEAR(st->VisionConfigType);
    return 0;
}

static void g3_free(void *m) { g3_clear((PyObject *)m); }

static PyModuleDef_Slot g3_slots[] = {
    {Py_mod_exec, g3_exec},
    {0, NULL},
};

struct PyModuleDef g3_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gemma3._core",
    .m_doc = "C core of gemma3 (private; use the gemma3 package).",
    .m_size = sizeof(g3_module_state),
    .m_slots = g3_slots,
    .m_traverse = g3_traverse,
    .m_clear = g3_clear,
    .m_free = g3_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&g3_module_def); }
