/* placeholder */
#include "g3.h"
