/* py_model.c — placeholder. */
#include "py.h"
int g3_py_model_init(PyObject *module, g3_module_state *st) { return 0; }
