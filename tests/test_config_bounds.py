"""Hostile configs: every size a checkpoint declares is range-checked, and cross-checked against
the tensors that carry it, before anything is sized from it; the FormatError names the key.

A config.json with ``num_hidden_layers: 10**12`` once made ``gemma3.load`` build a layer list
forever. Each case here is one edit of the tiny checkpoint (tests/fixtures/tiny/tiny: 8 layers,
width 64, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 512, window 8) or of the tiny mmproj:
huge, zero, negative, non-integer, and consistent-looking but wrong for the tensors. Every case
must fail in well under a second (bounded at 1 s here; they take milliseconds).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

import gemma3
from gemma3.convert import hf_to_gguf

FIX = Path(__file__).parent / "fixtures"
TINY = FIX / "tiny" / "tiny"
MMPROJ = FIX / "tiny_vision" / "mmproj.gguf"
BIG = 10**12

# config.json key -> value -> what the message must say (a regex)
HF_CASES = [
    ("num_hidden_layers", BIG, r"num_hidden_layers = 1000000000000 is out of range"),
    ("num_hidden_layers", 0, r"num_hidden_layers = 0 is out of range"),
    ("num_hidden_layers", -3, r"num_hidden_layers = -3 is out of range"),
    ("num_hidden_layers", 8.5, r"num_hidden_layers must be an integer, got 8.5"),
    ("num_hidden_layers", "8", r"num_hidden_layers must be an integer, got '8'"),
    ("num_hidden_layers", 9, r"num_hidden_layers = 9, but the file has 8 layers"),
    ("num_hidden_layers", 7, r"num_hidden_layers = 7, but the file has more layers"),
    ("hidden_size", BIG, r"hidden_size = 1000000000000 is out of range"),
    ("hidden_size", 0, r"hidden_size = 0 is out of range"),
    ("hidden_size", 65, r"hidden_size \(65\) = 65, but tensor '.*embed_tokens.weight' has 64 col"),
    ("num_attention_heads", BIG, r"num_attention_heads = 1000000000000 is out of range"),
    ("num_attention_heads", 8, r"num_attention_heads \(8\) x head_dim \(16\) = 128, but tensor"),
    ("num_key_value_heads", 3, r"num_attention_heads = 4 is not a multiple of "
                               r"num_key_value_heads = 3"),
    ("num_key_value_heads", -1, r"num_key_value_heads = -1 is out of range"),
    ("head_dim", 15, r"head_dim = 15 must be even"),
    ("head_dim", 1 << 20, r"head_dim = 1048576 is out of range"),
    ("intermediate_size", 1 << 40, r"intermediate_size = 1099511627776 is out of range"),
    ("intermediate_size", 127, r"intermediate_size \(127\) = 127, but tensor"),
    ("vocab_size", BIG, r"vocab_size = 1000000000000 is out of range"),
    ("vocab_size", 0, r"vocab_size = 0 is out of range"),
    ("sliding_window", -8, r"sliding_window = -8 is out of range"),
    ("sliding_window", 1e30, r"sliding_window must be an integer"),
    ("max_position_embeddings", BIG, r"max_position_embeddings = 1000000000000 is out of range"),
    ("max_position_embeddings", 0, r"max_position_embeddings = 0 is out of range"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps = -1e-06 is out of range"),
    ("rms_norm_eps", float("nan"), r"rms_norm_eps = nan is out of range"),
    ("rms_norm_eps", "small", r"rms_norm_eps must be a number"),
    ("query_pre_attn_scalar", 0, r"query_pre_attn_scalar = 0 is out of range"),
    ("final_logit_softcapping", -30.0, r"final_logit_softcapping = -30.0 is out of range"),
    ("bos_token_id", 512, r"bos_token_id = 512 is not below the vocabulary size 512"),
    ("eos_token_id", -1, r"eos_token_id = -1 is out of range"),
    ("layer_types", ["full_attention"] * 3, r"layer_types has 3 entries for 8 layers"),
    ("layer_types", ["global"] * 8, r"layer_types holds 'global'"),
]


def _hf_copy(dst: Path, key: str, value) -> Path:
    dst.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    cfg[key] = value
    if key == "num_hidden_layers":  # else the explicit layer_types list disagrees first
        del cfg["layer_types"]
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").symlink_to(TINY / "model.safetensors")
    return dst


def _refused(path, pattern, **kw) -> None:
    t = time.perf_counter()
    with pytest.raises(gemma3.FormatError, match=pattern):
        gemma3.load(path, **kw)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("key,value,pattern", HF_CASES,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in HF_CASES])
def test_hostile_config_json(tmp_path, key, value, pattern):
    _refused(_hf_copy(tmp_path / "m", key, value), pattern)


def test_rope_scaling_factor_bounded(tmp_path):
    for factor, pat in ((0, "rope_scaling.factor = 0 is out of range"),
                        (float("inf"), "rope_scaling.factor = inf is out of range"),
                        ("x8", "rope_scaling.factor must be a number")):
        d = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        cfg = json.loads((TINY / "config.json").read_text())
        cfg["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": factor,
                                                    "rope_theta": 1e6}
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").symlink_to(TINY / "model.safetensors")
        _refused(d, re.escape(pat))


# ---- GGUF metadata ------------------------------------------------------------------------------

GGUF_CASES = [
    ("gemma3.block_count", BIG, "UINT64", r"gemma3.block_count = 1000000000000 is out of range"),
    ("gemma3.block_count", 0, "UINT32", r"gemma3.block_count = 0 is out of range"),
    ("gemma3.block_count", -1, "INT32", r"gemma3.block_count = -1 is out of range"),
    ("gemma3.block_count", 8.0, "FLOAT32", r"gemma3.block_count must be an integer, got 8.0"),
    ("gemma3.block_count", 9, "UINT32", r"gemma3.block_count = 9, but the file has 8 layers"),
    ("gemma3.embedding_length", 1 << 40, "UINT64",
     r"gemma3.embedding_length = 1099511627776 is out of range"),
    ("gemma3.embedding_length", 128, "UINT32",
     r"gemma3.embedding_length \(128\) = 128, but tensor 'token_embd.weight' has 64 columns"),
    ("gemma3.attention.head_count", 0, "UINT32", r"gemma3.attention.head_count = 0 is out of"),
    ("gemma3.attention.head_count_kv", 3, "UINT32",
     r"gemma3.attention.head_count = 4 is not a multiple of gemma3.attention.head_count_kv = 3"),
    ("gemma3.attention.head_count", 8, "UINT32",
     r"gemma3.attention.head_count \(8\) x gemma3.attention.key_length \(16\) = 128, but "
     r"tensor 'blk.0.attn_q.weight' has 64 rows"),
    ("gemma3.feed_forward_length", BIG, "UINT64",
     r"gemma3.feed_forward_length = 1000000000000 is out of range"),
    ("gemma3.feed_forward_length", "128", "STRING",
     r"gemma3.feed_forward_length must be an integer, got '128'"),
    ("gemma3.attention.sliding_window", 1 << 40, "UINT64",
     r"gemma3.attention.sliding_window = 1099511627776 is out of range"),
    ("gemma3.attention.sliding_window_pattern", BIG, "UINT64",
     r"gemma3.attention.sliding_window_pattern = 1000000000000 is out of range"),
    ("gemma3.context_length", 0, "UINT32", r"gemma3.context_length = 0 is out of range"),
    ("gemma3.attention.layer_norm_rms_epsilon", float("inf"), "FLOAT32",
     r"gemma3.attention.layer_norm_rms_epsilon = inf is out of range"),
    ("gemma3.rope.freq_base", -1.0, "FLOAT32", r"gemma3.rope.freq_base = -1.0 is out of range"),
    ("gemma3.rope.freq_base_swa", 0.0, "FLOAT32", r"gemma3.rope.freq_base_swa = 0.0 is out of"),
    ("tokenizer.ggml.eos_token_id", 1 << 30, "UINT32",
     r"tokenizer.ggml.eos_token_id = 1073741824 is out of range"),
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("g") / "tiny.gguf"
    hf_to_gguf(TINY, p, dtype="F32")
    return p


def _gguf_with(src: Path, dst: Path, key: str, value, vtype: str) -> Path:
    f = gemma3.GGUFFile(src)
    w = gemma3.GGUFWriter(alignment=f.alignment)
    for k, v in f.metadata.items():
        if k not in ("general.alignment", key):
            w.add(k, v)
    w.add(key, value, type=vtype)
    for name, t in f.tensors.items():
        w.add_tensor(name, f.raw(name), type=t.type, raw_shape=t.shape)
    w.write(dst)
    f.close()
    return dst


@pytest.mark.parametrize("key,value,vtype,pattern", GGUF_CASES,
                         ids=[f"{k}={v!r}"[:48] for k, v, _, _ in GGUF_CASES])
def test_hostile_gguf_metadata(tmp_path, tiny_gguf, key, value, vtype, pattern):
    _refused(_gguf_with(tiny_gguf, tmp_path / "m.gguf", key, value, vtype), pattern)


# ---- vision: mmproj metadata and config.json's vision_config ------------------------------------

MMPROJ_CASES = [
    ("clip.vision.block_count", BIG, "UINT64", r"'clip.vision.block_count' = 1000000000000 is out"),
    ("clip.vision.image_size", 0, "UINT32", r"'clip.vision.image_size' = 0 is out of range"),
    ("clip.vision.patch_size", 5, "UINT32", r"is not a multiple of patch_size 5"),
    ("clip.vision.attention.head_count", 7, "UINT32", r"is not a multiple of 7 heads"),
    ("clip.vision.embedding_length", -4, "INT32", r"'clip.vision.embedding_length' = -4 is out"),
    ("clip.vision.attention.layer_norm_epsilon", float("nan"), "FLOAT32",
     r"clip.vision.attention.layer_norm_epsilon = nan is out of range"),
]


@pytest.mark.parametrize("key,value,vtype,pattern", MMPROJ_CASES,
                         ids=[f"{k}={v!r}"[:48] for k, v, _, _ in MMPROJ_CASES])
def test_hostile_mmproj_metadata(tmp_path, key, value, vtype, pattern):
    from gemma3.vision import load_mmproj

    bad = _gguf_with(MMPROJ, tmp_path / "mmproj.gguf", key, value, vtype)
    t = time.perf_counter()
    with pytest.raises(gemma3.FormatError, match=pattern):
        load_mmproj(bad)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("key,value,pattern", [
    ("num_hidden_layers", BIG, r"vision_config.num_hidden_layers = 1000000000000 is out of range"),
    ("hidden_size", 2.5, r"vision_config.hidden_size must be an integer, got 2.5"),
    ("layer_norm_eps", 0, r"vision_config.layer_norm_eps = 0 is out of range"),
])
def test_hostile_vision_config_json(tmp_path, key, value, pattern):
    src = FIX / "tiny_vision" / "hf"
    d = tmp_path / "v"
    shutil.copytree(src, d, symlinks=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"][key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, pattern)


def test_the_model_still_loads_and_runs(tiny_gguf):
    """The bounds are not tighter than the real checkpoints: the tiny models and the real 270M
    load (the suite's other tests run them)."""
    for p in (TINY, tiny_gguf, FIX / "tiny_vision" / "hf"):
        gemma3.load(p).logits([2, 5, 7])
