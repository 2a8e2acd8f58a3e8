"""KV state you can keep, fork and roll back: :class:`State`, its file form, ring checkpoints and
the choice of where a new prompt starts.

What a rollback costs (the rule is C's, ``csrc/model/state.h``):

* global layers keep every position: cutting them back is free;
* local rings keep ``window + _core.KV_RING_MARGIN`` positions, so dropping the last
  ``KV_RING_MARGIN + 1`` positions is free too (rejected speculative drafts, a regenerated reply);
* deeper, the engine restores the rings from the nearest :class:`Checkpoints` entry at or below
  the target and feeds the tokens from there again: the recompute is at most one checkpoint
  interval (``max(2 * window, 1024)`` by default; the interval doubles when more than
  ``max_count`` = 8 checkpoints would be kept, so memory stays at most 8 ring copies: 15.9 MiB
  each on the 270M, 23.4 MiB on the 1B, 239 MiB on the 4B; tune ``engine.checkpoints``).

A :class:`State` is immutable: its bytes are a read-only array, so ``fork(n)`` hands out n States
sharing one copy. States saved from a model are remembered (weakly) by its engine, and a prompt
starts from whichever of the live sequence and those states needs the fewest tokens fed.

File form (``State.save(path)``, ``load_state(path)``), little-endian::

    b"G3STATE\\0"  u32 version (1)  u32 header length  header (UTF-8 JSON)
    ids int32[n_ids]  KV bytes[kv_bytes]  per checkpoint: bytes[size]
    sha256 of everything above (32 bytes)

The header names the model (``fingerprint``: ``_core.Model.fingerprint`` as 16 hex digits, plus
the layer/width/vocab it had, for the message), ``n_past``, ``images`` ([start, digest]) and the
checkpoints ([position, size]). A file is read like any hostile file: sizes are checked against
the file length before anything is read, the checksum before anything is used, and every field
against the model before the cache is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import _core
from . import multimodal as _mm
from ._core import FormatError

MAGIC = b"G3STATE\0"
VERSION = 2  # 2 records the KV cache type (kv_dtype); a version 1 file is a float32 cache
_VERSIONS = (1, 2)
#: ggml type ids of the KV cache types (gemma3.loading.KV_DTYPES) by name
KV_TYPE_NAMES = {0: "f32", 1: "f16", 8: "q8_0", 30: "bf16"}
_HEAD = struct.Struct("<8sII")
_DIGEST = 32
MAX_HEADER = 1 << 24  # a header describes ids, images and checkpoints: 16 MiB is far past that


@dataclass(frozen=True, eq=False)
class State:
    """Sequence 0's KV state: the token ids it caches, their K/V (``data``: uint8, read-only,
    layout in csrc/model/state.h) and the ring checkpoints that make rolling it back cheap.
    Tied to the model it came from by ``fingerprint``."""

    ids: tuple[int, ...]
    images: tuple[tuple[int, str], ...]
    data: np.ndarray
    fingerprint: int
    checkpoints: dict[int, np.ndarray] = field(default_factory=dict)
    kv_type: int = 0  # the cache's type (``_core.Model.kv_type``): the bytes are in that type

    @property
    def kv_dtype(self) -> str:
        return KV_TYPE_NAMES.get(self.kv_type, str(self.kv_type))

    @property
    def n_past(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + sum(c.nbytes for c in self.checkpoints.values())

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"<gemma3 State: {self.n_past} positions, {self.nbytes / 2**20:.1f} MiB, "
                f"{len(self.checkpoints)} checkpoints>")

    def save(self, path: str | os.PathLike, model_info: dict | None = None) -> None:
        """Writes the file form (see the module docstring)."""
        ck = sorted(self.checkpoints.items())
        header = {"fingerprint": f"{self.fingerprint:016x}", "n_past": self.n_past,
                  "kv_bytes": int(self.data.nbytes), "images": [list(x) for x in self.images],
                  "checkpoints": [[p, int(a.nbytes)] for p, a in ck], "model": model_info or {},
                  "kv_dtype": self.kv_dtype}
        hb = json.dumps(header, sort_keys=True).encode()
        h = hashlib.sha256()
        tmp = os.fspath(path) + ".tmp"
        with open(tmp, "wb") as f:
            for part in (_HEAD.pack(MAGIC, VERSION, len(hb)), hb,
                         np.asarray(self.ids, "<i4").tobytes(), self.data.tobytes(),
                         *(a.tobytes() for _, a in ck)):
                h.update(part)
                f.write(part)
            f.write(h.digest())
        os.replace(tmp, path)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def model_info(config) -> dict:
    """What the header records of the model, to name it in a mismatch message."""
    return {"name": config.name or "", "layers": config.num_layers, "width": config.hidden_size,
            "vocab": config.vocab_size}


def capture(engine) -> State:
    """A State of sequence 0 (the caller holds engine.exclusive() and has synced)."""
    if engine.hooked:
        raise ValueError("the cached context was computed under fwd_hooks: it cannot be saved "
                         "as a State (it would be reused as a plain context); reset or run the "
                         "prompt again without hooks first")
    core = engine.core
    return engine.remember(State(tuple(engine.ids), tuple(engine.images),
                                 _readonly(core.state_save(0)), core.fingerprint,
                                 dict(engine.checkpoints.at), core.kv_type))


def read(path: str | os.PathLike, core, config) -> State:
    """Reads and validates a state file for this model (FormatError naming what is wrong)."""
    with open(path, "rb") as f:
        raw = f.read()
    where = f"state file {os.fspath(path)!r}"

    def bad(msg: str) -> FormatError:
        return FormatError(f"{where}: {msg}")

    if len(raw) < _HEAD.size + _DIGEST:
        raise bad(f"truncated: {len(raw)} bytes is shorter than any state file")
    magic, version, hlen = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise bad("not a gemma3 state file (bad magic)")
    if version not in _VERSIONS:
        raise bad(f"format version {version} is not supported (this gemma3 reads "
                  f"{', '.join(map(str, _VERSIONS))})")
    if hlen > MAX_HEADER or _HEAD.size + hlen + _DIGEST > len(raw):
        raise bad(f"truncated or corrupt: header of {hlen} bytes in a file of {len(raw)}")
    try:
        head = json.loads(raw[_HEAD.size:_HEAD.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    n, kvb, images, ck, fp = _fields(head, bad)
    body = _HEAD.size + hlen
    need = body + 4 * n + kvb + sum(s for _, s in ck) + _DIGEST
    if len(raw) != need:
        raise bad(f"{'truncated' if len(raw) < need else 'has trailing bytes'}: the header "
                  f"describes {need} bytes, the file has {len(raw)}")
    if hashlib.sha256(memoryview(raw)[:-_DIGEST]).digest() != raw[-_DIGEST:]:
        raise bad("checksum mismatch: the file was altered or damaged")
    if fp != core.fingerprint:
        info = head.get("model") if isinstance(head.get("model"), dict) else {}
        raise bad(f"saved from a different model ({_describe(info)}, fingerprint {fp:016x}); "
                  f"this model is {_describe(model_info(config))}, fingerprint "
                  f"{core.fingerprint:016x}")
    kvd = head.get("kv_dtype", "f32") if version >= 2 else "f32"
    mine = KV_TYPE_NAMES.get(core.kv_type)
    if kvd not in KV_TYPE_NAMES.values():
        raise bad(f"header field 'kv_dtype' must be one of {sorted(KV_TYPE_NAMES.values())}, "
                  f"got {kvd!r}")
    if kvd != mine:
        raise bad(f"its KV cache is {kvd} but this model caches {mine}: load the model with "
                  f"kv_dtype={kvd!r} to use it")
    buf = np.frombuffer(raw, np.uint8)
    ids = np.frombuffer(raw, "<i4", n, body)
    if n and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise bad(f"token ids outside the vocabulary (0..{config.vocab_size - 1})")
    at = body + 4 * n
    if kvb != core.state_bytes(n):
        raise bad(f"{n} positions need {core.state_bytes(n)} bytes of K/V, the header says {kvb}")
    data = _readonly(buf[at:at + kvb].copy())
    at += kvb
    checkpoints = {}
    for p, s in ck:
        if s != core.state_bytes(p, True):
            raise bad(f"checkpoint at {p} needs {core.state_bytes(p, True)} bytes, the header "
                      f"says {s}")
        checkpoints[p] = _readonly(buf[at:at + s].copy())
        at += s
    return State(tuple(ids.tolist()), images, data, fp, checkpoints, core.kv_type)


def _fields(head, bad):
    if not isinstance(head, dict):
        raise bad("header is not a JSON object")

    def count(key, v=None):
        v = head.get(key) if v is None else v
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**40:
            raise bad(f"header field {key!r} must be a non-negative integer, got {v!r}")
        return v

    n, kvb = count("n_past"), count("kv_bytes")
    fp = head.get("fingerprint")
    if not isinstance(fp, str) or len(fp) != 16 or any(c not in "0123456789abcdef" for c in fp):
        raise bad(f"header field 'fingerprint' must be 16 hex digits, got {fp!r}")
    images, ck = head.get("images"), head.get("checkpoints")
    if not isinstance(images, list) or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[1], str) for x in images):
        raise bad("header field 'images' must be a list of [start, digest]")
    images = tuple((count("images start", x[0]), x[1]) for x in images)
    if any(s >= n for s, _ in images):
        raise bad("an image starts past the cached positions")
    if not isinstance(ck, list) or not all(isinstance(x, list) and len(x) == 2 for x in ck):
        raise bad("header field 'checkpoints' must be a list of [position, size]")
    ck = [(count("checkpoint position", p), count("checkpoint size", s)) for p, s in ck]
    if any(p > n or p == 0 for p, _ in ck) or len({p for p, _ in ck}) != len(ck):
        raise bad("checkpoint positions must be distinct and within 1..n_past")
    return n, kvb, images, ck, int(fp, 16)


def _describe(info: dict) -> str:
    keys = ("name", "layers", "width", "vocab")
    return ", ".join(f"{k} {info.get(k)!r}" for k in keys if k in info) or "unknown"


def coerce(state, engine) -> State:
    """A State (checked against this model) from a State or a path."""
    core = engine.core
    if isinstance(state, (str, os.PathLike)):
        state = read(state, core, engine.config)
    elif not isinstance(state, State):
        raise TypeError(f"expected a gemma3 State or a path, got {type(state).__name__}")
    elif state.fingerprint != core.fingerprint:
        raise ValueError("this State was saved from a different model (fingerprints "
                         f"{state.fingerprint:016x} and {core.fingerprint:016x})")
    elif state.kv_type != core.kv_type:
        raise ValueError(f"this State's KV cache is {state.kv_dtype} but this model caches "
                         f"{KV_TYPE_NAMES.get(core.kv_type)}: load the model with "
                         f"kv_dtype={state.kv_dtype!r} to use it")
    if state.n_past > engine.max_seq_len:
        raise ValueError(f"this State holds {state.n_past} positions; the cache holds "
                         f"{engine.max_seq_len} (max_seq_len)")
    return state


class Checkpoints:
    """Ring checkpoints of sequence 0: ``at[c]`` holds the local rings as they were when the
    sequence held c positions (``_core.Model.state_save(0, rings_only=True)``). One is taken
    whenever ``interval`` positions were added since the last; beyond ``max_count`` every other
    one is dropped and the interval doubles (the worst recompute grows with the context, the
    memory does not)."""

    def __init__(self, window: int, interval: int | None = None, max_count: int = 8):
        self.enabled = window > 0
        self.base = interval if interval is not None else 2 * max(window, 1)
        self.interval = self.base
        self.max_count = max_count
        self.at: dict[int, np.ndarray] = {}

    def clear(self) -> None:
        self.at = {}
        self.interval = self.base

    def last(self) -> int:
        return max(self.at, default=0)

    def due(self, n: int) -> int | None:
        """The position of the next checkpoint, or None when off."""
        return self.last() + self.interval if self.enabled and self.interval > 0 else None

    def take(self, core, n: int) -> None:
        """Checkpoints position n (the cache holds n) when one is due."""
        d = self.due(n)
        if d is None or n < d:
            return
        self.at[n] = _readonly(core.state_save(0, True))
        if len(self.at) > self.max_count:
            keep = sorted(self.at)[1::2]
            self.at = {p: self.at[p] for p in keep}
            self.interval *= 2

    def drop_after(self, n: int) -> None:
        self.at = {p: a for p, a in self.at.items() if p <= n}

    def best(self, n: int, spans: Sequence, m_tokens: int) -> int:
        """The highest checkpoint <= n not inside an image of the new prompt (0 if none)."""
        ok = [p for p in self.at if p <= n and
              _mm.reusable_prefix(p, [], list(spans), m_tokens) == p]
        return max(ok, default=0)


class Registry:
    """The States saved from one model (weakly: dropping a State frees it)."""

    def __init__(self):
        self._refs: weakref.WeakSet[State] = weakref.WeakSet()

    def add(self, s: State) -> State:
        self._refs.add(s)
        return s

    def __iter__(self):
        return iter(list(self._refs))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def free_cut(n_past: int, n: int, window: int, ring: int) -> bool:
    """Python's copy of g3_model_truncate's rule, for planning only (C decides): can a sequence
    holding n_past positions be cut to n without recompute?"""
    if window <= 0 or n_past <= ring or n == n_past:
        return True
    return max(0, n - window + 1) >= n_past - ring


def rewind(engine, ids: list[int], mm: list, limit: int) -> int:
    """Makes sequence 0 hold a prefix of ``ids`` (at most ``limit`` positions) that needs the
    fewest tokens fed, from the live sequence or a remembered State; returns its length. Every
    candidate is planned first, then one is applied: a cut within the rings' margin, a ring
    checkpoint (the caller's feed of ids[start:] includes the recompute), or a reset. Sets
    ``engine.recomputed``: positions cached somewhere (live or saved) that are fed again."""
    cfg, core = engine.config, engine.core
    W, M = cfg.sliding_window, engine.mm_tokens
    ring = min(W + _core.KV_RING_MARGIN, engine.max_seq_len) if W > 0 else engine.max_seq_len

    def plan(src_ids, images, checkpoints) -> tuple[int, int, bool]:
        common = min(_common(src_ids, ids), limit)
        common = _mm.reusable_prefix(common, list(images), mm, M)
        if free_cut(len(src_ids), common, W, ring):
            return common, common, False
        c = max((p for p in checkpoints if p <= common and
                 _mm.reusable_prefix(p, list(images), mm, M) == p), default=0)
        return c, common, True

    best = (*plan(engine.ids, engine.images, engine.checkpoints.at), None)
    cached = best[1]  # the longest prefix cached anywhere
    for st in engine.states:
        if (st.fingerprint == core.fingerprint and st.kv_type == core.kv_type
                and st.n_past <= engine.max_seq_len):
            cand = plan(st.ids, st.images, st.checkpoints)
            cached = max(cached, cand[1])
            if cand[0] > best[0]:
                best = (*cand, st)
    start, common, deep, st = best
    if st is not None:
        load(engine, st)
    engine.recomputed = cached - start
    if start == len(engine.ids):
        pass
    elif not deep and core.truncate(start):
        engine.checkpoints.drop_after(start)
    elif deep and start:
        core.state_load(engine.checkpoints.at[start], start, 0, True)
        engine.checkpoints.drop_after(start)
    else:
        engine.reset()
        return 0
    del engine.ids[start:]
    engine.images = [(s, d) for s, d in engine.images if s < start]
    return start


def save(engine, path, info: dict) -> State:
    with engine.exclusive():
        engine.sync()
        st = capture(engine)
    if path is not None:
        st.save(path, info)
    return st


def restore(engine, state) -> None:
    with engine.exclusive():
        st = coerce(state, engine)
        engine.sync()
        load(engine, st)
        if st is not state:
            engine.remember(st)


def fork(engine, n: int) -> list[State]:
    with engine.exclusive():
        engine.sync()
        st = capture(engine)
    return [st] + [engine.remember(replace(st)) for _ in range(n - 1)]


def load(engine, st: State) -> None:
    """Sequence 0 holds st (the caller holds engine.exclusive())."""
    engine.core.state_load(st.data, st.n_past, 0)
    engine.ids = list(st.ids)
    engine.pending = []
    engine.images = list(st.images)
    engine.checkpoints.clear()
    engine.checkpoints.at = dict(st.checkpoints)
    engine.epoch += 1
