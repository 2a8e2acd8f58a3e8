"""Hugging Face Gemma 3 text checkpoint -> GGUF, laid out as llama.cpp's converter writes it.

Reference: llama-cpp-gemma3.md §3 (keys §3.1, tensors §3.2, converter behaviour §3.3) and §5.1
(tokenizer keys). Conventions decided by that converter and kept here:

* tensor names ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_q_norm,
  attn_k_norm, attn_output, post_attention_norm, ffn_norm, ffn_gate, ffn_up, ffn_down,
  post_ffw_norm}``, ``output_norm``; ``output`` only when the head is not tied;
* matrices keep the HF ``(out, in)`` layout (GGUF ``ne = [in, out]``), no Q/K permutation;
* every RMSNorm weight is stored float32 as ``1 + w`` (Gemma3RMSNorm multiplies by ``1 + w``);
* the sliding-window pattern is not written when it is llama.cpp's default 6.

Our extension: GGUF has no key for ``query_pre_attn_scalar`` (llama.cpp derives the attention
scale from head_dim, or n_embd / n_head for the 27B). When a checkpoint's value differs from
head_dim, ``gemma3.query_pre_attn_scalar`` (f32) is written and ``gemma3.config`` reads it;
llama.cpp ignores the key.
"""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._core import FormatError, UnsupportedError
from .config import Gemma3Config, from_hf_config, layer_types_from_pattern
from .gguf import GGUFWriter
from .loader import Role, _find_hf_prefix, role_of, tensor_roles
from .safetensors import SafetensorsFile

__all__ = ["hf_to_gguf", "hf_to_mmproj_gguf", "tokenizer_metadata"]

# llama.cpp's llama_ftype for the all-one-type files this writes (general.file_type)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15, "Q6_K": 18, "BF16": 32}
# tensor order inside a block, as llama.cpp's converter emits them (HF state-dict order); names
# and conventions come from the role table (csrc/model/roles.c via loader.tensor_roles)
_BLOCK_ORDER = ("attn_norm", "ffn_down", "ffn_gate", "ffn_up", "post_attention_norm",
                "ffn_norm", "post_ffw_norm", "attn_k_norm", "attn_k", "attn_output",
                "attn_q_norm", "attn_q", "attn_v")


def _gguf_value(role: Role, arr: np.ndarray) -> np.ndarray:
    """HF tensor -> what the GGUF stores: 1 + w where HF stores w and GGUF the multiplier."""
    if "add_one" in role.hf_conv and "add_one" not in role.gguf_conv:
        return np.ascontiguousarray(arr, dtype=np.float32) + np.float32(1.0)
    return arr

# GGUF tokenizer.ggml.token_type values
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6


