"""Build of gemma3._core: one C11 extension with OpenMP pragmas (on our own runtime, csrc/pool.c),
OpenBLAS and libwebp.

Each required system library is probed with a tiny compile-and-link test before the build so that a
missing one fails with a message naming the Debian package to install, instead of a compiler error
deep in the build log. SIMD variants are compiled with target attributes and chosen at run time, so
no -march flag is used: one build runs on any x86-64.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent.resolve()

# name -> (pkg-config name, probe program, fallback flags, Debian package)
LIBS = {
    "OpenMP": (
        None,
        # the compiler must lower `#pragma omp`; the runtime is ours (csrc/pool.c), not linked
        "int main(void){int s=0;\n#pragma omp parallel for reduction(+:s)\n"
        "for(int i=0;i<4;i++) s+=i;\nreturn s == 6 ? 0 : 1;}\n",
        (["-fopenmp"], []),
        "libgomp1 (part of gcc); or libomp-dev with clang",
    ),
    "OpenBLAS": (
        "openblas",
        "#include <cblas.h>\nint main(void){float a=1,b=1,c=0;"
        "cblas_sgemm(CblasRowMajor,CblasNoTrans,CblasNoTrans,1,1,1,1.f,&a,1,&b,1,0.f,&c,1);"
        "return c == 1.f ? 0 : 1;}\n",
        (["-I/usr/include/x86_64-linux-gnu/openblas-pthread"], ["-lopenblas"]),
        "libopenblas-dev",
    ),
    "libwebp": (
        "libwebp",
        "#include <webp/decode.h>\nint main(void){return WebPGetDecoderVersion() > 0 ? 0 : 1;}\n",
        ([], ["-lwebp"]),
        "libwebp-dev",
    ),
}


def _pkg_config(name):
    if name is None or shutil.which("pkg-config") is None:
        return None
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", name], text=True).split()
        libs = subprocess.check_output(["pkg-config", "--libs", name], text=True).split()
    except subprocess.CalledProcessError:
        return None
    return cflags, libs


def _probe(cc, src, cflags, libs):
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "probe.c"
        c.write_text(src)
        cmd = [cc, str(c), "-o", str(Path(tmp) / "probe"), *cflags, *libs]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def find_libraries():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"
    cflags, libs, missing = [], [], []
    for name, (pc, src, fallback, debpkg) in LIBS.items():
        found = _pkg_config(pc) or fallback
        if not _probe(cc, src, found[0], found[1]):
            missing.append(f"  - {name}: install the Debian package {debpkg} "
                           f"(apt-get install {debpkg.split()[0]})")
            continue
        cflags += found[0]
        libs += found[1]
    if missing:
        sys.exit("gemma3 cannot be built; missing system libraries:\n" + "\n".join(missing))
    return cflags, libs


class BuildExt(build_ext):
    def build_extensions(self):
        import numpy

        cflags, libs = find_libraries()
        for ext in self.extensions:
            ext.include_dirs += [numpy.get_include(), str(HERE / "csrc")]
            ext.extra_compile_args += cflags
            ext.extra_link_args += libs
        super().build_extensions()


def sources():
    return sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").rglob("*.c"))


extra = ["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter",
         "-fno-math-errno", "-D_GNU_SOURCE", "-DNPY_NO_DEPRECATED_API=NPY_1_22_API_VERSION"]
if os.environ.get("G3_WERROR"):
    extra.append("-Werror")
if os.environ.get("G3_SANITIZE"):
    # -O2, not -O1: the SIMD kernels keep their tiles in registers only once loops are unrolled
    # and inlined; at -O1 they spill to the (instrumented) stack and the sanitized suite runs
    # several times slower. ASan's reports are as precise at -O2 (frame pointers kept).
    extra += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O2", "-g"]

setup(
    ext_modules=[
        Extension(
            "gemma3._core",
            sources=sources(),
            extra_compile_args=extra,
            # no -fopenmp here: libgomp is not linked, csrc/pool.c is the OpenMP runtime
            extra_link_args=["-fsanitize=address,undefined"] if os.environ.get("G3_SANITIZE")
            else [],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
