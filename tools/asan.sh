#!/usr/bin/env bash
# asan.sh — run the test suite, or any pytest selection, against an ASan/UBSan build of
# gemma3._core.
#
#   tools/asan.sh                                  # the whole suite (tests/)
#   tools/asan.sh --quick                          # a quicker subset (below)
#   tools/asan.sh tests/test_gguf.py -k hostile    # any pytest arguments
#   tools/asan.sh --quick -x                       # --quick, then any pytest arguments (a -k
#                                                  #   given here replaces the subset's -k)
#
# The sanitized extension is built into its own directory (G3_ASAN_DIR, default a temp dir that
# is removed after a clean run), so the normal in-place build (gemma3/_core*.so, build/) is left
# untouched. Exits non-zero if the tests fail or if any sanitizer report was written, even one
# from a subprocess: CLI runs, multiprocessing workers (spawn and fork), notebook kernels and Ray
# workers all inherit the preloaded runtime and the sanitized package.
#
# No test is excluded from the whole-suite run. Adjustments that let every test run here:
#   - tests/test_resources.py's leak loops read ASan's count of live heap bytes instead of RSS
#     (freed blocks sit in ASan's quarantine, so RSS grows without a leak);
#   - allocations the tests expect to fail (a 16 TiB KV cache) return NULL
#     (allocator_may_return_null) and the warning ASan logs for them is not counted as a report;
#   - one suppression, for Ray's setproctitle (see asan.supp below), not gemma3 code.
#
# Measured on the 2-core development machine, build included (40 s):
#   whole suite  1895 passed, no report: 15.7 min of tests (quiet machine). .ci/run runs it.
#                Sanitized builds use -O2 (setup.py), and the packed prefill GEMM runs
#                uninstrumented after checking its whole regions against ASan's shadow
#                (csrc/quant/packed.c, NOSAN): instrumented at -O1 it made the suite run past
#                CI's time limit (a 200-token 270M prefill took 33 s instead of 0.45 s).
#   --quick      1349 passed, no report, 7.9 min with other jobs on the machine (load 2-4; an
#                older count).
# --quick is the whole suite without the tests that run the 270M model (-k "not 270m": the C
# code of the tiny fixtures, on a far larger model) and without four files of Python front ends over
# the same entry points (eval jobs and lm-eval/Ray, notebooks, the CLI, Ctrl-C delivery).
# It keeps the GGUF/safetensors/image readers and their hostile files (including the real 270M
# GGUF), the fuzz regressions, all float/quantized/packed kernels, the tokenizer, the tiny text
# and vision models, argument validation, chat-template security, the leak loops, and threads /
# fork / spawn.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ $# -eq 0 ]; then
    set -- tests
elif [ "$1" = "--quick" ]; then
    shift
    set -- tests -k "not 270m" --ignore=tests/test_eval.py --ignore=tests/test_notebooks.py \
        --ignore=tests/test_cli_api.py --ignore=tests/test_interrupts.py "$@"
fi

# The project's venv when there is one (the one CI builds), else whatever python is on PATH.
PYBIN="${PYTHON:-python}"
[ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PYBIN="$ROOT/.venv/bin/python"

WORK="${G3_ASAN_DIR:-}"
[ -n "$WORK" ] || { WORK="$(mktemp -d /tmp/g3-asan.XXXXXX)"; TEMP_WORK=1; }
LIB="$WORK/lib"         # importable tree: gemma3/*.py + the sanitized _core
LOGS="$WORK/reports"    # one file per process that hit a sanitizer report
mkdir -p "$LIB" "$LOGS"
rm -f "$LOGS"/*

# 1. Build with -fsanitize=address,undefined (setup.py reads G3_SANITIZE) into $WORK only:
#    separate --build-temp (objects) and --build-lib (the .so), never --inplace. --force: a
#    reused G3_ASAN_DIR would otherwise keep a stale .so after a change to a header only.
"$PYBIN" - <<'PYEOF' || exit 2
import sys, setuptools
major = int(setuptools.__version__.split(".")[0])
if major < 77:
    sys.exit(f"asan.sh: setuptools {setuptools.__version__} in {sys.executable} is older than "
             "pyproject.toml's build requirement (>=77); run: "
             f"{sys.executable} -m pip install 'setuptools>=77' (tools/bootstrap.sh does)")
PYEOF
echo "== building the sanitized extension in $WORK"
G3_SANITIZE=1 "$PYBIN" setup.py -q build_ext --force --parallel 2 \
    --build-temp "$WORK/temp" --build-lib "$LIB" >"$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log"
    echo "asan.sh: build failed (log: $WORK/build.log)" >&2
    exit 2
}

# 2. Pair the .so with the current Python sources of the package (working tree, not git HEAD).
for f in gemma3/*.py; do cp "$f" "$LIB/gemma3/"; done
for d in gemma3/*/; do [ -d "$d" ] && cp -r "$d" "$LIB/gemma3/"; done

# 3. The interpreter is not sanitized, so the ASan runtime must be loaded first (LD_PRELOAD).
#    Resolve the real interpreter first: a pyenv shim is a shell script, and its helper processes
#    would otherwise all run under the preloaded runtime.
PY="$("$PYBIN" -c 'import sys; print(sys.executable)')"
LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "asan.sh: libasan not found (gcc -print-file-name)" >&2; exit 2; }
# libstdc++ is preloaded too: the runtime resolves its __cxa_throw interceptor at start-up, and
# when libstdc++ only arrives later (dlopen'd with a C++ extension such as matplotlib's ft2font)
# the first C++ exception aborts with "CHECK failed ... real___cxa_throw != 0".
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so.6)"
[ -f "$LIBSTDCXX" ] || { echo "asan.sh: libstdc++.so.6 not found" >&2; exit 2; }
PRELOAD="$LIBASAN $LIBSTDCXX"