def _open_shards(d: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the shard holding it (index file or every *.safetensors)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        for fn in files:
            if Path(fn).name != fn:
                raise FormatError(f"{index}: shard name {fn!r} must be a plain file name")
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{d}: no *.safetensors files")
    shards = [SafetensorsFile(d / fn) for fn in files]
    return {name: s for s in shards for name in s.tensors}


def _pattern_of(cfg: Gemma3Config) -> int:
    """The period p with layer i global iff (i + 1) % p == 0 that reproduces cfg.layer_types."""
    if cfg.sliding_window <= 0 or all(t == "full_attention" for t in cfg.layer_types):
        return 1
    for p in range(2, cfg.num_layers + 2):
        if layer_types_from_pattern(cfg.num_layers, p, cfg.sliding_window) == cfg.layer_types:
            return p
    raise UnsupportedError(f"layer_types {list(cfg.layer_types)} follow no (i + 1) % p pattern; "
                           "GGUF (as read by llama.cpp and by us) cannot express them")


def _looks_special(text: str) -> bool:
    """llama.cpp converter's does_token_look_special (§5.1)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def tokenizer_metadata(path: str | os.PathLike, vocab_size: int | None = None) -> dict[str, Any]:
    """``tokenizer.*`` GGUF keys from a Hugging Face ``tokenizer.json`` (or ``.json.xz``).

    Laid out as llama.cpp's SentencePiece path writes them for Gemma 3 (§5.1): model "llama",
    byte tokens ``<0xXX>`` BYTE with score 0, normal pieces scored ``-rank`` in id order (what
    SentencePiece's BPE stores), added tokens CONTROL (special or looks special) or USER_DEFINED
    (``▁`` written as a space) with score -1000. ``vocab_size`` truncates to the embedding rows.
    A ``tokenizer_config.json`` beside it supplies add_bos/add_eos and the chat template.
    """
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        j = json.load(f)
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r}, expected BPE")
    vocab: dict[str, int] = model["vocab"]
    added = {a["id"]: a for a in j.get("added_tokens") or []}
    n = 1 + max([*vocab.values(), *added])
    if vocab_size is not None:
        n = min(n, vocab_size)
    tokens = [""] * n
    for text, i in vocab.items():
        if i < n:
            tokens[i] = text
    types = np.full(n, _NORMAL, np.int32)
    scores = np.zeros(n, np.float32)
    rank = 0
    for i in range(n):
        text = tokens[i]
        if i in added:
            a = added[i]
            text = tokens[i] = a["content"]
            if a.get("special") or _looks_special(text):
                types[i] = _CONTROL
            else:
                types[i] = _USER_DEFINED
                tokens[i] = text.replace("\u2581", " ")
            scores[i] = -1000.0
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = _BYTE
        else:
            scores[i] = -float(rank)
            rank += 1

    def find(text):
        return next((i for i, t in enumerate(tokens[:1024]) if t == text), None)

    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
    }
    for key, text in (("bos", "<bos>"), ("eos", "<eos>"), ("unknown", "<unk>"),
                      ("padding", "<pad>")):
        i = find(text)
        if i is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = i
    add_bos, add_eos, template = True, False, None
    tc = path.with_name("tokenizer_config.json")
    if tc.is_file():
        c = json.loads(tc.read_text(encoding="utf-8"))
        add_bos = bool(c.get("add_bos_token", True))
        add_eos = bool(c.get("add_eos_token", False))
        template = c.get("chat_template")
    md["tokenizer.ggml.add_bos_token"] = add_bos
    md["tokenizer.ggml.add_eos_token"] = add_eos
    md["tokenizer.ggml.add_space_prefix"] = False
    if isinstance(template, str):
        md["tokenizer.chat_template"] = template
    return md


def hf_to_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "F32") -> None:
    """Converts a Hugging Face Gemma 3 text checkpoint directory into a GGUF file.

    ``hf_dir``: ``config.json`` + ``model.safetensors`` (or shards with an index); a
    ``tokenizer.json`` there adds the tokenizer keys. ``dtype``: type of the matrices
    ("F32", "F16", "BF16", "Q8_0", ...; rows that are not a multiple of the block stay F32);
    norms are always F32 holding ``1 + w``.
    """
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no config.json in this checkpoint directory")
    hf = json.loads(cfg_path.read_text())
    tc = hf.get("text_config", hf) or {}
    cfg = from_hf_config(hf)
    if tc.get("attn_logit_softcapping") is not None:
        raise UnsupportedError("attn_logit_softcapping is set; Gemma 3 checkpoints never set it")
    dtype = dtype.upper()
    if dtype not in _FILE_TYPE:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPE)}, got {dtype!r}")
    where = _open_shards(d)
    prefix = _find_hf_prefix(set(where))

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise FormatError(f"{d}: tensor {name!r} is missing")
        return where[name].array(name)

    tok_json = d / "tokenizer.json"
    tok_md = tokenizer_metadata(tok_json, cfg.vocab_size) if tok_json.is_file() else {}
    n_vocab = len(tok_md["tokenizer.ggml.tokens"]) if tok_md else cfg.vocab_size

    w = GGUFWriter()
    w.add("general.architecture", "gemma3")
    w.add("general.name", cfg.name or d.name)
    w.add("general.file_type", _FILE_TYPE[dtype], type="UINT32")
    a = "gemma3."
    w.add(a + "context_length", cfg.context_length, type="UINT32")
    w.add(a + "embedding_length", cfg.hidden_size, type="UINT32")
    w.add(a + "block_count", cfg.num_layers, type="UINT32")
    w.add(a + "feed_forward_length", cfg.intermediate_size, type="UINT32")
    w.add(a + "attention.head_count", cfg.num_heads, type="UINT32")
    w.add(a + "attention.head_count_kv", cfg.num_kv_heads, type="UINT32")
    w.add(a + "attention.key_length", cfg.head_dim, type="UINT32")
    w.add(a + "attention.value_length", cfg.head_dim, type="UINT32")
    w.add(a + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps, type="FLOAT32")
    w.add(a + "rope.freq_base", cfg.rope_theta, type="FLOAT32")
    w.add(a + "rope.freq_base_swa", cfg.rope_local_base_freq, type="FLOAT32")
    pattern = _pattern_of(cfg)
    if pattern != 1:
        w.add(a + "attention.sliding_window", cfg.sliding_window, type="UINT32")
        if pattern != 6:  # llama.cpp's default period is 6 and its converter relies on it
            w.add(a + "attention.sliding_window_pattern", pattern, type="UINT32")
    if cfg.rope_scaling_factor != 1.0:
        w.add(a + "rope.scaling.type", "linear")
        w.add(a + "rope.scaling.factor", cfg.rope_scaling_factor, type="FLOAT32")
    if cfg.final_logit_softcapping:
        w.add(a + "final_logit_softcapping", float(cfg.final_logit_softcapping), type="FLOAT32")
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        w.add(a + "query_pre_attn_scalar", cfg.query_pre_attn_scalar, type="FLOAT32")
    for k, v in tok_md.items():
        if k == "tokenizer.ggml.token_type":
            w.add(k, v, elem_type="INT32")
        else:
            w.add(k, v)

    def matrix(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = dtype
        if t not in ("F32", "F16", "BF16") and arr.shape[-1] % 32:  # llama.cpp's fallback
            t = "F32"
        w.add_tensor(name, arr, type=t)

    def tensor(role: Role, i: int | None, arr: np.ndarray) -> None:
        name = role.gguf.format(i=i)
        if role.kind == "vector":  # norms: F32 as llama.cpp writes every 1-D tensor
            w.add_tensor(name, np.ascontiguousarray(_gguf_value(role, arr), dtype=np.float32),
                         type="F32")
        else:
            matrix(name, arr)

    role = role_of("text", "token_embd")
    emb = get(role.hf.format(t=prefix))
    if emb.shape != (cfg.vocab_size, cfg.hidden_size):
        raise FormatError(f"{d}: embed_tokens is {emb.shape}, config says "
                          f"({cfg.vocab_size}, {cfg.hidden_size})")
    matrix(role.gguf, emb[:n_vocab])
    for i in range(cfg.num_layers):
        for ours in _BLOCK_ORDER:
            role = role_of("text", f"blk.{{i}}.{ours}")
            tensor(role, i, get(role.hf.format(t=prefix, i=i)))
    role = role_of("text", "output_norm")
    tensor(role, None, get(role.hf.format(t=prefix)))
    role = role_of("text", "output")
    lm_head = next((n for n in (role.hf, role.hf_alt) if n and n in where), None)
    if lm_head and not tc.get("tie_word_embeddings", hf.get("tie_word_embeddings", True)):
        matrix(role.gguf, get(lm_head)[:n_vocab])
    w.write(out_path)


# ---- vision: llama.cpp mmproj --------------------------------------------------------------------
# Layout of llama.cpp's Gemma3VisionModel converter (llama-cpp-gemma3.md §6.1): general.architecture
# "clip", projector "gemma3", tensors v.* / mm.*, HF fc1 -> ffn_up and fc2 -> ffn_down (current
# files), mm.soft_emb_norm stored as 1 + w, mm.input_projection the HF (D, n_embd_text) matrix as
# is (ne = [n_embd_text, D]); patch and position embeddings F32. Our extension keys
# clip.gemma3.{boi,eoi,image}_token_id record the token ids (llama.cpp ignores them).
# Names and conventions from the vision role table, written in its order (= llama.cpp's).


def hf_to_mmproj_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike,
                      dtype: str = "F16", swap_ffn: bool = False) -> None:
    """Writes the vision tower + projector of a Hugging Face ``Gemma3ForConditionalGeneration``
    directory as a llama.cpp ``mmproj`` GGUF (pair it with :func:`hf_to_gguf`'s text file).

    ``dtype``: type of the encoder matrices and of the projection ("F16" as llama.cpp, "F32",
    "BF16", "Q8_0"; rows that are not a multiple of the block stay F32). ``swap_ffn`` writes the
    old layout (fc1 under ffn_down) that llama.cpp still reads, for compatibility tests.
    """
    from .vision import GEMMA3_VISION_DEFAULTS, _token_ids, _vision_prefixes

    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no config.json in this checkpoint directory")
    hf = json.loads(cfg_path.read_text())
    dtype = dtype.upper()
    if dtype not in _FILE_TYPE:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPE)}, got {dtype!r}")
    where = _open_shards(d)
    vp, pp = _vision_prefixes(where)
    if vp is None or pp is None:
        raise FormatError(f"{d}: no vision tower / multi_modal_projector in this checkpoint")

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise FormatError(f"{d}: tensor {name!r} is missing")
        return np.ascontiguousarray(where[name].array(name), dtype=np.float32)

    vc = dict(GEMMA3_VISION_DEFAULTS)
    vc.update({k: v for k, v in (hf.get("vision_config") or {}).items() if v is not None})
    proj = get(role_of("vision", "mm.input_projection").hf.format(m=pp))
    side = vc["image_size"] // vc["patch_size"]
    merge = side // int(int(hf.get("mm_tokens_per_image", 256)) ** 0.5)
    w = GGUFWriter()
    w.add("general.architecture", "clip")
    w.add("general.name", hf.get("_name_or_path") or d.name)
    w.add("general.file_type", _FILE_TYPE[dtype], type="UINT32")
    w.add("clip.projector_type", "gemma3")
    w.add("clip.has_vision_encoder", True)
    w.add("clip.has_text_encoder", False)
    w.add("clip.use_gelu", True)
    k = "clip.vision."
    w.add(k + "image_size", int(vc["image_size"]), type="UINT32")
    w.add(k + "patch_size", int(vc["patch_size"]), type="UINT32")
    w.add(k + "embedding_length", int(vc["hidden_size"]), type="UINT32")
    w.add(k + "feed_forward_length", int(vc["intermediate_size"]), type="UINT32")
    w.add(k + "block_count", int(vc["num_hidden_layers"]), type="UINT32")
    w.add(k + "attention.head_count", int(vc["num_attention_heads"]), type="UINT32")
    w.add(k + "attention.layer_norm_epsilon", float(vc["layer_norm_eps"]), type="FLOAT32")
    w.add(k + "projection_dim", int(proj.shape[1]), type="UINT32")
    w.add(k + "image_mean", [0.5, 0.5, 0.5], elem_type="FLOAT32")
    w.add(k + "image_std", [0.5, 0.5, 0.5], elem_type="FLOAT32")
    if merge != 4:
        w.add(k + "projector.scale_factor", int(merge), type="UINT32")
    for name, v in _token_ids(hf).items():
        w.add(f"clip.gemma3.{name}", int(v), type="UINT32")

    def matrix(name: str, arr: np.ndarray) -> None:
        t = dtype
        if t not in ("F32", "F16", "BF16") and arr.shape[-1] % 32:
            t = "F32"
        w.add_tensor(name, arr, type=t)

    prefixes = {"v": vp, "m": pp}

    def tensor(role: Role, i: int | None) -> None:
        arr = _gguf_value(role, get(role.hf.format(i=i, **prefixes)))
        name = (role.gguf_alt if swap_ffn and role.gguf_alt else role.gguf).format(i=i)
        if role.key == "mm.input_projection":  # llama.cpp forces F16 for the projection
            w.add_tensor(name, arr, type=dtype if dtype in ("F32", "F16", "BF16") else "F16")
        elif role.kind == "vector" or "keep_f32" in role.hf_conv:
            w.add_tensor(name, arr, type="F32")
        else:
            matrix(name, arr)

    roles = tensor_roles("vision")
    layer_roles = [r for r in roles if r.per_layer]
    for role in roles:
        if not role.per_layer:
            tensor(role, None)
        elif role is layer_roles[0]:  # all blocks where the first per-layer role stands
            for i in range(int(vc["num_hidden_layers"])):
                for lr in layer_roles:
                    tensor(lr, i)
    w.write(out_path)
