"""Looking inside: the KV cache as NumPy, activation capture with TransformerLens names, logit lens.

Names recorded by :meth:`Model.run_with_cache` (per layer ``L``; shapes for a prompt of ``T``
tokens, ``H`` query heads, ``Hkv`` key/value heads, ``D`` head_dim, ``E`` width)::

    blocks.L.hook_resid_pre          (T, E)   residual stream entering the block
    blocks.L.attn.hook_q             (T, H, D)    queries after q-norm and RoPE
    blocks.L.attn.hook_k             (T, Hkv, D)  keys after k-norm and RoPE (as cached)
    blocks.L.attn.hook_v             (T, Hkv, D)  values (as cached)
    blocks.L.attn.hook_attn_scores   (h, q, T)    scaled scores before softmax, -inf where masked
    blocks.L.attn.hook_pattern       (h, q, T)    attention probabilities, exactly 0 where masked
    blocks.L.attn.hook_z             (T, H, D)    attention output per head, before o_proj
    blocks.L.hook_attn_out           (T, E)       what attention adds (after the post-attn norm)
    blocks.L.hook_resid_mid          (T, E)
    blocks.L.hook_mlp_out            (T, E)       what the MLP adds (after the post-FFN norm)
    blocks.L.hook_resid_post         (T, E)
    ln_final.hook_normalized         (T, E)

``h`` is the number of selected heads (all by default, in the order given) and ``q`` the
selected query rows (all by default). Nothing is recorded unless asked for: with no capture the
forward pass runs exactly as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _check, _core
from . import state as _state
from .engine import LOGITS_CHUNK

ATTN_NAMES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores")
BLOCK_NAMES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
               "hook_mlp_out")
_CORE_KEY = {"hook_q": "q", "hook_k": "k", "hook_v": "v", "hook_z": "z", "hook_pattern": "pattern",
             "hook_attn_scores": "scores", "hook_resid_pre": "resid_pre",
             "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}
FINAL_NAME = "ln_final.hook_normalized"


def all_names(n_layers: int) -> list[str]:
    names = []
    for L in range(n_layers):
        names += [f"blocks.{L}.{n}" for n in BLOCK_NAMES]
        names += [f"blocks.{L}.attn.{n}" for n in ATTN_NAMES]
    return names + [FINAL_NAME]


def _parse_name(name: str, n_layers: int) -> tuple[int | None, str]:
    if name == FINAL_NAME:
        return None, "final_norm"
    parts = name.split(".")
    try:
        if parts[0] != "blocks":
            raise ValueError
        layer = int(parts[1])
        hook = parts[-1]
        if (len(parts) == 4 and parts[2] == "attn" and hook in ATTN_NAMES) or (
                len(parts) == 3 and hook in BLOCK_NAMES):
            if not 0 <= layer < n_layers:
                raise IndexError
            return layer, _CORE_KEY[hook]
    except IndexError:
        raise ValueError(f"{name!r}: layer out of range (the model has {n_layers})") from None
    except ValueError:
        pass
    raise ValueError(f"unknown activation name {name!r}; names look like "
                     f"'blocks.5.attn.hook_pattern' or '{FINAL_NAME}'")


def attention_selection(cfg, layers: Sequence[int] | None, heads: Sequence[int] | None
                        ) -> tuple[list[int], list[int]]:
    """generate(return_attention=True)'s layers and heads (default all), validated."""
    layers = list(range(cfg.num_layers)) if layers is None else [
        _check.integer("attention_layers item", x) for x in layers]
    heads = list(range(cfg.num_heads)) if heads is None else [
        _check.integer("attention_heads item", x) for x in heads]
    CapturePlan.make(cfg, 1, [], layers, heads, None)  # validates
    return layers, heads


