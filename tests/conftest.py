"""Fixtures shared by several test files."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

from gemma3.convert import hf_to_gguf

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
TOKENIZER_JSON = SHARED / "gemma3-tokenizer.json.xz"


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint with the published Gemma 3 tokenizer (truncated by the converter to
    the model's 512 ids: specials, newline/space runs, byte tokens): an HF directory
    (config.json, model.safetensors, tokenizer.json) holding its GGUF conversion, tiny-tok.gguf.
    Built once per session; tests that change it work on a copy."""
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"needs {TOKENIZER_JSON} (the published Gemma 3 tokenizer)")
    d = tmp_path_factory.mktemp("tiny_tok")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(TINY / f, d / f)
    (d / "tokenizer.json").write_bytes(lzma.open(TOKENIZER_JSON).read())
    hf_to_gguf(d, d / "tiny-tok.gguf")
    return d