# detect_leaks=0: CPython and NumPy keep allocations until exit by design.
# allocator_may_return_null=1: an impossible allocation (the tests ask for a 16 TiB KV cache)
#   returns NULL, as glibc's does, so the C code's own failure path runs instead of an ASan abort;
#   ASan still logs "WARNING: AddressSanitizer failed to allocate", which step 6 tolerates.
# halt_on_error / abort: the first report ends the process, so pytest fails loudly.
# log_path: reports also land in files, which catches those from child processes.
# suppressions: reports that are not gemma3's, each with its reason (asan.supp below).
cat >"$WORK/asan.supp" <<'SUPP'
# Ray's setproctitle (ray/_raylet.so, spt_setup) strcmp()s argv/environ strings that CPython has
# already freed; seen in every Ray worker once PYTHONMALLOC=malloc lets ASan see that memory.
interceptor_via_fun:spt_setup
SUPP
ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1"
export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$LOGS/asan:suppressions=$WORK/asan.supp"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan"
# GCC links UBSan as its own runtime (libubsan), and with libasan loaded first its log_path never
# takes effect (its start-up call to __sanitizer_set_report_path binds to libasan's copy), so its
# reports would only reach stderr, which tests swallow for their subprocesses. sitecustomize, run
# by every Python process here (children included, through PYTHONPATH), sets libubsan's own path.
cat >"$LIB/sitecustomize.py" <<PY
# Written by tools/asan.sh: UBSan reports of this process go to $LOGS/ubsan.<pid>.
import ctypes

try:
    ctypes.CDLL("libubsan.so.1").__sanitizer_set_report_path(b"$LOGS/ubsan")
except (OSError, AttributeError):
    pass
PY
# PYTHONMALLOC=malloc: Python objects come from malloc, not pymalloc's arenas, so ASan also sees
# the C bindings' misuse of them (a use after Py_DECREF, a write past a bytes buffer).
export PYTHONMALLOC=malloc
export PYTHONPATH="$LIB"
# Same as -P below, but inherited: test subprocesses (`python -m gemma3 ...`, `-c`, notebook
# kernels, multiprocessing spawn workers) run with cwd=$ROOT, where the in-place unsanitized
# gemma3/ would otherwise come before PYTHONPATH on sys.path.
export PYTHONSAFEPATH=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# 4. Check that the sanitized module is the one imported (-P: no cwd on sys.path, so the
#    in-place build in $ROOT/gemma3 cannot shadow it).
LD_PRELOAD="$PRELOAD" "$PY" -P -c "
import sys, gemma3._core as c
assert c.__file__.startswith('$LIB'), c.__file__
print('== using', c.__file__)"

# 5. Run the tests.
status=0
LD_PRELOAD="$PRELOAD" "$PY" -P -m pytest -q -p no:cacheprovider "$@" || status=$?

# 6. Any report file means a sanitizer fired somewhere, whatever pytest said; the only lines
#    tolerated are allocator_may_return_null's warnings (an allocation the code expected to fail).
reports=0
for f in "$LOGS"/*; do
    [ -e "$f" ] || continue
    if grep -qv '^==[0-9]*==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]* bytes$' \
        "$f"; then
        [ "$reports" -eq 0 ] && echo "asan.sh: sanitizer reports:" >&2
        reports=$((reports + 1))
        echo "--- $f" >&2
        head -60 "$f" >&2
    else
        echo "== expected allocation failures ($f): $(wc -l <"$f")"
    fi
done
if [ "$reports" -gt 0 ]; then
    echo "asan.sh: $reports sanitizer report(s) in $LOGS (pytest exit status $status)" >&2
    exit 1
fi
echo "== no sanitizer reports (pytest exit status $status)"
if [ "$status" -eq 0 ] && [ -n "${TEMP_WORK:-}" ]; then rm -rf "$WORK"; fi
exit "$status"
