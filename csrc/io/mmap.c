/* mmap.c — the one read-only file mapping every reader uses (GGUF, safetensors). */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "g3.h"

g3_status g3_map_file(const char *path, const uint8_t **base, uint64_t *size, g3_err *err)
{
    *base = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        err->sys_errno = errno;
        return g3_fail(err, G3_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        err->sys_errno = e;
        return g3_fail(err, G3_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        int e = S_ISDIR(sb.st_mode) ? EISDIR : EINVAL; /* errno is not set here: choose one */
        close(fd);
        err->sys_errno = e;
        return g3_fail(err, G3_ERR_IO, "'%s' is not a regular file: %s", path, strerror(e));
    }
    *size = (uint64_t)sb.st_size;
    if (*size) { /* an empty file has no mapping; readers report it as malformed */
        void *m = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            err->sys_errno = e;
            return g3_fail(err, G3_ERR_IO, "cannot map '%s': %s", path, strerror(e));
        }
        *base = m;
    }
    close(fd);
    return G3_OK;
}

void g3_unmap_file(const uint8_t *base, uint64_t size)
{
    if (base)
        munmap((void *)base, size);
}

uint64_t g3_map_release(const uint8_t *base, uint64_t size, const uint8_t *p, uint64_t n)
{
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (!base || !p || p < base || n > size || (uint64_t)(p - base) > size - n || !page)
        return 0;
    const uintptr_t lo = ((uintptr_t)p + page - 1) / page * page; /* whole pages inside [p, p+n) */
    const uintptr_t hi = ((uintptr_t)p + n) / page * page;
    if (hi <= lo || madvise((void *)lo, hi - lo, MADV_DONTNEED) != 0)
        return 0;
    return (uint64_t)(hi - lo);
}