@dataclass
class CapturePlan:
    """Which names to record; builds the buffers the C core fills."""

    names: list[str]
    layers: dict[int, set[str]]  # layer -> core keys
    final: bool
    heads: list[int]
    q0: int
    q1: int

    @classmethod
    def make(cls, cfg, n_tokens: int, names: Sequence[str] | None, layers: Sequence[int] | None,
             heads: Sequence[int] | None, query_range: tuple[int, int] | None) -> CapturePlan:
        if layers is not None:
            layers = [_check.integer("layers item", x) for x in layers]
            for x in layers:
                if not 0 <= x < cfg.num_layers:
                    raise ValueError(f"layer {x} out of range (the model has {cfg.num_layers})")
        if names is None:
            names = [n for n in all_names(cfg.num_layers)
                     if layers is None or n == FINAL_NAME or int(n.split(".")[1]) in layers]
        elif isinstance(names, str):
            names = [names]
        plan_layers: dict[int, set[str]] = {}
        final = False
        for n in names:
            layer, key = _parse_name(n, cfg.num_layers)
            if layer is None:
                final = True
            elif layers is None or layer in layers:
                plan_layers.setdefault(layer, set()).add(key)
        hs = list(range(cfg.num_heads)) if heads is None else [
            _check.integer("heads item", h) for h in heads]
        for h in hs:
            if not 0 <= h < cfg.num_heads:
                raise ValueError(f"head {h} out of range (the model has {cfg.num_heads} heads)")
        if query_range is not None and (not isinstance(query_range, (tuple, list)) or
                                        len(query_range) != 2):
            raise TypeError(f"query_range must be a (start, stop) pair, got {query_range!r}")
        q0, q1 = (0, n_tokens) if query_range is None else (
            _check.integer("query_range start", query_range[0]),
            _check.integer("query_range stop", query_range[1]))
        if not 0 <= q0 <= q1 <= n_tokens:
            raise ValueError(f"query_range {query_range} must lie within [0, {n_tokens}]")
        return cls(list(names), plan_layers, final, hs, q0, q1)

    def buffers(self, cfg, n_tokens: int, n_keys: int) -> tuple[dict, dict[str, np.ndarray]]:
        """-> (capture dict for the core, name -> array view)"""
        T, E, H, Hkv, D = (n_tokens, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim)
        shapes = {"q": (T, H, D), "z": (T, H, D), "k": (T, Hkv, D), "v": (T, Hkv, D),
                  "pattern": (len(self.heads), self.q1 - self.q0, n_keys),
                  "scores": (len(self.heads), self.q1 - self.q0, n_keys)}
        core: dict[Any, Any] = {}
        out: dict[str, np.ndarray] = {}
        inverse = {v: k for k, v in _CORE_KEY.items()}
        for layer, keys in sorted(self.layers.items()):
            d: dict[str, Any] = {"heads": np.asarray(self.heads, np.int32), "q0": self.q0,
                                 "q1": self.q1}
            for key in keys:
                a = np.empty(shapes.get(key, (T, E)), np.float32)
                d[key] = a
                hook = inverse[key]
                prefix = f"blocks.{layer}.attn." if hook in ATTN_NAMES else f"blocks.{layer}."
                out[prefix + hook] = a
            core[layer] = d
        if self.final:
            a = np.empty((T, E), np.float32)
            core["final_norm"] = a
            out[FINAL_NAME] = a
        return core, out


