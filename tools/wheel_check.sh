#!/bin/sh
# CI for the wheel: builds it (tools/build_wheel.sh), installs it into a fresh venv outside the
# checkout with nothing but that venv on PATH (no compiler, no -dev package in reach), then runs
# the README's smoke test and the suite's fast subset against the installed package, from a copy
# of tests/ (so `import gemma3` cannot find the source tree).
set -eu
cd "$(dirname "$0")/.."
ROOT="$PWD"
sh tools/build_wheel.sh
WHEEL="$(ls "$ROOT"/dist/gemma3-*.whl)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"${PYTHON:-python3}" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip
"$V/python" -m pip install -q "$WHEEL" pytest gguf tokenizers safetensors pillow
cp -r "$ROOT/tests" "$WORK/tests"
printf '[pytest]\nmarkers =\n    slow: long-running tests\n' > "$WORK/pytest.ini"
cd "$WORK"
env -i HOME="$HOME" PATH="$V" "$V/python" - <<'PY'
import shutil, sys
import gemma3, gemma3._core as c
assert shutil.which("cc") is None and shutil.which("gcc") is None, "a compiler is on PATH"
assert "/site-packages/gemma3/" in gemma3.__file__, gemma3.__file__
libs = [ln.split()[-1] for ln in open("/proc/self/maps") if "gemma3.libs" in ln]
assert any("openblas" in p for p in libs), libs
# the thread pool is gemma3's own (csrc/pool.c): no OpenMP runtime is bundled or loaded
assert not any("gomp" in ln or "libomp" in ln for ln in open("/proc/self/maps")), "OpenMP loaded"
print(gemma3.load().generate("Hi", max_new_tokens=8))
print("wheel smoke test: ok,", gemma3.__file__)
PY
env -i HOME="$HOME" PATH="$V" "$V/python" -m pytest -q -p no:cacheprovider \
    tests/test_gguf.py tests/test_kernels.py tests/test_tokenizer.py tests/test_image.py \
    tests/test_config_bounds.py tests/test_threads.py
