#!/usr/bin/env bash
# fuzz_cc.sh — the C compiler tools/fuzz.sh uses to build gemma3._core for the atheris targets.
#
# clang (G3_FUZZ_CLANG) with coverage instrumentation on every compile (-fsanitize=fuzzer-no-link;
# setup.py adds address,undefined under G3_SANITIZE=1), so libFuzzer inside atheris is guided by
# the C code too. OpenMP is gcc's libgomp (clang's libomp is not installed): -fopenmp becomes
# -fopenmp=libgomp, with gcc's omp.h from G3_FUZZ_OMPINC (a copy clang can parse). A file clang
# cannot compile (an ISA builtin older clangs lack) is compiled by gcc without sanitizers, as
# fuzz.sh does for the C targets. Links (-shared) get no sanitizer runtime: the preloaded
# asan_with_fuzzer.so provides it.
set -uo pipefail
CLANG="${G3_FUZZ_CLANG:-clang}"
INC=(-I"${G3_FUZZ_OMPINC:?G3_FUZZ_OMPINC: directory with a clang-compatible omp.h}")
args=()
compile=0
for a in "$@"; do
    case "$a" in
    -fopenmp) args+=(-fopenmp=libgomp) ;;
    -c) compile=1; args+=("$a") ;;
    *) args+=("$a") ;;
    esac
done
[ "$compile" = 1 ] || exec "$CLANG" "${INC[@]}" "${args[@]}"

err="$(mktemp)"
trap 'rm -f "$err"' EXIT
"$CLANG" "${INC[@]}" -fsanitize=fuzzer-no-link "${args[@]}" 2>"$err" && exit 0
plain=()
for a in "$@"; do
    case "$a" in -fsanitize=*) ;; *) plain+=("$a") ;; esac
done
echo "fuzz_cc.sh: $CLANG cannot compile a file ($(grep -m1 error: "$err" | cut -c1-100)); gcc, uninstrumented" >&2
gcc "${plain[@]}"