@dataclass(frozen=True)
class LayerKV:
    """One layer's cached keys and values in position order.

    ``k``/``v``: ``(n_kv_heads, n_pos, head_dim)`` float32; keys are stored after k-norm and RoPE,
    values raw. For a float32 cache's global layers these are read-only views of the live cache
    (they change if the model is reset and reused: copy them to keep them); local rings, and
    every layer of a bf16/f16/q8_0 cache, are float32 copies converted on access (exactly the
    values attention reads). ``dtype_stored``: the cache's type ("f32", "bf16", "f16", "q8_0").
    """

    layer: int
    kind: str  # "global" | "local"
    window: int | None
    positions: np.ndarray  # (n_pos,) int64 absolute positions
    k: np.ndarray
    v: np.ndarray
    dtype_stored: str = "f32"

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_to_float(a: np.ndarray, kv_type: int, head_dim: int) -> np.ndarray:
    """Rows of a cache buffer in its stored type (``_core.Model.kv_buffers``: float32, float16,
    uint16 bf16 bits, or uint8 q8_0 blocks) as float32 (..., head_dim), converted like the C
    kernels: exact widening for f16/bf16, fp16 scale x int8 (one float32 product) for q8_0."""
    if kv_type == 0:
        return a
    if kv_type == 1:
        return a.astype(np.float32)
    if kv_type == 30:
        return (a.astype(np.uint32) << 16).view(np.float32)
    blocks = np.ascontiguousarray(a).reshape(*a.shape[:-1], head_dim // 32, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(*a.shape[:-1], head_dim)


class KVCache:
    """``model.kv_cache``: per-layer K/V of the cached context (see :class:`LayerKV`).
    ``engine``: the model's gemma3.engine.Engine (its sequence 0 is what is read)."""

    def __init__(self, engine):
        self._engine = engine
        self._core = engine.core
        self.n_past = engine.core.n_past

    def __len__(self) -> int:
        return self._engine.config.num_layers

    @property
    def dtype_stored(self) -> str:
        """The type the cache stores: "f32", "bf16", "f16" or "q8_0" (load(kv_dtype=))."""
        return _state.KV_TYPE_NAMES[self._core.kv_type]

    def __getitem__(self, layer: int) -> LayerKV:
        cfg = self._engine.config
        layer = _check.integer("layer", layer)
        if not -len(self) <= layer < len(self):
            raise IndexError(f"layer {layer} out of range ({len(self)} layers)")
        layer %= len(self)
        k, v, is_global = self._core.kv_buffers(layer)
        n, kt = self.n_past, self._core.kv_type
        name = _state.KV_TYPE_NAMES[kt]
        if is_global:
            pos = np.arange(n, dtype=np.int64)
            kk = kv_to_float(k[:n], kt, cfg.head_dim).transpose(1, 0, 2)
            vv = kv_to_float(v[:n], kt, cfg.head_dim).transpose(1, 0, 2)
            kk.flags.writeable = vv.flags.writeable = False
            return LayerKV(layer, "global", None, pos, kk, vv, name)
        slots = k.shape[0]
        # the positions the next query reads (the ring keeps a rollback margin beyond them)
        first = max(0, n - min(slots, cfg.sliding_window))
        pos = np.arange(first, n, dtype=np.int64)
        idx = pos % slots
        kk = np.ascontiguousarray(kv_to_float(k[idx], kt, cfg.head_dim).transpose(1, 0, 2))
        vv = np.ascontiguousarray(kv_to_float(v[idx], kt, cfg.head_dim).transpose(1, 0, 2))
        kk.flags.writeable = False
        vv.flags.writeable = False
        return LayerKV(layer, "local", cfg.sliding_window, pos, kk, vv, name)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _reserved(self) -> list[tuple[str, int]]:
        out = []
        for i in range(len(self)):
            k, v, is_global = self._core.kv_buffers(i)
            out.append(("global" if is_global else "local", k.nbytes + v.nbytes))
        return out

    @property
    def nbytes(self) -> int:
        """Bytes reserved for the cache (all layers, K and V, at max_seq_len)."""
        return sum(b for _, b in self._reserved())

    def summary(self) -> str:
        """Memory by layer kind, against the same cache with every layer global."""
        cfg = self._engine.config
        res = self._reserved()
        by = {"global": [0, 0], "local": [0, 0]}
        for kind, b in res:
            by[kind][0] += 1
            by[kind][1] += b
        slots = sum(self._core.kv_buffers(i)[0].shape[0] for i in range(len(self)))
        per_pos = sum(b for _, b in res) // max(slots, 1)
        all_global = cfg.num_layers * self._engine.max_seq_len * per_pos
        total = by["global"][1] + by["local"][1]
        lines = [f"KV cache: {self.n_past} positions cached, max_seq_len "
                 f"{self._engine.max_seq_len}, {self.dtype_stored} K and V",
                 f"  global layers: {by['global'][0]:3d}  {by['global'][1] / 2**20:10.1f} MiB",
                 f"  local layers:  {by['local'][0]:3d}  {by['local'][1] / 2**20:10.1f} MiB "
                 f"(ring of {cfg.sliding_window} + {_core.KV_RING_MARGIN} slots each)",
                 f"  total          {total / 2**20:10.1f} MiB; with every layer global it would "
                 f"be {all_global / 2**20:.1f} MiB ({all_global / max(total, 1):.1f}x)"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<KVCache {self.n_past} positions, {len(self)} layers, {self.nbytes} bytes>"


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# -- the Model's inspection calls (Model.run_with_cache, logit_lens, top_logprobs) --------------
# rows of logits per call: engine.LOGITS_CHUNK (never a full (n_tokens, vocab) matrix)


def kv_cache(engine) -> KVCache:
    with engine.exclusive():
        engine.sync()
        return KVCache(engine)


def run_with_cache(engine, ids: list[int], mm: list, names, layers, heads, query_range,
                   logits: str) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """See Model.run_with_cache (ids already encoded, images as spans)."""
    if not ids:
        raise ValueError("run_with_cache needs at least one token")
    engine.check_prompt(ids, mm)  # before the capture buffers are allocated
    mode = {"all": 2, "last": 1, "none": 0}.get(logits)
    if mode is None:
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    cfg = engine.config
    plan = CapturePlan.make(cfg, len(ids), names, layers, heads, query_range)
    core, out = plan.buffers(cfg, len(ids), len(ids))
    with engine.exclusive():
        lg = engine.evaluate(ids, mode, core, mm, check=False)
    if mode == 1:
        lg = lg[0]
    return lg, out


def logit_lens(engine, cache: dict[str, np.ndarray], layers: list[int], k: int
               ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """See Model.logit_lens (``cache``: the layers' hook_resid_post)."""
    out = {}
    for L in layers:
        resid = cache[f"blocks.{L}.hook_resid_post"]
        ids, lps = [], []
        for s in range(0, len(resid), LOGITS_CHUNK):
            with engine.exclusive():
                lg = engine.core.head(resid[s:s + LOGITS_CHUNK], True)
            i, lp = top_k_logprobs(lg, k)
            ids.append(i)
            lps.append(lp)
        out[L] = (np.concatenate(ids), np.concatenate(lps))
    return out


def top_logprobs(engine, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """See Model.top_logprobs."""
    if not ids:
        raise ValueError("top_logprobs needs at least one token")
    engine.check_prompt(ids)
    out_i, out_l = [], []
    with engine.exclusive():
        engine.fresh()
        for s in range(0, len(ids), LOGITS_CHUNK):
            lg = engine.feed(ids[s:s + LOGITS_CHUNK], 2, check=False)
            i, lp = top_k_logprobs(lg, k)
            out_i.append(i)
            out_l.append(lp)
    return np.concatenate(out_i), np.concatenate(out_l)


def top_k_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, k) int64, logprobs (n, k) float32) of each row's k most likely tokens."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, logits.shape[-1])
    lp = log_softmax(logits.astype(np.float64))
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return (np.take_along_axis(idx, order, -1).astype(np.int64),
            np.take_along_axis(vals, order, -1).astype(np.float32))
