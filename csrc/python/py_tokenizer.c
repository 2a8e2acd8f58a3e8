/* py_tokenizer.c — placeholder binding table (filled by the tokenizer work). */
#include "py.h"
PyMethodDef g3_py_tokenizer_methods[] = {{NULL, NULL, 0, NULL}};
int g3_py_tokenizer_init(PyObject *module, g3_module_state *st) { return 0; }
