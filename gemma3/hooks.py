"""Interventions: hooks that write, with TransformerLens names and semantics.

``model.run_with_hooks(prompt, fwd_hooks=[(name, fn), ...])`` runs a prompt from an empty context
and returns its logits; at each named point ``fn(activation, hook)`` receives the activation as a
writable float32 array with the shape ``run_with_cache`` records (``(T, E)``, ``(T, H, D)``,
``(T, Hkv, D)``; see gemma3.inspect) and may change it in place or return a replacement of the
same shape (``None``: keep the array as it is now). ``name`` may be a string or a filter
function ``name -> bool`` over every hookable name. ``hook.name``, ``hook.layer()`` and
``hook.positions`` (absolute positions of the rows) describe the point. The same ``fwd_hooks=``
works in ``generate``/``stream``, where each forward call (prompt chunks, then one token per
step) passes through the hooks.

Hookable names: ``blocks.L.hook_resid_pre``, ``attn.hook_q/k/v`` (q/k after q/k-norm and
RoPE; writing k/v changes what is attended to and cached), ``attn.hook_z``, ``hook_attn_out``,
``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post``, ``ln_final.hook_normalized``, and in
:func:`run_with_hooks` also ``attn.hook_attn_scores`` (T, ...) and ``attn.hook_pattern``
``(H, T, T)``: when they are changed the layer's attention output is recomputed from them
(``pattern = softmax(scores)``, ``z = pattern @ v``) in NumPy.

Built-in interventions run inside the C forward pass with no Python call at all (the C code is
csrc/model/hooks.c): pass them as the ``fn`` of a hook. Each is also an ordinary callable doing
the same thing to a NumPy array (its twin, used by the tests):

* :func:`ablate_heads` — zero or mean ablation of heads of ``attn.hook_z`` (or q/k/v);
* :func:`steer` — add ``scale * vector`` at chosen positions (or all);
* :func:`patch` — replace an activation at chosen positions with one from another run's cache.

With no hook a forward pass runs exactly as without this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _check
from . import inspect as _inspect

# point ids of csrc/model/hooks.h, by inspect's core key
POINT = {"resid_pre": 0, "q": 1, "k": 2, "v": 3, "z": 4, "attn_out": 5, "resid_mid": 6,
         "mlp_out": 7, "resid_post": 8, "final_norm": 9}
SET, ADD, CALL = 0, 1, 2
ATTN_MAPS = ("pattern", "scores")  # writable in run_with_hooks only (recomputed into z)
PER_HEAD = ("q", "k", "v", "z")


def hook_names(n_layers: int, maps: bool = True) -> list[str]:
    """Every hookable name (``maps``: with the attention maps of run_with_hooks)."""
    return [n for n in _inspect.all_names(n_layers)
            if maps or not n.endswith(("hook_pattern", "hook_attn_scores"))]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function is told about the point it runs at."""

    name: str
    positions: np.ndarray  # (T,) int64 absolute positions of the activation's rows

    def layer(self) -> int | None:
        """The block index (None for ln_final.hook_normalized)."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None


def _shape(cfg, key: str, T: int) -> tuple[int, ...]:
    if key in ("q", "z"):
        return (T, cfg.num_heads, cfg.head_dim)
    if key in ("k", "v"):
        return (T, cfg.num_kv_heads, cfg.head_dim)
    return (T, cfg.hidden_size)


def _positions(positions) -> np.ndarray | None:
    if positions is None:
        return None
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    p = np.unique(np.asarray([_check.integer("positions item", x) for x in positions], np.int64))
    if len(p) and p[0] < 0:
        raise ValueError(f"positions must be >= 0, got {int(p[0])}")
    return p


class Intervention:
    """A built-in hook: compiled into C ops (:meth:`ops`), or called as a NumPy twin."""

    positions: np.ndarray | None = None

    def ops(self, cfg, key: str, name: str) -> list[tuple]:
        raise NotImplementedError

    def check_length(self, n_tokens: int, name: str) -> None:
        """For run_with_hooks: the intervention fits a prompt of n_tokens."""

    def _rows(self, hook: HookPoint) -> np.ndarray:
        """Indices of the activation's rows this intervention touches."""
        pos = hook.positions
        if self.positions is None:
            return np.arange(len(pos))
        return np.nonzero(np.isin(pos, self.positions))[0]


def _head_width(cfg, key: str, name: str) -> tuple[int, int]:
    if key not in PER_HEAD:
        raise ValueError(f"{name}: head interventions apply to attn.hook_q/k/v/z, not here")
    n = cfg.num_heads if key in ("q", "z") else cfg.num_kv_heads
    return n, cfg.head_dim


