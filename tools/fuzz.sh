#!/usr/bin/env bash
# fuzz.sh — build and run a libFuzzer harness tools/fuzz_<TARGET>.c under ASan + UBSan.
#
#   tools/fuzz.sh gguf 300        # fuzz the GGUF reader for 5 minutes
#   tools/fuzz.sh safetensors 300 # the safetensors reader
#
# Needs clang with libFuzzer (Debian: apt-get install clang-14 libclang-rt-14-dev). Work files live
# in G3_FUZZ_DIR (default /tmp/g3-fuzz-<TARGET>): the binary, the growing corpus (kept between
# runs), and crash-* / leak-* / timeout-* artifacts. Exits non-zero if the fuzzer found anything;
# a crashing input then belongs in tests/data/gguf_regressions/ once fixed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${1:?usage: tools/fuzz.sh TARGET SECONDS}"
SECONDS_TO_RUN="${2:?usage: tools/fuzz.sh TARGET SECONDS}"
HARNESS="$ROOT/tools/fuzz_${TARGET}.c"
[ -f "$HARNESS" ] || { echo "fuzz.sh: no harness $HARNESS" >&2; exit 2; }

WORK="${G3_FUZZ_DIR:-/tmp/g3-fuzz-$TARGET}"
mkdir -p "$WORK/corpus" "$WORK/seeds" "$WORK/artifacts"

# clang: the newest available, or $CC if it is a clang
CC="${CC:-}"
if [ -z "$CC" ] || ! "$CC" --version 2>/dev/null | grep -q clang; then
    CC="$(command -v clang clang-18 clang-17 clang-16 clang-15 clang-14 2>/dev/null | head -1 || true)"
fi
[ -n "$CC" ] || { echo "fuzz.sh: clang not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 2; }

# 1. Build: the harness + the reader and what it links (error formatting, the type traits table
#    and its kernels). -O1 -g keeps reports readable; the sanitizers abort on the first finding.
#    The harness and the reader are always compiled by clang (coverage-guided, sanitized). A support
#    file clang cannot compile (e.g. an ISA builtin older clangs lack) falls back to gcc without
#    instrumentation, with a note: the reader is still fully covered and sanitized.
SAN=(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
CFLAGS=(-std=c11 -O1 -g -D_GNU_SOURCE -I"$ROOT/csrc")
mkdir -p "$WORK/obj"
rm -f "$WORK"/obj/*.o
echo "== building $WORK/fuzz_$TARGET with $CC"
for src in "$HARNESS" "$ROOT/csrc/io/$TARGET.c" "$ROOT/csrc/io/mmap.c" "$ROOT/csrc/util.c" "$ROOT"/csrc/quant/*.c; do
    obj="$WORK/obj/$(basename "$src" .c).o"
    if ! "$CC" "${CFLAGS[@]}" "${SAN[@]}" -c "$src" -o "$obj" 2>"$obj.err"; then
        case "$src" in
        "$HARNESS" | */io/$TARGET.c) cat "$obj.err" >&2; exit 2 ;;
        esac
        echo "   note: $CC cannot compile ${src#$ROOT/} ($(grep -m1 error: "$obj.err" | cut -c1-100)); using gcc, uninstrumented"
        gcc "${CFLAGS[@]}" -c "$src" -o "$obj"
    fi
done
"$CC" -fsanitize=fuzzer,address,undefined "$WORK"/obj/*.o -lm -lpthread -o "$WORK/fuzz_$TARGET"

# 2. Seeds: small valid files from GGUFWriter plus every known regression input.
if [ "$TARGET" = gguf ]; then
    python "$ROOT/tools/make_fuzz_seeds.py" "$WORK/seeds" >/dev/null
    cp "$ROOT"/tests/data/gguf_regressions/*.gguf "$WORK/seeds/" 2>/dev/null || true
elif [ "$TARGET" = safetensors ]; then
    python -c 'import sys, numpy as np, safetensors.numpy as s
for i, dt in enumerate(["float32", "float16", "int8", "int64", "bool"]):
    t = {"a": np.arange(6).reshape(2, 3).astype(dt), "b\u00e9": np.zeros((0, 2), dt)}
    s.save_file(t, f"{sys.argv[1]}/seed{i}.safetensors", metadata={"format": "pt"})' "$WORK/seeds"
fi

# 3. Fuzz. New inputs go to corpus/, findings to artifacts/. -max_len covers the largest seed.
echo "== fuzzing for $SECONDS_TO_RUN s (corpus $WORK/corpus)"
set +e
ASAN_OPTIONS="detect_leaks=1:abort_on_error=0" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
"$WORK/fuzz_$TARGET" "$WORK/corpus" "$WORK/seeds" \
    -max_total_time="$SECONDS_TO_RUN" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$WORK/artifacts/" >"$WORK/fuzz.log" 2>&1
status=$?
set -e

# 4. Summary: what happened, executions, final coverage (edges) and features, findings.
grep -E 'ERROR|SUMMARY|Test unit written|^Done|INFO: seed corpus' "$WORK/fuzz.log" || true
grep -E '^stat::' "$WORK/fuzz.log" || true
grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$WORK/fuzz.log" | tail -1 || true
if compgen -G "$WORK/artifacts/*" >/dev/null; then
    echo "fuzz.sh: findings:" >&2
    ls -l "$WORK"/artifacts/ >&2
    exit 1
fi
echo "== no crashes (fuzzer exit status $status)"
exit "$status"
