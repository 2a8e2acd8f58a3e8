/* np.h — include NumPy's C API with one shared API table (imported once in module.c). */
#ifndef G3_NP_H
#define G3_NP_H
#define PY_ARRAY_UNIQUE_SYMBOL g3_ARRAY_API
#ifndef G3_NUMPY_IMPORT
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#endif