class _AblateHeads(Intervention):
    def __init__(self, heads, mean, positions):
        if isinstance(heads, (int, np.integer)):
            heads = [heads]
        self.heads = [_check.integer("heads item", h, 0) for h in heads]
        if not self.heads:
            raise ValueError("ablate_heads needs at least one head")
        self.mean = None
        if mean is not None:
            m = np.asarray(mean, np.float32)
            if m.ndim == 3:  # a cached activation (T, H, D): its mean over positions
                m = m.astype(np.float64).mean(axis=0).astype(np.float32)
            if m.ndim != 2:
                raise ValueError(f"mean must be (heads, head_dim) or a cached (T, heads, "
                                 f"head_dim) activation, got shape {m.shape}")
            self.mean = np.ascontiguousarray(m)
        self.positions = _positions(positions)

    def _check(self, n: int, D: int, name: str) -> None:
        for h in self.heads:
            if h >= n:
                raise ValueError(f"{name}: head {h} out of range ({n} heads)")
        if self.mean is not None and self.mean.shape != (n, D):
            raise ValueError(f"{name}: mean has shape {self.mean.shape}, expected {(n, D)}")

    def ops(self, cfg, key, name):
        n, D = _head_width(cfg, key, name)
        self._check(n, D, name)
        return [(SET, h * D, D, None if self.mean is None else self.mean[h:h + 1], 1.0,
                 self.positions, False) for h in self.heads]

    def __call__(self, act: np.ndarray, hook: HookPoint):
        self._check(act.shape[1], act.shape[2], hook.name)
        rows = self._rows(hook)
        for h in self.heads:
            act[rows, h] = 0.0 if self.mean is None else self.mean[h]
        return act

    def __repr__(self):
        return f"ablate_heads({self.heads}, {'zero' if self.mean is None else 'mean'})"


class _Steer(Intervention):
    def __init__(self, vector, scale, positions):
        self.vector = np.ascontiguousarray(np.asarray(vector, np.float32).reshape(-1))
        self.scale = _check.number("scale", scale)
        self.positions = _positions(positions)

    def ops(self, cfg, key, name):
        W = int(np.prod(_shape(cfg, key, 1)))
        if self.vector.size != W:
            raise ValueError(f"{name}: steering vector has {self.vector.size} values, the "
                             f"activation {W} per position")
        return [(ADD, 0, W, self.vector[None], self.scale, self.positions, False)]

    def __call__(self, act: np.ndarray, hook: HookPoint):
        flat = act.reshape(len(act), -1)
        flat[self._rows(hook)] += np.float32(self.scale) * self.vector
        return act

    def __repr__(self):
        return f"steer(|v|={float(np.linalg.norm(self.vector)):.3g}, scale={self.scale})"


class _Patch(Intervention):
    def __init__(self, source, positions, heads):
        self.source = np.asarray(source, np.float32)
        if self.source.ndim < 2:
            raise ValueError(f"patch source must be a cached activation (T, ...), got shape "
                             f"{self.source.shape}")
        self.positions = _positions(positions)
        if isinstance(heads, (int, np.integer)):
            heads = [heads]
        self.heads = None if heads is None else [_check.integer("heads item", h, 0)
                                                 for h in heads]

    def ops(self, cfg, key, name):
        shape = _shape(cfg, key, len(self.source))
        if self.source.shape != shape:
            raise ValueError(f"{name}: patch source has shape {self.source.shape}, expected "
                             f"(positions,) + {shape[1:]}")
        flat = self.source.reshape(len(self.source), -1)
        if self.heads is None:
            return [(SET, 0, flat.shape[1], np.ascontiguousarray(flat), 1.0, self.positions,
                     True)]
        n, D = _head_width(cfg, key, name)
        for h in self.heads:
            if h >= n:
                raise ValueError(f"{name}: head {h} out of range ({n} heads)")
        return [(SET, h * D, D, np.ascontiguousarray(self.source[:, h]), 1.0, self.positions,
                 True) for h in self.heads]

    def check_length(self, n_tokens, name):
        need = n_tokens if self.positions is None else int(self.positions[-1]) + 1 if len(
            self.positions) else 0
        if len(self.source) < need:
            raise ValueError(f"{name}: the patch source covers {len(self.source)} positions, "
                             f"the patch needs {need}")

    def __call__(self, act: np.ndarray, hook: HookPoint):
        rows = self._rows(hook)
        rows = rows[hook.positions[rows] < len(self.source)]
        src = self.source[hook.positions[rows]]
        if self.heads is None:
            act[rows] = src
        else:
            for h in self.heads:
                act[rows, h] = src[:, h]
        return act

    def __repr__(self):
        return f"patch(source {self.source.shape}, heads={self.heads})"


