/* py_kernel.c — placeholder binding table (filled by the kernel work). */
#include "py.h"
PyMethodDef g3_py_kernel_methods[] = {{NULL, NULL, 0, NULL}};
