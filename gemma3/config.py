"""Gemma 3 model configuration, read from a checkpoint's metadata.

Every value comes from the checkpoint. Where a key is absent the documented fallback applies
(reference: llama-cpp-gemma3.md §3.1, transformers-gemma3.md §1.1):

* sliding-window RoPE base: ``rope.freq_base_swa`` / ``rope_local_base_freq`` else 10 000;
* sliding-window pattern: ``attention.sliding_window_pattern`` / ``sliding_window_pattern`` else 6
  (layer i is global iff (i + 1) % pattern == 0), unless an explicit ``layer_types`` list exists;
* no ``sliding_window`` key (or 0): every layer is global;
* query scale: ``query_pre_attn_scalar ** -0.5`` when a config gives it, else head_dim ** -0.5
  (llama.cpp's GGUF files do not store it; llama.cpp uses (n_embd / n_head) ** -0.5 for the
  62-layer 27B, and so do we). Our extension: ``gemma3.query_pre_attn_scalar`` (f32), written by
  gemma3/convert.py when the value differs from head_dim, wins when present;
* global-layer linear RoPE scaling from ``rope.scaling.{type,factor}`` / ``rope_scaling``;
  local layers are never scaled;
* no final-logit soft-capping unless the checkpoint declares it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from ._core import FormatError, UnsupportedError


@dataclass(frozen=True)
class Gemma3Config:
    """Hyper-parameters of a Gemma 3 text decoder (frozen; read from the checkpoint)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    sliding_window: int  # keys a local layer sees, including the current one; 0 = none
    layer_types: tuple[str, ...]  # "sliding_attention" | "full_attention" per layer
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # linear, global layers only
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    context_length: int = 32768
    bos_token_id: int = 2
    eos_token_id: int = 1
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def global_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    def to_core(self, max_seq: int) -> _core.TextConfig:
        """The typed config the C core takes (every field required, no defaults in C)."""
        return _core.TextConfig(
            n_vocab=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
            n_head=self.num_heads, n_head_kv=self.num_kv_heads, head_dim=self.head_dim,
            n_ff=self.intermediate_size, window=self.sliding_window, max_seq=max_seq,
            eps=float(self.rms_norm_eps), attn_scale=float(self.attn_scale),
            embd_scale=float(self.embed_scale),
            final_softcap=float(self.final_logit_softcapping or 0.0),
            rope_base_global=float(self.rope_theta),
            rope_scale_global=1.0 / self.rope_scaling_factor,
            rope_base_local=float(self.rope_local_base_freq), rope_scale_local=1.0,
        )


def layer_types_from_pattern(n_layers: int, pattern: int, sliding_window: int) -> tuple[str, ...]:
    if sliding_window <= 0 or pattern <= 1:
        return ("full_attention",) * n_layers
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n_layers))


