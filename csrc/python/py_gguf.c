/* py_gguf.c — placeholder. */
#include "py.h"
int g3_py_gguf_init(PyObject *module, g3_module_state *st) { return 0; }