def ablate_heads(heads: int | Sequence[int], mean: np.ndarray | None = None,
                 positions: int | Sequence[int] | None = None) -> Intervention:
    """Ablation of attention heads, for ``attn.hook_z`` (or hook_q/k/v): the heads' rows are set
    to zero, or with ``mean`` to a per-head mean, ``(H, D)`` or a cached ``(T, H, D)``
    activation (averaged over its positions). ``positions``: absolute positions (default all).
    Runs in C."""
    return _AblateHeads(heads, mean, positions)


def steer(vector: np.ndarray, scale: float = 1.0,
          positions: int | Sequence[int] | None = None) -> Intervention:
    """Adds ``scale * vector`` to the activation at ``positions`` (default every position, in
    generation every new token too). ``vector`` has one position's size (``E`` for residual
    points). Runs in C."""
    return _Steer(vector, scale, positions)


def patch(source: np.ndarray, positions: int | Sequence[int] | None = None,
          heads: int | Sequence[int] | None = None) -> Intervention:
    """Activation patching: the activation at ``positions`` (default all) is replaced by row
    ``position`` of ``source`` — the same hook's activation from another prompt's
    ``run_with_cache`` (shape ``(T_src, ...)``). ``heads`` patches only those heads of a per-head
    point. Positions the source does not hold are left alone. Runs in C."""
    return _Patch(source, positions, heads)


# -- compiling fwd_hooks into the C plan ------------------------------------------------------

def _resolve(cfg, spec, maps: bool) -> list[str]:
    if callable(spec) and not isinstance(spec, str):
        names = [n for n in hook_names(cfg.num_layers, maps) if spec(n)]
        return names
    if not isinstance(spec, str):
        raise TypeError(f"a hook name must be a str or a filter function, got "
                        f"{type(spec).__name__}")
    _inspect._parse_name(spec, cfg.num_layers)  # ValueError for unknown names
    if spec.endswith(("hook_pattern", "hook_attn_scores")) and not maps:
        raise ValueError(f"{spec}: attention maps can be written in run_with_hooks only "
                         f"(in generation hook attn.hook_z instead)")
    return [spec]


def _entries(cfg, fwd_hooks, maps: bool) -> list[tuple[str, int | None, str, Any]]:
    if fwd_hooks is None:
        return []
    if isinstance(fwd_hooks, tuple) and len(fwd_hooks) == 2 and callable(fwd_hooks[1]):
        fwd_hooks = [fwd_hooks]
    out = []
    for item in fwd_hooks:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"fwd_hooks items must be (name or filter, fn) pairs, got {item!r}")
        spec, fn = item
        if not callable(fn):
            raise TypeError(f"the hook for {spec!r} is not callable: {fn!r}")
        for name in _resolve(cfg, spec, maps):
            layer, key = _inspect._parse_name(name, cfg.num_layers)
            if isinstance(fn, Intervention) and key in ATTN_MAPS:
                raise ValueError(f"{name}: built-in interventions apply to activations, not "
                                 f"to attention maps")
            out.append((name, layer, key, fn))
    return out