# Sanity bounds on every size a checkpoint declares, checked before anything is sized from it (a
# config.json with num_hidden_layers = 10**12 once made load() build a layer list forever). Wide
# enough for any Gemma 3 and for tiny test models (Gemma 3 27B: 62 layers, width 5376, 32 heads,
# head 128, MLP 21504, vocabulary 262208, window 1024, 131072 positions), far below what would
# exhaust memory or overflow C's int64 products. field -> (GGUF key, config.json key, low, high).
INT_LIMITS: dict[str, tuple[str, str, int, int]] = {
    "hidden_size": ("gemma3.embedding_length", "hidden_size", 1, 1 << 16),
    "num_layers": ("gemma3.block_count", "num_hidden_layers", 1, 1024),
    "num_heads": ("gemma3.attention.head_count", "num_attention_heads", 1, 1024),
    "num_kv_heads": ("gemma3.attention.head_count_kv", "num_key_value_heads", 1, 1024),
    "head_dim": ("gemma3.attention.key_length", "head_dim", 2, 4096),
    "intermediate_size": ("gemma3.feed_forward_length", "intermediate_size", 1, 1 << 20),
    "sliding_window": ("gemma3.attention.sliding_window", "sliding_window", 0, 1 << 24),
    "sliding_window_pattern": ("gemma3.attention.sliding_window_pattern",
                               "sliding_window_pattern", 0, 1024),
    "context_length": ("gemma3.context_length", "max_position_embeddings", 1, 1 << 24),
    "vocab_size": ("tokenizer.ggml.tokens", "vocab_size", 1, 1 << 24),
    "bos_token_id": ("tokenizer.ggml.bos_token_id", "bos_token_id", 0, (1 << 24) - 1),
    "eos_token_id": ("tokenizer.ggml.eos_token_id", "eos_token_id", 0, (1 << 24) - 1),
}
# field -> (GGUF key, config.json key, low (exclusive), high): finite positive numbers
FLOAT_LIMITS: dict[str, tuple[str, str, float, float]] = {
    "rms_norm_eps": ("gemma3.attention.layer_norm_rms_epsilon", "rms_norm_eps", 0.0, 1.0),
    "rope_theta": ("gemma3.rope.freq_base", "rope_theta", 0.0, 1e12),
    "rope_local_base_freq": ("gemma3.rope.freq_base_swa", "rope_local_base_freq", 0.0, 1e12),
    "rope_scaling_factor": ("gemma3.rope.scaling.factor", "rope_scaling.factor", 0.0, 1e6),
    "query_pre_attn_scalar": ("gemma3.query_pre_attn_scalar", "query_pre_attn_scalar", 0.0,
                              1e9),
    "final_logit_softcapping": ("gemma3.final_logit_softcapping", "final_logit_softcapping",
                                0.0, 1e9),
}
_GGUF, _HF = 0, 1


def bounded_int(v: Any, key: str, lo: int, hi: int) -> int:
    """``v`` as an integer in [lo, hi], or FormatError naming the checkpoint's ``key``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise FormatError(f"{key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise FormatError(f"{key} = {v} is out of range (expected {lo} to {hi})")
    return int(v)


def bounded_num(v: Any, key: str, lo: float, hi: float) -> float:
    """``v`` as a finite number in (lo, hi], or FormatError naming the checkpoint's ``key``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise FormatError(f"{key} must be a number, got {v!r}")
    if not (math.isfinite(v) and lo < v <= hi):
        raise FormatError(f"{key} = {v!r} is out of range (expected above {lo:g} up to {hi:g})")
    return float(v)


def _int(v: Any, field_: str, fmt: int) -> int:
    lim = INT_LIMITS[field_]
    return bounded_int(v, lim[fmt], lim[2], lim[3])


def _num(v: Any, field_: str, fmt: int) -> float:
    lim = FLOAT_LIMITS[field_]
    return bounded_num(v, lim[fmt], lim[2], lim[3])


def check_sizes(cfg: Gemma3Config, fmt: int) -> Gemma3Config:
    """The relations between sizes that a single bound cannot express."""
    keys = {f: v[fmt] for f, v in INT_LIMITS.items()}
    if cfg.num_heads % cfg.num_kv_heads:
        raise FormatError(f"{keys['num_heads']} = {cfg.num_heads} is not a multiple of "
                          f"{keys['num_kv_heads']} = {cfg.num_kv_heads}")
    if cfg.head_dim % 2:
        raise FormatError(f"{keys['head_dim']} = {cfg.head_dim} must be even (RoPE rotates pairs)")
    for f in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, f) >= cfg.vocab_size:
            raise FormatError(f"{keys[f]} = {getattr(cfg, f)} is not below the vocabulary size "
                              f"{cfg.vocab_size}")
    return cfg


