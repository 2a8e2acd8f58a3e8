#!/usr/bin/env bash
# asan.sh — run a pytest selection against an ASan/UBSan build of gemma3._core.
#
#   tools/asan.sh                                  # tests/test_gguf.py tests/test_quant.py
#   tools/asan.sh tests/test_gguf.py -k hostile    # any pytest arguments
#
# The sanitized extension is built into its own directory (G3_ASAN_DIR, default a temp dir), so
# the normal in-place build (gemma3/_core*.so, build/) is left untouched. Exits non-zero if the
# tests fail or if any sanitizer report was written, even one from a subprocess.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ $# -eq 0 ]; then
    set -- tests/test_gguf.py tests/test_quant.py
fi

WORK="${G3_ASAN_DIR:-$(mktemp -d /tmp/g3-asan.XXXXXX)}"
LIB="$WORK/lib"         # importable tree: gemma3/*.py + the sanitized _core
LOGS="$WORK/reports"    # one file per process that hit a sanitizer report
mkdir -p "$LIB" "$LOGS"
rm -f "$LOGS"/*

# 1. Build with -fsanitize=address,undefined (setup.py reads G3_SANITIZE) into $WORK only:
#    separate --build-temp (objects) and --build-lib (the .so), never --inplace.
echo "== building the sanitized extension in $WORK"
G3_SANITIZE=1 python setup.py -q build_ext --parallel 2 \
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
PY="$(python -c 'import sys; print(sys.executable)')"
LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "asan.sh: libasan not found (gcc -print-file-name)" >&2; exit 2; }

# detect_leaks=0: CPython and NumPy keep allocations until exit by design.
# halt_on_error / abort: the first report ends the process, so pytest fails loudly.
# log_path: reports also land in files, which catches those from child processes.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan"
export PYTHONPATH="$LIB"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# 4. Check that the sanitized module is the one imported (-P: no cwd on sys.path, so the
#    in-place build in $ROOT/gemma3 cannot shadow it).
LD_PRELOAD="$LIBASAN" "$PY" -P -c "
import sys, gemma3._core as c
assert c.__file__.startswith('$LIB'), c.__file__
print('== using', c.__file__)"

# 5. Run the tests.
status=0
LD_PRELOAD="$LIBASAN" "$PY" -P -m pytest -q -p no:cacheprovider "$@" || status=$?

# 6. Any report file means a sanitizer fired somewhere, whatever pytest said.
if compgen -G "$LOGS/*" >/dev/null; then
    echo "asan.sh: sanitizer reports:" >&2
    for f in "$LOGS"/*; do echo "--- $f" >&2; head -60 "$f" >&2; done
    exit 1
fi
echo "== no sanitizer reports (pytest exit status $status)"
exit "$status"
