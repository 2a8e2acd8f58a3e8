"""Binding checkpoint tensors to the C decoder: GGUF files and Hugging Face directories.

Which tensors exist, their names in each format, their shapes and the conventions applied on load
are one table, csrc/model/roles.c, read here through ``_core.tensor_roles`` (:func:`tensor_roles`)
by the text loaders below and the vision loaders (gemma3/vision.py); the C binding and checks
walk the same table. In short:

* matrices are ``(rows, cols)`` with ``y = W x`` — GGUF ``ne = [cols, rows]``, HF Linear
  ``[out, in]``; they stay in the file mapping when the C kernels can read their type directly;
* RMSNorm weights are float32 arrays holding the full multiplier ``1 + w``: GGUF files already
  store ``1 + w`` (llama.cpp's converter adds it), Hugging Face checkpoints store ``w`` and get 1
  added (role convention ``add_one``), into memory the model owns.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import _core
from .config import INT_LIMITS, Gemma3Config, from_gguf_metadata, from_hf_config
from .gguf import GGUFFile, ggml_type_id
from .safetensors import SafetensorsFile
from ._core import FormatError, UnsupportedError

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


# -- the tensor role table (csrc/model/roles.c), read by every loader ----------------------------
@dataclass(frozen=True)
class Role:
    """One tensor role: ``key`` names it in the weights dict given to the C core (``{i}`` = layer);
    ``gguf``/``gguf_alt`` and ``hf``/``hf_alt`` are its file names (HF prefixes ``{t}`` text,
    ``{v}`` vision tower, ``{m}`` projector); ``shape`` the expected ``(rows, cols)`` as symbols
    of ``TextConfig.dims``/``VisionConfig.dims``; ``*_conv`` the conventions applied on load from
    that format (``add_one``, ``flatten``, ``transpose``, ``keep_f32``)."""

    key: str
    gguf: str
    gguf_alt: str | None
    hf: str
    hf_alt: str | None
    per_layer: bool
    kind: str  # "matrix" | "vector"
    optional: bool
    tie: str | None
    shape: tuple[str, str]
    hf_conv: frozenset[str]
    gguf_conv: frozenset[str]
    field: str  # the C struct field it binds, e.g. "g3_layer.q"
    offset: int


@functools.cache
def tensor_roles(kind: str) -> tuple[Role, ...]:
    """The role table of ``kind`` ("text" | "vision"), in table (= file write) order."""
    return tuple(Role(**{**d, "hf_conv": frozenset(d["hf_conv"]),
                         "gguf_conv": frozenset(d["gguf_conv"])})
                 for d in _core.tensor_roles(kind))


def role_of(kind: str, key: str) -> Role:
    """The role of ``kind`` keyed ``key`` (e.g. "token_embd", "blk.{i}.attn_q")."""
    return next(r for r in tensor_roles(kind) if r.key == key)


def build_weights(kind: str, dims: dict[str, int], n_layer: int,
                  entry: Callable[[Role, int | None, tuple[int, int]], Any]) -> dict[str, Any]:
    """The weights dict for the C core: ``entry(role, layer, expected (rows, cols))`` for every
    role (per-layer roles once per layer), None for an absent optional role."""
    w: dict[str, Any] = {}
    for role in tensor_roles(kind):
        shape = (dims[role.shape[0]], dims[role.shape[1]])
        for i in range(n_layer) if role.per_layer else (None,):
            e = entry(role, i, shape)
            if e is not None:
                w[role.key.format(i=i)] = e
    return w


def _bound_shape(shape: tuple[int, ...], conv: frozenset[str]) -> tuple[int, ...]:
    """(rows, cols) a file tensor of ``shape`` (numpy order) binds as under ``conv``."""
    if "flatten" in conv and len(shape) > 2:
        shape = (shape[0], math.prod(shape[1:]))
    if "transpose" in conv and len(shape) == 2:
        shape = (shape[1], shape[0])
    return tuple(shape)


def _fits(shape: tuple[int, ...], conv: frozenset[str], role: Role, want: tuple[int, int]) -> bool:
    s = _bound_shape(shape, conv)
    return s == want if role.kind == "matrix" else math.prod(s) == math.prod(want)


def _check_shape(path: str, name: str, shape: tuple[int, ...], conv: frozenset[str], role: Role,
                 i: int | None, want: tuple[int, int]) -> None:
    """A file tensor's shape against its role, named as the file names it (the C core checks the
    weights dict again against the same table, for any caller)."""
    if _fits(shape, conv, role, want):
        return
    bound = _bound_shape(shape, conv)
    got = f"shape {tuple(shape)}" + (f", bound as {bound}" if bound != tuple(shape) else "")
    if role.kind == "matrix":
        exp = f"({role.shape[0]}, {role.shape[1]}) = {want}"
    else:
        sym = role.shape[0] if role.shape[1] == "1" else "*".join(role.shape)
        exp = f"({sym}) = {math.prod(want)} values"
    raise FormatError(f"{path}: tensor {name!r} ({role.key.format(i=i)}) has {got}, "
                      f"expected {exp}")


# (role, axis of its bound (rows, cols), the config fields whose product it must equal)
_SIZED_BY = (("token_embd", 1, ("hidden_size",)),
             ("blk.{i}.attn_q", 0, ("num_heads", "head_dim")),
             ("blk.{i}.attn_k", 0, ("num_kv_heads", "head_dim")),
             ("blk.{i}.ffn_gate", 0, ("intermediate_size",)))


def cross_check(cfg: Gemma3Config, fmt: int, path: str,
                shape_of: Callable[[Role, int | None], tuple[str, tuple[int, ...]] | None]) -> None:
    """The config's sizes against the tensors that carry them, before any weight is bound or
    anything is sized from the config; FormatError names the config key. ``shape_of(role, layer)``
    -> (file name, bound shape) of the tensor in the file, or None. ``fmt``: 0 GGUF, 1 config.json."""
    key = {f: v[fmt] for f, v in INT_LIMITS.items()}
    for rkey, axis, fields in _SIZED_BY:
        found = shape_of(role_of("text", rkey), 0)
        if found is None:
            continue  # reported as a missing tensor by the binding, with its name
        name, shape = found
        want = math.prod(getattr(cfg, f) for f in fields)
        if len(shape) == 2 and shape[axis] != want:
            decl = " x ".join(f"{key[f]} ({getattr(cfg, f)})" for f in fields)
            raise FormatError(f"{path}: {decl} = {want}, but tensor {name!r} has "
                              f"{shape[axis]} {('rows', 'columns')[axis]}")
    q = role_of("text", "blk.{i}.attn_q")
    last = next((i for i in range(cfg.num_layers, 0, -1) if shape_of(q, i - 1)), 0)
    extra = shape_of(q, cfg.num_layers)
    if last != cfg.num_layers or extra:
        has = "more" if extra else last
        raise FormatError(f"{path}: {key['num_layers']} = {cfg.num_layers}, but the file has "
                          f"{has} layers of attention weights")


def _vector(a: np.ndarray, conv: frozenset[str]) -> np.ndarray:
    if "add_one" in conv:
        a = a + 1.0  # the file stores w of a (1 + w) RMSNorm
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(-1))


def _matrix(a: np.ndarray, conv: frozenset[str], dtype: str | None):
    """float matrix (file layout) -> (type_id, rows, cols, bytes) after the conventions."""
    if "flatten" in conv:
        a = a.reshape(a.shape[0], -1)
    if "transpose" in conv:
        a = a.T
    a = np.ascontiguousarray(a, dtype=np.float32)
    tid, data = _convert_matrix(a, None if "keep_f32" in conv else dtype)
    return _matrix_entry(tid, a.shape, data)


def gguf_entry(f: GGUFFile, path: str, role: Role, i: int | None, shape: tuple[int, int],
               dtype: str | None):
    """The weights entry of one role from a GGUF (text) or mmproj file. Matrices stay in the file
    mapping when the kernels can read their type and nothing converts them."""
    conv = role.gguf_conv
    names = [n.format(i=i) for n in (role.gguf, role.gguf_alt) if n]
    present = [n for n in names if n in f.tensors]
    if not present:
        if role.optional:
            return None
        raise FormatError(f"{path}: tensor {names[0]!r} is missing")

    # older files hold the role under the alternative name: the one whose shape fits
    name = next((n for n in present if _fits(f.tensors[n].shape, conv, role, shape)), present[0])
    t = f.tensors[name]
    _check_shape(path, name, t.shape, conv, role, i, shape)
    if role.kind == "vector":
        return _vector(f.dequantize(name), conv)
    if not _core.type_info(t.type_id)[4]:
        raise UnsupportedError(f"{path}: tensor {name!r} has type {t.type}, which this version "
                               "cannot compute with")
    if dtype is None and not conv - {"flatten"}:
        rows, cols = _bound_shape(t.shape, conv)
        return _matrix_entry(t.type_id, (rows, cols), f.raw(name))
    return _matrix(f.dequantize(name), conv, dtype.lower() if dtype else None)


def hf_entry(where: dict[str, Any], path: str, role: Role, i: int | None,
             shape: tuple[int, int], prefixes: dict[str, str], dtype: str | None,
             tied: bool = True):
    """The weights entry of one role from Hugging Face safetensors shards (``where``: tensor name
    -> open shard). Float tensors are converted to F32 (or ``dtype``) on load. An optional role
    with a tie (the LM head) is read only when the checkpoint does not declare it tied."""
    if role.tie and tied:
        return None
    names = [n.format(i=i, **prefixes) for n in (role.hf, role.hf_alt) if n]
    name = next((n for n in names if n in where), None)
    if name is None:
        if role.optional:
            return None
        raise FormatError(f"{path}: tensor {names[0]!r} is missing")
    a = where[name].array(name)
    _check_shape(path, name, a.shape, role.hf_conv, role, i, shape)
    if role.kind == "vector":
        return _vector(a, role.hf_conv)
    return _matrix(a, role.hf_conv, dtype.lower() if dtype else None)


def load_gguf(path: str, dtype: str | None = None):
    """-> (config, weights dict for _core.Model, metadata, owner objects)"""
    _check_dtype(dtype)
    f = GGUFFile(path)
    md = f.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    emb = role_of("text", "token_embd").gguf  # its rows give the vocabulary size
    if emb not in f.tensors:
        raise FormatError(f"{path}: tensor {emb!r} is missing")
    vocab = f.tensors[emb].shape[0]
    if tokens is not None and len(tokens) != vocab:
        raise FormatError(f"{path}: {len(tokens)} tokenizer tokens but token_embd has {vocab} rows")
    cfg = from_gguf_metadata(md, vocab)

    def shape_of(role: Role, i: int | None):
        name = next((n for n in (role.gguf, role.gguf_alt) if n and n.format(i=i) in f.tensors),
                    None)
        if name is None:
            return None
        name = name.format(i=i)
        return name, _bound_shape(f.tensors[name].shape, role.gguf_conv)

    cross_check(cfg, 0, path, shape_of)
    w = build_weights("text", cfg.to_core(1).dims, cfg.num_layers,
                      lambda role, i, shape: gguf_entry(f, path, role, i, shape, dtype))
    return cfg, w, md, f


def _find_hf_prefix(names: set[str]) -> str:
    probe = role_of("text", "token_embd").hf
    for p in HF_TEXT_PREFIXES:
        if probe.format(t=p) in names:
            return p
    raise FormatError("no text-model embedding found (looked for "
                      + ", ".join(repr(probe.format(t=p)) for p in HF_TEXT_PREFIXES) + ")")


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
    tied = hf.get("tie_word_embeddings", True)

    def shape_of(role: Role, i: int | None):
        names = [n.format(i=i, t=prefix) for n in (role.hf, role.hf_alt) if n]
        name = next((n for n in names if n in where), None)
        if name is None:
            return None
        return name, _bound_shape(where[name].tensors[name].shape, role.hf_conv)

    cross_check(cfg, 1, path, shape_of)
    w = build_weights("text", cfg.to_core(1).dims, cfg.num_layers,
                      lambda role, i, shape: hf_entry(where, path, role, i, shape,
                                                      {"t": prefix}, dtype, tied))
    return cfg, w, hf, shards


def build_core(cfg: Gemma3Config, weights: dict[str, Any], max_seq: int,
               pack: bool = True, kv_type: int = 0, prefill_digits: int = 3) -> _core.Model:
    is_global = bytes(1 if t == "full_attention" else 0 for t in cfg.layer_types)
    return _core.Model(cfg.to_core(max_seq), is_global, weights, pack=pack, kv_type=kv_type,
                       prefill_digits=prefill_digits)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()
