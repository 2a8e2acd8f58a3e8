/* py_quant.c — placeholder binding table (filled by the quant work). */
#include "py.h"
PyMethodDef g3_py_quant_methods[] = {{NULL, NULL, 0, NULL}};
