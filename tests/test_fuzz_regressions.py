"""Fuzz regression inputs: every file in tests/data/fuzz_regressions/<target>/ must load cleanly.

Each directory holds a small minimized corpus of its fuzz target (tools/fuzz.sh TARGET SECONDS)
plus every input that once crashed or fooled the code (named after the finding). An input passes
when the entry point succeeds or raises one of its documented exceptions.

- tokenizer, chat, image_py: the atheris harness modules themselves (tools/fuzz_<target>.py),
  through the same ``run_one`` the fuzzer calls, so their invariant checks run too.
- gguf, safetensors, image: C harnesses (libFuzzer); here the same C code through the Python API:
  GGUFFile (metadata, tensors, raw views, dequantize), SafetensorsFile (metadata, arrays), and
  for image the same two modes as tools/fuzz_image.c (WebP decode + resize of the picture and its
  pan & scan crops; or a raw resize whose sizes come from a 10-byte header).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import FormatError, UnsupportedError, _core
from gemma3 import image as gimage

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "fuzz_regressions"
TARGETS = ["gguf", "safetensors", "image", "tokenizer", "chat", "image_py"]
MAX_FILES, MAX_BYTES = 50, 16 * 1024


def _files(target: str) -> list[Path]:
    return sorted(p for p in (DATA / target).glob("*") if p.is_file())


def _harness(target: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module(f"fuzz_{target}"), importlib.import_module("fuzz_common")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _gguf(path: Path) -> None:
    try:
        f = gemma3.GGUFFile(path)
    except (FormatError, UnsupportedError):
        return
    f.metadata  # noqa: B018
    for t in f.tensors:
        f.raw(t)
        try:
            f.dequantize(t)
        except UnsupportedError:
            pass


def _safetensors(path: Path) -> None:
    from gemma3.safetensors import SafetensorsFile

    try:
        f = SafetensorsFile(path)
    except (FormatError, UnsupportedError):
        return
    for name, t in f.tensors.items():
        raw = f.raw(name)
        assert raw.nbytes == t.end - t.begin
        if t.dtype in ("BF16", "F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"):
            f.array(name)


def _image(path: Path) -> None:
    """Mirrors tools/fuzz_image.c through _core (same C functions, Python-side buffers)."""
    data = path.read_bytes()
    if gimage._is_webp(data):
        try:
            px = _core.webp_decode(data)
        except (FormatError, UnsupportedError, ValueError):
            return
        dw, dh = 1 + data[-1] % 48, 1 + data[-2] % 48
        min_crop, max_crops = 1 + data[-3] % 64, 2 + data[-4] % 7
        assert _core.image_resize(px, dh, dw).shape == (dh, dw, px.shape[2])
        for crop in gimage.pan_and_scan(px, min_crop, max_crops)[0]:
            _core.image_resize(crop, dh, dw)
        rgb = np.ascontiguousarray(px[..., :3])
        assert _core.image_preprocess(rgb, min(dw, dh)).dtype == np.float32
        return
    if len(data) < 10:
        return
    sw, sh, dw, dh = (int.from_bytes(data[i:i + 2], "little") % 16400 for i in (0, 2, 4, 6))
    c, pad = data[8] % 6, data[9] % 17
    valid = min(sw, sh, dw, dh) >= 1 and max(sw, sh, dw, dh) <= gimage.MAX_SIDE and 1 <= c <= 4
    if not valid or sw * sh > 1 << 18 or dw * dh > 1 << 18:
        return  # the C harness checks rejection; _core refuses these before calling C
    fill = np.frombuffer(data[10:] or bytes(range(256)), np.uint8)
    parent = np.resize(fill, sh * (sw * c + pad)).reshape(sh, sw * c + pad)
    src = parent[:, :sw * c].reshape(sh, sw, c)  # a strided view, like a crop of a wider image
    assert _core.image_resize(src, dh, dw).shape == (dh, dw, c)


_C_ENTRY = {"gguf": _gguf, "safetensors": _safetensors, "image": _image}


def _cases():
    for t in TARGETS:
        for p in _files(t):
            yield pytest.param(t, p, id=f"{t}/{p.name}")


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_is_small(target):
    files = _files(target)
    assert files, f"no regression inputs in {DATA / target}"
    assert len(files) <= MAX_FILES, f"{target}: {len(files)} files; keep a minimized corpus"
    big = [p.name for p in files if p.stat().st_size > MAX_BYTES]
    assert not big, f"{target}: files over {MAX_BYTES} bytes: {big}"


@pytest.mark.parametrize(("target", "path"), list(_cases()))
def test_regression_input(target, path):
    if target in _C_ENTRY:
        _C_ENTRY[target](path)
        return
    if target == "image_py":
        pytest.importorskip("PIL")
    harness, common = _harness(target)
    common.run_one(harness, path.read_bytes())
