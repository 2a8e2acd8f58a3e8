#!/usr/bin/env bash
# fuzz.sh — fuzz one parser of untrusted bytes for SECONDS and report what was found.
#
#   tools/fuzz.sh gguf 300         # C, libFuzzer: the GGUF reader (csrc/io/gguf.c)
#   tools/fuzz.sh safetensors 300  # C, libFuzzer: the safetensors reader and its JSON header parser
#   tools/fuzz.sh image 300        # C, libFuzzer: WebP probe/decode, bilinear resize, crops, to_chw
#   tools/fuzz.sh tokenizer 300    # Python, atheris: tokenizer.json -> Tokenizer, encode/decode
#   tools/fuzz.sh chat 300         # Python, atheris: chat rendering + prompt-markup tokenization
#   tools/fuzz.sh image_py 300     # Python, atheris: gemma3.image load_image/preprocess of bytes
#   tools/fuzz.sh TARGET --pick    # no fuzzing: refresh tests/data/fuzz_regressions/TARGET/corpus-*
#                                  # with a small cover of the corpus (tools/fuzz_pick.py)
#
# C targets (tools/fuzz_<TARGET>.c) are built with clang under ASan + UBSan and libFuzzer (Debian:
# apt-get install clang-14 libclang-rt-14-dev; image also needs libwebp-dev). Python targets
# (tools/fuzz_<TARGET>.py) run under atheris (pip install atheris) against a build of gemma3._core
# with ASan + UBSan and coverage of its C code (same clang packages; G3_FUZZ_ASAN=0 for the
# installed build); an exception outside the harness's expected list, an AssertionError from its
# invariant checks, a sanitizer report, a crash or a hang is a finding.
# Work files live in G3_FUZZ_DIR (default /tmp/g3-fuzz-<TARGET>): the binary, the seeds, the
# growing corpus (kept between runs), fuzz.log, and crash-* / leak-* / timeout-* / oom-* artifacts.
# Prints executions, final coverage and findings; exits non-zero if the fuzzer found anything.
# A fixed finding belongs in tests/data/fuzz_regressions/<TARGET>/ (run by
# tests/test_fuzz_regressions.py); those files are also seeds of every later run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${1:?usage: tools/fuzz.sh TARGET SECONDS}"
SECONDS_TO_RUN="${2:?usage: tools/fuzz.sh TARGET SECONDS}"
REGRESSIONS="$ROOT/tests/data/fuzz_regressions/$TARGET"
if [ -f "$ROOT/tools/fuzz_${TARGET}.c" ]; then
    KIND=c
    HARNESS="$ROOT/tools/fuzz_${TARGET}.c"
elif [ -f "$ROOT/tools/fuzz_${TARGET}.py" ]; then
    KIND=py
    HARNESS="$ROOT/tools/fuzz_${TARGET}.py"
else
    echo "fuzz.sh: no harness tools/fuzz_${TARGET}.c or .py" >&2
    exit 2
fi

WORK="${G3_FUZZ_DIR:-/tmp/g3-fuzz-$TARGET}"
mkdir -p "$WORK/corpus" "$WORK/seeds" "$WORK/artifacts"

# the project's interpreter: $PYTHON, else the repo's .venv, else python on PATH
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
fi

# libFuzzer options shared by both kinds; -max_len covers the largest seed that matters
MAX_LEN=16384
case "$TARGET" in image | image_py) MAX_LEN=65536 ;; esac
# The unit timeout is wall-clock time: a fuzzer paused with SIGSTOP, or at nice 19 starved by a
# benchmark on every core, saw 1-s inputs "time out" after 45 s and 728 s. G3_FUZZ_TIMEOUT
# (default 1200 s) still catches a hang within a long run; -report_slow_units notes inputs > 10 s
# (slow-unit-* files, listed below but not counted as findings: rerun them to check).
FUZZ_OPTS=(-max_total_time="$SECONDS_TO_RUN" -max_len="$MAX_LEN" -timeout="${G3_FUZZ_TIMEOUT:-1200}"
           -rss_limit_mb=2048
           -report_slow_units=10
           -print_final_stats=1 -artifact_prefix="$WORK/artifacts/")