class Plan:
    """fwd_hooks compiled for the C forward: ``spec`` is the ``hooks=`` argument of
    ``_core.Model.forward``; ``capture`` the maps to record when attention maps are hooked."""

    def __init__(self, cfg, fwd_hooks, n_tokens: int | None = None):
        maps = n_tokens is not None
        self.cfg = cfg
        self.entries = _entries(cfg, fwd_hooks, maps)
        self.calls: dict[int, Callable[[int, np.ndarray, int], np.ndarray]] = {}
        self.capture: dict | None = None
        ops: list[tuple] = []
        map_layers = sorted({L for _, L, k, _ in self.entries if k in ATTN_MAPS})
        if map_layers:
            self._map_hooks(map_layers, n_tokens, ops)
        for name, layer, key, fn in self.entries:
            if key in ATTN_MAPS:
                continue
            L = -1 if layer is None else layer
            if isinstance(fn, Intervention):
                if n_tokens is not None:
                    fn.check_length(n_tokens, name)
                ops += [(L, POINT[key], *op) for op in fn.ops(cfg, key, name)]
            else:
                self.calls[len(ops)] = self._caller(name, key, fn)
                ops.append((L, POINT[key], CALL, 0, 0, None, 0.0, None, False))
        self.spec = (ops, self._dispatch if self.calls else None) if ops else None

    def _caller(self, name: str, key: str, fn):
        cfg = self.cfg

        def call(x: np.ndarray, pos0: int) -> np.ndarray:
            shape = _shape(cfg, key, len(x))
            act = x.reshape(shape)
            hook = HookPoint(name, np.arange(pos0, pos0 + len(x), dtype=np.int64))
            r = fn(act, hook)
            if r is None or r is act:
                return x
            r = np.asarray(r)
            if r.shape != shape:
                raise ValueError(f"the hook at {name} returned shape {r.shape}, expected {shape}")
            return np.ascontiguousarray(r, np.float32)
        return call

    def _dispatch(self, op: int, layer: int, point: int, x: np.ndarray, pos0: int):
        return self.calls[op](x, pos0)

    def _map_hooks(self, layers: list[int], T: int, ops: list) -> None:
        """Attention maps hooked: record scores and pattern (all heads, all queries) and v, and
        at the layer's z point (before any z hook) run the map hooks and recompute z."""
        cfg = self.cfg
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.capture = {}
        for L in layers:
            d = {"heads": np.arange(H, dtype=np.int32), "q0": 0, "q1": T,
                 "scores": np.empty((H, T, T), np.float32),
                 "pattern": np.empty((H, T, T), np.float32),
                 "v": np.empty((T, Hkv, D), np.float32)}
            self.capture[L] = d
            fns = [(n, k, fn) for n, LL, k, fn in self.entries if LL == L and k in ATTN_MAPS]
            self.calls[len(ops)] = self._map_caller(L, d, fns)
            ops.append((L, POINT["z"], CALL, 0, 0, None, 0.0, None, False))

    def _map_caller(self, L: int, d: dict, fns: list):
        cfg = self.cfg
        rep = cfg.num_heads // cfg.num_kv_heads

        def call(x: np.ndarray, pos0: int) -> np.ndarray:
            T = len(x)
            hook_pos = np.arange(pos0, pos0 + T, dtype=np.int64)
            scores, pattern = d["scores"], d["pattern"]
            changed = False
            for key in ATTN_MAPS[::-1]:  # scores come before the pattern
                for name, k, fn in fns:
                    if k != key:
                        continue
                    arr = scores if key == "scores" else pattern
                    before = arr.copy()
                    r = fn(arr, HookPoint(name, hook_pos))
                    if r is not None and r is not arr:
                        r = np.asarray(r)
                        if r.shape != arr.shape:
                            raise ValueError(f"the hook at {name} returned shape {r.shape}, "
                                             f"expected {arr.shape}")
                        arr[...] = r
                    if not np.array_equal(before, arr):
                        changed = True
                        if key == "scores":  # the pattern follows the new scores
                            s = scores.astype(np.float64)
                            s -= s.max(axis=-1, keepdims=True)
                            e = np.exp(s)
                            pattern[...] = e / e.sum(axis=-1, keepdims=True)
            if not changed:
                return x
            v = np.repeat(d["v"], rep, axis=1)  # (T, H, D)
            z = np.einsum("hqk,khd->qhd", pattern.astype(np.float64), v.astype(np.float64))
            return np.ascontiguousarray(z.reshape(T, -1), np.float32)
        return call


def plan(cfg, fwd_hooks, n_tokens: int | None = None) -> Plan | None:
    """A compiled Plan, or None when there is nothing to hook (the plain forward runs)."""
    p = Plan(cfg, fwd_hooks, n_tokens)
    return p if p.spec is not None else None


# -- the Model's calls --------------------------------------------------------------------------

def run_with_hooks(engine, ids: list[int], mm: list, fwd_hooks, logits: str
                   ) -> np.ndarray | None:
    """See Model.run_with_hooks (ids already encoded, images as spans)."""
    if not ids:
        raise ValueError("run_with_hooks needs at least one token")
    engine.check_prompt(ids, mm)
    mode = {"all": 2, "last": 1, "none": 0}.get(logits)
    if mode is None:
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    p = plan(engine.config, fwd_hooks, len(ids))
    with engine.exclusive():
        lg = engine.evaluate(ids, mode, None if p is None else p.capture, mm, check=False,
                             hooks=p)
    return lg[0] if mode == 1 else lg
