/* util.c — error message formatting shared by the whole core. */
#include <stdarg.h>
#include <stdio.h>

#include "g3.h"

g3_status g3_fail(g3_err *err, g3_status st, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return st;
}
