"""Binding checkpoint tensors to the C decoder: GGUF files and Hugging Face directories.

One convention for every format (settled here, nowhere else):

* matrices are ``(rows, cols)`` with ``y = W x`` — GGUF ``ne = [cols, rows]``, HF Linear
  ``[out, in]``; they stay in the file mapping when the C kernels can read their type directly;
* RMSNorm weights are float32 arrays holding the full multiplier ``1 + w``: GGUF files already
  store ``1 + w`` (llama.cpp's converter adds it), Hugging Face checkpoints store ``w`` and get 1
  added here, into memory the model owns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .config import Gemma3Config, from_gguf_metadata, from_hf_config
from .gguf import GGUFFile, ggml_type_id
from .safetensors import SafetensorsFile
from ._core import FormatError, UnsupportedError

NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm",
         "post_ffw_norm")
MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# Hugging Face layer names -> ours
HF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
# prefixes of the text model in HF checkpoints, newest first
HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")

_QUANT_ON_LOAD = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K", "q6_k": "Q6_K", "f16": "F16",
                  "bf16": "BF16", "f32": "F32"}


def _matrix_entry(type_id: int, shape: tuple[int, ...], data: np.ndarray):
    return (type_id, int(shape[0]), int(shape[1]), data)


def _convert_matrix(a: np.ndarray, dtype: str | None) -> tuple[int, np.ndarray]:
    """float32 matrix -> (type_id, bytes) in the requested on-load type (F32 if None)."""
    t = _QUANT_ON_LOAD[dtype] if dtype else "F32"
    tid = ggml_type_id(t)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if t == "F32":
        return tid, a.view(np.uint8).reshape(-1)
    if a.shape[1] % _core.type_info(tid)[2]:
        # row not a multiple of the block: keep the row exact rather than fail
        return ggml_type_id("F32"), a.view(np.uint8).reshape(-1)
    return tid, _core.quantize(tid, a.reshape(-1))


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype.lower() not in _QUANT_ON_LOAD:
        raise ValueError(f"dtype must be one of {sorted(_QUANT_ON_LOAD)} or None, got {dtype!r}")


def load_gguf(path: str, dtype: str | None = None):
    """-> (config, weights dict for _core.Model, metadata, owner objects)"""
    _check_dtype(dtype)
    f = GGUFFile(path)
    md = f.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in f.tensors:
        raise FormatError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = f.tensors["token_embd.weight"].shape[0]
    if tokens is not None and len(tokens) != vocab:
        raise FormatError(f"{path}: {len(tokens)} tokenizer tokens but token_embd has {vocab} rows")
    cfg = from_gguf_metadata(md, vocab)
    w: dict[str, Any] = {}
    for name, t in f.tensors.items():
        if not name.endswith(".weight"):
            continue
        key = name[: -len(".weight")]
        base = key.split(".")[-1]
        if base in NORMS or key == "output_norm":
            w[key] = np.ascontiguousarray(f.dequantize(name).reshape(-1), dtype=np.float32)
        elif base in MATS or key in ("token_embd", "output"):
            if len(t.shape) != 2:
                raise FormatError(f"{path}: tensor {name!r} should be 2-D, has shape {t.shape}")
            can_compute = _core.type_info(t.type_id)[4]
            if dtype is not None or not can_compute:
                if not can_compute:
                    raise UnsupportedError(f"{path}: tensor {name!r} has type {t.type}, which "
                                           "this version cannot compute with")
                tid, data = _convert_matrix(f.dequantize(name), dtype.lower() if dtype else None)
                w[key] = _matrix_entry(tid, t.shape, data)
            else:
                w[key] = _matrix_entry(t.type_id, t.shape, f.raw(name))
    return cfg, w, md, f


def _find_hf_prefix(names: set[str]) -> str:
    for p in HF_TEXT_PREFIXES:
        if f"{p}embed_tokens.weight" in names:
            return p
    raise FormatError("no text-model embedding found (looked for "
                      + ", ".join(f"'{p}embed_tokens.weight'" for p in HF_TEXT_PREFIXES) + ")")


def load_hf_dir(path: str, dtype: str | None = None):
    """Hugging Face checkpoint directory: config.json + model.safetensors or sharded with
    model.safetensors.index.json. Float tensors are converted to F32 (or ``dtype``) on load."""
    _check_dtype(dtype)
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{path}: no config.json in this checkpoint directory")
    hf = json.loads(cfg_path.read_text())
    cfg = from_hf_config(hf)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(wm.values()))
        for fn in files:
            if Path(fn).name != fn:
                raise FormatError(f"{index}: shard name {fn!r} must be a plain file name")
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no *.safetensors files")
    shards = [SafetensorsFile(d / fn) for fn in files]
    where = {name: s for s in shards for name in s.tensors}
    prefix = _find_hf_prefix(set(where))
    w: dict[str, Any] = {}

    def get(name):
        if name not in where:
            raise FormatError(f"{path}: tensor {name!r} is missing")
        return where[name].array(name)

    emb = get(f"{prefix}embed_tokens.weight")
    if emb.shape != (cfg.vocab_size, cfg.hidden_size):
        raise FormatError(f"{path}: embed_tokens is {emb.shape}, config says "
                          f"({cfg.vocab_size}, {cfg.hidden_size})")
    lower = dtype.lower() if dtype else None

    def matrix(a):
        tid, data = _convert_matrix(a, lower)
        return _matrix_entry(tid, a.shape, data)

    w["token_embd"] = matrix(emb)
    lm_head = next((n for n in ("lm_head.weight", "language_model.lm_head.weight") if n in where),
                   None)
    if lm_head and not hf.get("tie_word_embeddings", True):
        w["output"] = matrix(get(lm_head))
    w["output_norm"] = np.ascontiguousarray(get(f"{prefix}norm.weight") + 1.0, dtype=np.float32)
    for i in range(cfg.num_layers):
        for hname, ours in HF_LAYER.items():
            a = get(f"{prefix}layers.{i}.{hname}.weight")
            if ours in NORMS:
                w[f"blk.{i}.{ours}"] = np.ascontiguousarray(a + 1.0, dtype=np.float32)
            else:
                w[f"blk.{i}.{ours}"] = matrix(a)
    return cfg, w, hf, shards


def build_core(cfg: Gemma3Config, weights: dict[str, Any], max_seq: int,
               pack: bool = True) -> _core.Model:
    is_global = bytes(1 if t == "full_attention" else 0 for t in cfg.layer_types)
    return _core.Model(cfg.to_core(max_seq), is_global, weights, pack=pack)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()