def from_gguf_metadata(md: dict[str, Any], vocab_size: int) -> Gemma3Config:
    arch = md.get("general.architecture")
    if arch != "gemma3":
        raise UnsupportedError(f"general.architecture is {arch!r}; this library runs 'gemma3'")

    def get(key, default=None, required=False):
        full = f"gemma3.{key}"
        if full not in md:
            if required:
                raise FormatError(f"required metadata key '{full}' is missing")
            return default
        v = md[full]
        if hasattr(v, "__len__") and not isinstance(v, str):
            raise UnsupportedError(f"per-layer arrays for '{full}' are not supported")
        return v

    G = _GGUF
    n_embd = _int(get("embedding_length", required=True), "hidden_size", G)
    n_layer = _int(get("block_count", required=True), "num_layers", G)
    n_head = _int(get("attention.head_count", 8), "num_heads", G)
    n_kv = _int(get("attention.head_count_kv", n_head), "num_kv_heads", G)
    head_dim = _int(get("attention.key_length", max(n_embd // n_head, 2)), "head_dim", G)
    v_dim = get("attention.value_length", head_dim)
    if v_dim != head_dim:
        raise UnsupportedError(f"value_length {v_dim} != key_length {head_dim}")
    n_ff = _int(get("feed_forward_length", required=True), "intermediate_size", G)
    window = _int(get("attention.sliding_window", 0) or 0, "sliding_window", G)
    pattern = _int(get("attention.sliding_window_pattern", 6), "sliding_window_pattern", G)
    n_rot = get("rope.dimension_count", head_dim)
    if n_rot != head_dim:
        raise UnsupportedError(f"partial RoPE (dimension_count {n_rot} of {head_dim})")
    scaling_type = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", 0.0) or 0.0
    if not factor and get("rope.scale_linear") is not None:
        factor = get("rope.scale_linear")
    factor = _num(factor, "rope_scaling_factor", G) if factor else 1.0
    if scaling_type not in (None, "none", "linear") and factor != 1.0:
        raise UnsupportedError(f"RoPE scaling type {scaling_type!r} is not supported")
    if scaling_type == "none":
        factor = 1.0
    softcap = get("final_logit_softcapping", None)
    # llama.cpp's GGUF has no query_pre_attn_scalar: its rule (27B: n_embd / n_head), unless our
    # converter's extension key gemma3.query_pre_attn_scalar is present (gemma3/convert.py)
    qpas = get("query_pre_attn_scalar", None)
    if qpas is None:
        qpas = float(n_embd // n_head) if n_layer == 62 else float(head_dim)
    qpas = _num(qpas, "query_pre_attn_scalar", G)
    return check_sizes(Gemma3Config(
        vocab_size=_int(vocab_size, "vocab_size", G),
        hidden_size=n_embd,
        num_layers=n_layer,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=n_ff,
        sliding_window=window,
        layer_types=layer_types_from_pattern(n_layer, pattern, window),
        rms_norm_eps=_num(get("attention.layer_norm_rms_epsilon", 1e-6), "rms_norm_eps", G),
        rope_theta=_num(get("rope.freq_base", 1_000_000.0), "rope_theta", G),
        rope_local_base_freq=_num(get("rope.freq_base_swa", 10_000.0), "rope_local_base_freq", G),
        rope_scaling_factor=factor,
        query_pre_attn_scalar=qpas,
        final_logit_softcapping=_num(softcap, "final_logit_softcapping", G) if softcap else None,
        context_length=_int(get("context_length", 32768), "context_length", G),
        bos_token_id=_int(md.get("tokenizer.ggml.bos_token_id", 2), "bos_token_id", G),
        eos_token_id=_int(md.get("tokenizer.ggml.eos_token_id", 1), "eos_token_id", G),
        name=str(md.get("general.name", "")),
    ), G)


def from_hf_config(cfg: dict[str, Any]) -> Gemma3Config:
    """From a Hugging Face ``config.json`` (Gemma3ForCausalLM, or the ``text_config`` of
    Gemma3ForConditionalGeneration). Absent keys take the Gemma3TextConfig class defaults."""
    tc = cfg.get("text_config", cfg) or {}
    if not isinstance(tc, dict):
        raise FormatError(f"text_config must be an object, got {type(tc).__name__}")
    H = _HF
    n_layer = _int(tc.get("num_hidden_layers", 26), "num_layers", H)
    window = _int(tc.get("sliding_window", 4096) or 0, "sliding_window", H)
    pattern = _int(tc.get("sliding_window_pattern", tc.get("_sliding_window_pattern", 6)) or 6,
                   "sliding_window_pattern", H)
    layer_types = tc.get("layer_types")
    if layer_types:
        if not isinstance(layer_types, list) or len(layer_types) != n_layer:
            n = len(layer_types) if isinstance(layer_types, list) else type(layer_types).__name__
            raise FormatError(f"layer_types has {n} entries for {n_layer} layers")
        bad = [t for t in layer_types if t not in ("sliding_attention", "full_attention")]
        if bad:
            raise FormatError(f"layer_types holds {bad[0]!r}; expected 'sliding_attention' or "
                              "'full_attention'")
        layer_types = tuple(layer_types)
    else:
        layer_types = layer_types_from_pattern(n_layer, pattern, window)
    rope_theta = tc.get("rope_theta", 1_000_000.0)
    local_base = tc.get("rope_local_base_freq", 10_000.0)
    factor = 1.0
    scaling = tc.get("rope_scaling")
    params = tc.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers v5 layout
        full = params["full_attention"] or {}
        rope_theta = full.get("rope_theta", rope_theta)
        local_base = (params.get("sliding_attention") or {}).get("rope_theta", local_base)
        scaling = full if full.get("rope_type") not in (None, "default") else None
    if scaling:
        if not isinstance(scaling, dict):
            raise FormatError(f"rope_scaling must be an object, got {scaling!r}")
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "linear":
            factor = _num(scaling.get("factor"), "rope_scaling_factor", H)
        elif rtype not in (None, "default"):
            raise UnsupportedError(f"RoPE scaling type {rtype!r} is not supported")
    if tc.get("use_bidirectional_attention"):
        raise UnsupportedError("bidirectional (EmbeddingGemma) configs are not supported")
    heads = _int(tc.get("num_attention_heads", 8), "num_heads", H)
    softcap = tc.get("final_logit_softcapping")
    return check_sizes(Gemma3Config(
        vocab_size=_int(tc.get("vocab_size", 262208), "vocab_size", H),
        hidden_size=_int(tc.get("hidden_size", 2304), "hidden_size", H),
        num_layers=n_layer,
        num_heads=heads,
        num_kv_heads=_int(tc.get("num_key_value_heads", 4), "num_kv_heads", H),
        head_dim=_int(tc.get("head_dim", 256), "head_dim", H),
        intermediate_size=_int(tc.get("intermediate_size", 9216), "intermediate_size", H),
        sliding_window=window,
        layer_types=layer_types,
        rms_norm_eps=_num(tc.get("rms_norm_eps", 1e-6), "rms_norm_eps", H),
        rope_theta=_num(rope_theta, "rope_theta", H),
        rope_local_base_freq=_num(local_base, "rope_local_base_freq", H),
        rope_scaling_factor=factor,
        query_pre_attn_scalar=_num(tc.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar",
                                   H),
        final_logit_softcapping=(_num(softcap, "final_logit_softcapping", H)
                                 if softcap is not None else None),
        context_length=_int(tc.get("max_position_embeddings", 131072), "context_length", H),
        bos_token_id=_int(tc.get("bos_token_id", cfg.get("bos_token_id", 2)) or 2, "bos_token_id",
                          H),
        eos_token_id=_int(_first(tc.get("eos_token_id", cfg.get("eos_token_id", 1))),
                          "eos_token_id", H),
        name=str(cfg.get("_name_or_path", "")),
    ), H)


def _first(v) -> Any:
    """eos_token_id may be a list in config.json: its first entry (checked by the caller)."""
    if isinstance(v, (list, tuple)):
        return v[0] if v else 1
    return v if v is not None else 1
