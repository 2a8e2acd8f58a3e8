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


def _positive_int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise FormatError(f"metadata key '{key}' must be a positive integer, got {v!r}")
    return v


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

    n_embd = _positive_int(get("embedding_length", required=True), "gemma3.embedding_length")
    n_layer = _positive_int(get("block_count", required=True), "gemma3.block_count")
    n_head = _positive_int(get("attention.head_count", 8), "gemma3.attention.head_count")
    n_kv = _positive_int(get("attention.head_count_kv", n_head), "gemma3.attention.head_count_kv")
    head_dim = _positive_int(get("attention.key_length", n_embd // n_head),
                             "gemma3.attention.key_length")
    v_dim = get("attention.value_length", head_dim)
    if v_dim != head_dim:
        raise UnsupportedError(f"value_length {v_dim} != key_length {head_dim}")
    n_ff = _positive_int(get("feed_forward_length", required=True), "gemma3.feed_forward_length")
    window = int(get("attention.sliding_window", 0) or 0)
    pattern = int(get("attention.sliding_window_pattern", 6))
    n_rot = get("rope.dimension_count", head_dim)
    if n_rot != head_dim:
        raise UnsupportedError(f"partial RoPE (dimension_count {n_rot} of {head_dim})")
    scaling_type = get("rope.scaling.type", None)
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    if not factor and get("rope.scale_linear") is not None:
        factor = float(get("rope.scale_linear"))
    if scaling_type not in (None, "none", "linear") and factor not in (0.0, 1.0):
        raise UnsupportedError(f"RoPE scaling type {scaling_type!r} is not supported")
    if scaling_type == "none":
        factor = 1.0
    softcap = get("final_logit_softcapping", None)
    # llama.cpp's GGUF has no query_pre_attn_scalar: its rule (27B: n_embd / n_head), unless our
    # converter's extension key gemma3.query_pre_attn_scalar is present (gemma3/convert.py)
    qpas = get("query_pre_attn_scalar", None)
    if qpas is None:
        qpas = float(n_embd // n_head) if n_layer == 62 else float(head_dim)
    elif not (isinstance(qpas, (int, float)) and qpas > 0):
        raise FormatError(f"gemma3.query_pre_attn_scalar must be a positive number, got {qpas!r}")
    return Gemma3Config(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        num_layers=n_layer,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=n_ff,
        sliding_window=window,
        layer_types=layer_types_from_pattern(n_layer, pattern, window),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(get("rope.freq_base_swa", 10_000.0)),
        rope_scaling_factor=factor if factor > 0 else 1.0,
        query_pre_attn_scalar=qpas,
        final_logit_softcapping=float(softcap) if softcap else None,
        context_length=int(get("context_length", 32768)),
        bos_token_id=int(md.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(md.get("tokenizer.ggml.eos_token_id", 1)),
        name=str(md.get("general.name", "")),
    )


def from_hf_config(cfg: dict[str, Any]) -> Gemma3Config:
    """From a Hugging Face ``config.json`` (Gemma3ForCausalLM, or the ``text_config`` of
    Gemma3ForConditionalGeneration). Absent keys take the Gemma3TextConfig class defaults."""
    tc = cfg.get("text_config", cfg) or {}
    n_layer = int(tc.get("num_hidden_layers", 26))
    window = int(tc.get("sliding_window", 4096) or 0)
    pattern = int(tc.get("sliding_window_pattern", tc.get("_sliding_window_pattern", 6)) or 6)
    layer_types = tc.get("layer_types")
    if layer_types:
        if len(layer_types) != n_layer:
            raise FormatError(f"layer_types has {len(layer_types)} entries for {n_layer} layers")
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
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "linear":
            factor = float(scaling["factor"])
        elif rtype not in (None, "default"):
            raise UnsupportedError(f"RoPE scaling type {rtype!r} is not supported")
    if tc.get("use_bidirectional_attention"):
        raise UnsupportedError("bidirectional (EmbeddingGemma) configs are not supported")
    heads = int(tc.get("num_attention_heads", 8))
    return Gemma3Config(
        vocab_size=int(tc.get("vocab_size", 262208)),
        hidden_size=int(tc.get("hidden_size", 2304)),
        num_layers=n_layer,
        num_heads=heads,
        num_kv_heads=int(tc.get("num_key_value_heads", 4)),
        head_dim=int(tc.get("head_dim", 256)),
        intermediate_size=int(tc.get("intermediate_size", 9216)),
        sliding_window=window,
        layer_types=layer_types,
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_local_base_freq=float(local_base),
        rope_scaling_factor=factor,
        query_pre_attn_scalar=float(tc.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=tc.get("final_logit_softcapping"),
        context_length=int(tc.get("max_position_embeddings", 131072)),
        bos_token_id=int(tc.get("bos_token_id", cfg.get("bos_token_id", 2)) or 2),
        eos_token_id=_first(tc.get("eos_token_id", cfg.get("eos_token_id", 1))),
        name=str(cfg.get("_name_or_path", "")),
    )


def _first(v) -> int:
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else 1
    return int(v if v is not None else 1)