# clang: the newest available, or $CC if it is a clang
CC="${CC:-}"
if [ -z "$CC" ] || ! "$CC" --version 2>/dev/null | grep -q clang; then
    CC="$(command -v clang clang-18 clang-17 clang-16 clang-15 clang-14 2>/dev/null | head -1 || true)"
fi
[ -n "$CC" ] || { echo "fuzz.sh: clang not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 2; }
PRELOAD=

if [ "$KIND" = c ]; then

    # 1. Build: the harness + the code under test and what it links. -O1 -g keeps reports
    #    readable; the sanitizers abort on the first finding. The harness and the code under test
    #    are always compiled by clang (coverage-guided, sanitized). A support file clang cannot
    #    compile (e.g. an ISA builtin older clangs lack) falls back to gcc without
    #    instrumentation, with a note: the code under test is still fully covered and sanitized.
    case "$TARGET" in
    gguf | safetensors)
        UNDER_TEST="$ROOT/csrc/io/$TARGET.c"
        # quant/ asks kernels/dispatch.c for its ISA level; the dispatcher fills the float table
        SOURCES=("$HARNESS" "$UNDER_TEST" "$ROOT/csrc/io/mmap.c" "$ROOT/csrc/util.c" "$ROOT"/csrc/quant/*.c
                 "$ROOT/csrc/kernels/dispatch.c" "$ROOT/csrc/kernels/vec.c" "$ROOT/csrc/kernels/act.c")
        LIBS=() ;;
    image)
        UNDER_TEST="$ROOT/csrc/vision/image.c"
        SOURCES=("$HARNESS" "$UNDER_TEST" "$ROOT/csrc/util.c")
        LIBS=(-lwebp) ;;  # the system libwebp (libwebp-dev), not instrumented
    *)
        echo "fuzz.sh: no source list for C target $TARGET (add one here)" >&2
        exit 2 ;;
    esac
    SAN=(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
    CFLAGS=(-std=c11 -O1 -g -D_GNU_SOURCE -I"$ROOT/csrc")
    mkdir -p "$WORK/obj"
    rm -f "$WORK"/obj/*.o
    echo "== building $WORK/fuzz_$TARGET with $CC"
    for src in "${SOURCES[@]}"; do
        obj="$WORK/obj/$(basename "$src" .c).o"
        if ! "$CC" "${CFLAGS[@]}" "${SAN[@]}" -c "$src" -o "$obj" 2>"$obj.err"; then
            case "$src" in
            "$HARNESS" | "$UNDER_TEST") cat "$obj.err" >&2; exit 2 ;;
            esac
            echo "   note: $CC cannot compile ${src#$ROOT/} ($(grep -m1 error: "$obj.err" | cut -c1-100)); using gcc, uninstrumented"
            gcc "${CFLAGS[@]}" -c "$src" -o "$obj"
        fi
    done
    "$CC" -fsanitize=fuzzer,address,undefined "$WORK"/obj/*.o "${LIBS[@]}" -lm -lpthread -o "$WORK/fuzz_$TARGET"
    RUN=("$WORK/fuzz_$TARGET")
else
    "$PY" -c 'import atheris' 2>/dev/null || { echo "fuzz.sh: $PY has no atheris (pip install atheris)" >&2; exit 2; }
    # The C code these entry points reach (tokenizer core, WebP decode, resize) is fuzzed too:
    # gemma3._core is rebuilt with clang under ASan + UBSan with coverage instrumentation
    # (tools/fuzz_cc.sh, G3_SANITIZE=1) into G3_FUZZ_ASAN_DIR (shared by the Python targets,
    # incremental, under a lock), paired with a snapshot of the package's Python files, and run
    # with one runtime preloaded that holds both ASan and libFuzzer (atheris then uses that
    # libFuzzer, so C edges count as coverage). G3_FUZZ_ASAN=0 runs the installed gemma3 instead.
    if [ "${G3_FUZZ_ASAN:-1}" != 0 ]; then
        ASAN_DIR="${G3_FUZZ_ASAN_DIR:-/tmp/g3-fuzz-asan}"
        mkdir -p "$ASAN_DIR/ompinc" "$ASAN_DIR/lib"
        echo "== building the sanitized, instrumented extension in $ASAN_DIR"
        (
            flock 9
            # the runtime: ASan (minus its preinit, not allowed in a shared object) + libFuzzer
            if [ ! -f "$ASAN_DIR/asan_with_fuzzer.so" ]; then
                RT="$("$CC" -print-resource-dir)/lib/linux"
                rm -rf "$ASAN_DIR/rt" && mkdir -p "$ASAN_DIR/rt"
                (cd "$ASAN_DIR/rt" && ar x "$RT/libclang_rt.asan-x86_64.a" && rm -f asan_preinit.cpp.o &&
                    ar rcs ../asan_nopreinit.a ./*.o)
                "$CC" -shared -o "$ASAN_DIR/asan_with_fuzzer.so" -Wl,--whole-archive \
                    "$ASAN_DIR/asan_nopreinit.a" "$RT/libclang_rt.fuzzer_no_main-x86_64.a" \
                    "$RT/libclang_rt.asan_cxx-x86_64.a" -Wl,--no-whole-archive \
                    -lpthread -ldl -lrt -lm -lstdc++
            fi
            # gcc's omp.h uses the two-argument malloc attribute older clangs reject
            sed -e 's/, __malloc__ (omp_free)//g' -e 's/__malloc__ (omp_free), //g' \
                "$(gcc -print-file-name=include)/omp.h" >"$ASAN_DIR/ompinc/omp.h"
            cd "$ROOT"
            G3_FUZZ_CLANG="$CC" G3_FUZZ_OMPINC="$ASAN_DIR/ompinc" CC="$ROOT/tools/fuzz_cc.sh" \
                LDSHARED="$ROOT/tools/fuzz_cc.sh -shared" G3_SANITIZE=1 \
                "$PY" setup.py -q build_ext --build-temp "$ASAN_DIR/temp" \
                --build-lib "$ASAN_DIR/lib" >"$ASAN_DIR/build.log" 2>&1 ||
                { tail -30 "$ASAN_DIR/build.log" >&2; exit 2; }
        ) 9>"$ASAN_DIR.lock"
        grep -h 'fuzz_cc.sh:' "$ASAN_DIR/build.log" | sed 's/^/   note: /' || true
        mkdir -p "$WORK/lib/gemma3"
        cp "$ASAN_DIR"/lib/gemma3/_core*.so "$WORK/lib/gemma3/"
        cp "$ROOT"/gemma3/*.py "$WORK/lib/gemma3/"
        PRELOAD="$ASAN_DIR/asan_with_fuzzer.so"
        (cd / && PYTHONPATH="$WORK/lib" LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$PY" -c "
import gemma3._core as c
assert c.__file__.startswith('$WORK/lib'), c.__file__") ||
            { echo "fuzz.sh: the sanitized gemma3._core is not the one imported" >&2; exit 2; }
    fi
    # an executable that runs the harness: libFuzzer re-executes its argv[0] for -merge
    # (fuzz_common.main hands it G3_FUZZ_SELF as argv[0])
    ENVS="G3_FUZZ_SELF=$WORK/harness.sh"
    [ -n "$PRELOAD" ] && ENVS="$ENVS PYTHONPATH=$WORK/lib LD_PRELOAD=$PRELOAD"
    printf '#!/bin/sh\nexec env %s "%s" "%s" "$@"\n' "$ENVS" "$PY" "$HARNESS" >"$WORK/harness.sh"
    chmod +x "$WORK/harness.sh"
    RUN=("$WORK/harness.sh")
    echo "== $HARNESS under atheris with $PY${PRELOAD:+ (ASan + coverage build of gemma3._core)}"
fi

# 2. Seeds: small valid inputs plus every known regression input.
case "$TARGET" in
gguf) "$PY" "$ROOT/tools/make_fuzz_seeds.py" "$WORK/seeds" gguf >/dev/null ;;
image)
    "$PY" "$ROOT/tools/make_fuzz_seeds.py" "$WORK/seeds" image >/dev/null
    cp "$ROOT"/tests/data/images/* "$WORK/seeds/" ;;
image_py)
    "$PY" "$HARNESS" --make-seeds "$WORK/seeds" >/dev/null
    cp "$ROOT"/tests/data/images/* "$WORK/seeds/" ;;
safetensors)
    "$PY" -c 'import sys, numpy as np, safetensors.numpy as s
for i, dt in enumerate(["float32", "float16", "int8", "int64", "bool"]):
    t = {"a": np.arange(6).reshape(2, 3).astype(dt), "b\u00e9": np.zeros((0, 2), dt)}
    s.save_file(t, f"{sys.argv[1]}/seed{i}.safetensors", metadata={"format": "pt"})' "$WORK/seeds" ;;
*) "$PY" "$HARNESS" --make-seeds "$WORK/seeds" >/dev/null ;;  # Python targets write their own
esac
if [ -d "$REGRESSIONS" ]; then
    cp "$REGRESSIONS"/* "$WORK/seeds/" 2>/dev/null || true
fi

LEAKS=1
[ "$KIND" = py ] && LEAKS=0  # CPython keeps allocations until exit by design
export ASAN_OPTIONS="detect_leaks=$LEAKS:abort_on_error=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

# --pick: instead of fuzzing, refresh the regression set from the corpus (merge, then a greedy
# cover of the merged edges and features, files of at most 16 KiB; tools/fuzz_pick.py).
if [ "$SECONDS_TO_RUN" = --pick ]; then
    rm -rf "$WORK/merged" "$WORK/merge.ctl" && mkdir -p "$WORK/merged"
    echo "== merging $WORK/corpus into $WORK/merged"
    "${RUN[@]}" -merge=1 -merge_control_file="$WORK/merge.ctl" -max_len="$MAX_LEN" -timeout=60 \
        -rss_limit_mb=2048 "$WORK/merged" "$WORK/seeds" "$WORK/corpus" >"$WORK/merge.log" 2>&1 ||
        { tail -20 "$WORK/merge.log" >&2; exit 1; }
    grep -E 'MERGE-OUTER: [0-9]+ new files' "$WORK/merge.log" || true
    # 50 files per target in all: the named regression inputs stay, the cover fills the rest
    named=$(find "$REGRESSIONS" -maxdepth 1 -type f ! -name 'corpus-*' 2>/dev/null | wc -l)
    "$PY" "$ROOT/tools/fuzz_pick.py" "$WORK/merge.ctl" "$REGRESSIONS" $((named < 30 ? 50 - named : 20)) 16384
    # what the regression set itself covers (-runs=0: load the inputs, report, stop)
    "${RUN[@]}" -runs=0 -max_len="$MAX_LEN" -timeout=60 -rss_limit_mb=2048 "$REGRESSIONS" 2>&1 |
        grep -oE 'INITED cov: [0-9]+ ft: [0-9]+' | sed "s|^|regression set $REGRESSIONS: |" || true
    exit 0
fi

# 3. Fuzz. New inputs go to corpus/, findings to artifacts/.
echo "== fuzzing for $SECONDS_TO_RUN s (corpus $WORK/corpus)"
set +e
"${RUN[@]}" "$WORK/corpus" "$WORK/seeds" "${FUZZ_OPTS[@]}" >"$WORK/fuzz.log" 2>&1
status=$?
set -e

# 4. Summary: what happened, executions, final coverage (edges) and features, findings.
grep -E 'ERROR|SUMMARY|Uncaught Python exception|Test unit written|^Done|INFO: seed corpus' "$WORK/fuzz.log" || true
grep -E '^stat::' "$WORK/fuzz.log" || true
grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$WORK/fuzz.log" | tail -1 || true
echo "corpus: $(find "$WORK/corpus" -type f | wc -l) files"
if compgen -G "$WORK/artifacts/slow-unit-*" >/dev/null; then
    # not failures: an input that took > 10 s once (often a paused process); rerun to check
    echo "slow units (rerun one with: ${RUN[*]} FILE):"
    ls -l "$WORK"/artifacts/slow-unit-*
fi
if compgen -G "$WORK/artifacts/[!s]*" >/dev/null; then
    echo "fuzz.sh: findings:" >&2
    ls -l "$WORK"/artifacts/[!s]* >&2
    exit 1
fi
echo "== no crashes (fuzzer exit status $status)"
exit "$status"
