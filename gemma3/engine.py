"""The engine: the one owner of the C model (``gemma3._core.Model``).

It holds the call lock, the pool of KV sequences and the feed protocol of sequence 0:

* sequence 0 is the interactive context. The engine keeps the token ids it caches (``ids``) so
  that a prompt extending the cached one — the next turn of a chat, a longer prompt — feeds only
  the new tokens, and the images in it (``images``: (start, pixel digest)) since every image's
  soft tokens share one id;
* sequences 1.. are scratch: :meth:`Engine.slots` lends them (empty) to batch generation and
  scoring and resets them afterwards;
* :meth:`Engine.run_packed` is the one place that cuts several sequences' tokens into bounded
  forward calls.

Who decides what (each rule lives on one side of the Python/C boundary):

* token ids in the vocabulary and room in the cache: C (``g3_model_check_tokens``, applied by
  every forward call). A prompt is fed in several calls, so the engine asks C once up front
  (``_core.Model.check_feed``) before the first call touches the cache (:meth:`Engine.check`);
* one public call at a time: the engine's lock (:meth:`Engine.exclusive`, the user-facing
  message below). The C object's own busy flag is a different rule — memory safety against any
  thread calling the private ``_core`` directly — and says so in its own words (py_model.c).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from . import _core
from . import multimodal as _mm
from . import state as _state
from .config import Gemma3Config

PREFILL_CHUNK = 512  # tokens per forward call while prefilling (interruptible between chunks)
LOGITS_CHUNK = 128  # tokens per call when every position's logits are wanted


def _no_rows(logits: int, vocab: int) -> np.ndarray:
    """feed's answer for no tokens in mode 2 (no logit rows) or 3 (no ids)."""
    return np.zeros((0, vocab), np.float32) if logits == 2 else np.zeros(0, np.int32)


BUSY = ("this model is already running a call in another thread; use one model per thread or "
        "serialize the calls")


class Closed:
    """Stands in for the C model (and the vision tower) after close(): every use raises."""

    n_past = 0
    n_seq = 0

    def __getattr__(self, name):
        raise RuntimeError("this model was closed")


class Engine:
    """Owns ``core`` (the C model), the lock, the sequence slots and sequence 0's bookkeeping.

    Methods that read or change sequences expect the caller to hold :meth:`exclusive`; the
    checks with an explicit start (``check(..., at=0)``, :meth:`check_prompt`, :meth:`check_ids`)
    read only the configuration and need no lock."""

    def __init__(self, core: _core.Model, config: Gemma3Config, max_seq_len: int,
                 vision=None):
        self.core = core
        self.config = config
        self.max_seq_len = max_seq_len
        self.vision = vision  # gemma3.vision.VisionTower or None
        self.ids: list[int] = []  # what sequence 0 caches
        self.pending: list[int] = []  # fed in the call under way (see sync)
        self.images: list[tuple[int, str]] = []  # (start, digest) of the images in self.ids
        # epoch changes whenever a call replaces the cached context, so that a stream paused
        # while another call used the model notices and stops instead of going on from someone
        # else's context.
        self.epoch = 0
        # hooked: sequence 0's cache was written by a hooked pass (gemma3.hooks), or by one that
        # a hook stopped half-way: no later prompt may reuse it
        self.hooked = False
        self._lock = threading.Lock()
        # deep rollback and saved states (gemma3.state): ring checkpoints of sequence 0, the
        # States saved from this model (weakly), the positions the last prefill fed again
        self.checkpoints = _state.Checkpoints(
            config.sliding_window, max(2 * config.sliding_window, 2 * PREFILL_CHUNK))
        self.states = _state.Registry()
        self.recomputed = 0

    def remember(self, st: _state.State) -> _state.State:
        """Makes a saved State a candidate for prefix reuse (gemma3.state.rewind)."""
        return self.states.add(st)

    # -- the lock ------------------------------------------------------------------------------
    @contextmanager
    def exclusive(self):
        """One call at a time: a concurrent call gets RuntimeError instead of a corrupted cache
        (refusing rather than waiting keeps a paused stream from blocking everyone)."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(BUSY)
        try:
            yield
        finally:
            self._lock.release()

    # -- checks (the rules are C's, see the module docstring) ----------------------------------
    def check(self, ids: Sequence[int] | np.ndarray, mask: np.ndarray | None = None,
              at: int | None = None) -> None:
        """ValueError unless ``ids`` can be fed to a sequence holding ``at`` positions (default:
        what sequence 0 holds): ids in the vocabulary (except where ``mask`` marks image soft
        tokens) and room for all of them. ``ids`` must fit in int32 (gemma3._check.as_ids)."""
        self.core.check_feed(np.asarray(ids, np.int32), mask, -1 if at is None else at)

    def check_ids(self, ids: Sequence[int]) -> None:
        """ValueError unless every id is in the vocabulary (any length: texts scored in windows
        may be longer than the cache)."""
        n = self.max_seq_len
        for s in range(0, max(len(ids), 1), n):
            self.check(ids[s:s + n], at=0)

    @property
    def mm_tokens(self) -> int:
        return self.vision.config.mm_tokens_per_image if self.vision is not None else 0

    # -- sequence 0 bookkeeping -----------------------------------------------------------------
    def sync(self) -> None:
        """Reconciles ``ids`` with the C cache after an interrupted or failed call."""
        n = self.core.n_past
        if n == len(self.ids):
            pass
        elif n == len(self.ids) + len(self.pending):
            self.ids += self.pending
        else:
            self.reset()
        self.pending = []

    def reset(self) -> None:
        """Forgets sequence 0's context."""
        self.core.reset(0)
        self.ids = []
        self.pending = []
        self.images = []
        self.hooked = False
        self.checkpoints.clear()
        self.epoch += 1

    def truncate(self, n: int) -> None:
        """Keeps sequence 0's first n positions; only within the rings' rollback margin (C's
        rule, csrc/model/state.h), else RuntimeError (a bug in the caller)."""
        self.sync()
        if not self.core.truncate(n):
            raise RuntimeError(f"cannot cut {len(self.ids)} cached positions back to {n} "
                               "without recompute")
        del self.ids[n:]
        self.images = [(s, d) for s, d in self.images if s < n]
        self.checkpoints.drop_after(n)

    def fresh(self) -> None:
        """Empties sequence 0 for a call that evaluates from an empty context."""
        self.sync()
        self.reset()

    def set_lora(self, deltas: list) -> None:
        """Replaces the active LoRA deltas ``[(key, A, B, scale)]`` (gemma3.adapters). The C core
        empties every sequence's cache, computed with other weights; so is sequence 0's record."""
        with self.exclusive():
            self.core.set_lora(deltas)
            self.reset()

    def close(self) -> None:
        with self.exclusive():
            self.core = Closed()
            if self.vision is not None:  # an mmproj tower maps its own file
                self.vision = Closed()
            self.ids = []
            self.checkpoints.clear()

    # -- feeding sequence 0 ---------------------------------------------------------------------
    def feed(self, ids: Sequence[int], logits: int, capture: dict | None = None,
             mm: list | None = None, check: bool = True) -> np.ndarray | None:
        """Runs ids through the model after the cached context. logits: 0 none, 1 last, 2 all,
        3 every row's arg-max only (int32 (T,): the ids a greedy draw picks from mode 2's rows,
        for a third of the LM head's integer work, csrc/kernels/matmul.h g3_matmul_argmax).
        A capture dict (see inspect.CapturePlan) needs the ids in one call. ``mm``: image spans
        (gemma3.multimodal.ImageSpan, positions absolute) whose soft tokens take the image's
        projected embeddings. The whole input is checked before the first call (``check=False``:
        the caller already did)."""
        arr = np.asarray(ids, dtype=np.int32)
        if check:
            self.check(arr, _mm.soft_mask(len(arr), len(self.ids), mm, self.mm_tokens)
                       if mm else None)
        return self._feed(arr, logits, capture, mm)

    def check_prompt(self, ids: Sequence[int], mm: list | None = None) -> None:
        """check for a prompt fed from an empty sequence (image soft tokens exempt)."""
        self.check(ids, _mm.soft_mask(len(ids), 0, mm, self.mm_tokens) if mm else None, at=0)

    def evaluate(self, ids: Sequence[int], logits: int, capture: dict | None = None,
                 mm: list | None = None, check: bool = True, hooks=None) -> np.ndarray | None:
        """feed from an empty sequence 0; the input is checked before the cache is touched.
        ``hooks`` (a gemma3.hooks.Plan) run the whole input in one call, as a capture does."""
        arr = np.asarray(ids, dtype=np.int32)
        if check:
            self.check_prompt(arr, mm)
        self.fresh()
        if hooks is not None and capture is None:
            capture = {}  # one call: the hooks see the whole prompt
        return self._feed(arr, logits, capture, mm, hooks)

    def _kw(self, capture: dict | None, hooks) -> dict:
        """core.forward's optional arguments (hooked passes mark the cache, see __init__)."""
        kw = {} if capture is None else {"capture": capture}
        if hooks is not None:
            self.hooked = True
            kw["hooks"] = hooks.spec
        return kw

    def step(self, tok: int, capture: dict | None = None, hooks=None) -> np.ndarray:
        """Decodes one token (the generate loop's hot path: no extra work; the C forward checks
        its single call itself). Returns the logits (vocab,)."""
        self.pending = [tok]
        arr = np.array(self.pending, np.int32)
        out = (self.core.forward(arr, 1) if capture is None and hooks is None else
               self.core.forward(arr, 1, **self._kw(capture, hooks)))
        self.ids.append(tok)
        self.pending = []
        if not self.hooked:  # a hooked cache is never reused, so never checkpointed
            self.checkpoints.take(self.core, len(self.ids))
        return out[0]

    def _feed(self, arr: np.ndarray, logits: int, capture: dict | None, mm: list | None,
              hooks=None) -> np.ndarray | None:
        if mm:
            return self._feed_mm(arr, logits, capture, mm, hooks)
        core = self.core
        if capture is not None:
            self.pending = arr.tolist()
            out = core.forward(arr, logits, **self._kw(capture, hooks))
            self.ids += self.pending
            self.pending = []
            return out
        every = logits in (2, 3)  # rows of every position
        chunk = LOGITS_CHUNK if every else PREFILL_CHUNK
        parts, out, s = [], None, 0
        while s < len(arr):
            # cut there to take a ring checkpoint (none of a hooked cache: it is never reused)
            due = 0 if hooks is not None else self.checkpoints.due(len(self.ids))
            e = min(s + chunk, len(arr), s + max(1, due - len(self.ids)) if due else len(arr))
            piece = arr[s:e]
            mode = logits if (every or e >= len(arr)) else 0
            self.pending = piece.tolist()
            out = core.forward(piece, mode, **self._kw(None, hooks))
            self.ids += self.pending
            self.pending = []
            if not self.hooked:
                self.checkpoints.take(core, len(self.ids))
            if every:
                parts.append(out)
            s = e
        if every:
            return np.concatenate(parts) if parts else _no_rows(logits, self.config.vocab_size)
        return out

    def _feed_mm(self, arr: np.ndarray, logits: int, capture: dict | None, mm: list,
                 hooks=None) -> np.ndarray | None:
        """feed with image spans: each image's embeddings are written unscaled at its soft
        tokens (embd / embd_mask), every image its own mask value so that consecutive images are
        separate bidirectional blocks, and no forward call cuts through an image."""
        if self.vision is None:
            raise ValueError(_mm.NO_TOWER)
        base, M, E = len(self.ids), self.mm_tokens, self.config.hidden_size
        rel = [sp.start - base for sp in mm]
        if any(r < 0 or r + M > len(arr) for r in rel):
            raise ValueError("an image's soft tokens fall outside the tokens being fed")
        emb = _mm.encode_spans(self.vision, mm)  # before touching the cache
        embd = np.zeros((len(arr), E), np.float32)
        mask = np.zeros(len(arr), np.uint8)
        for k, (r, sp) in enumerate(zip(rel, mm, strict=True)):
            embd[r:r + M] = emb[sp.digest]
            mask[r:r + M] = k % 255 + 1
        every = logits in (2, 3)
        chunk = len(arr) if capture is not None else (LOGITS_CHUNK if every else PREFILL_CHUNK)
        parts, out = [], None
        for s, e in _mm.chunk_bounds(len(arr), rel, M, chunk):
            mode = logits if (every or e == len(arr)) else 0
            # recorded before the call: a stale entry past the cache only makes reuse stricter
            self.images += [(sp.start, sp.digest) for sp in mm if s <= sp.start - base < e]
            self.pending = arr[s:e].tolist()
            out = self.core.forward(arr[s:e], mode, embd[s:e], mask[s:e],
                                    **self._kw(capture, hooks))
            self.ids += self.pending
            self.pending = []
            if every:
                parts.append(out)
        return np.concatenate(parts) if every else out

    def prefill(self, ids: list[int], mm: list | None = None,
                capture_last: Callable[[int], dict | None] | None = None, hooks=None
                ) -> np.ndarray:
        """Makes sequence 0 hold exactly ids, reusing the longest cached prefix it may (images
        compared by their pixels), and returns the last position's logits (vocab,).
        ``capture_last(n_keys)``: a capture dict for the last position, fed on its own.
        ``hooks`` (gemma3.hooks.Plan): every chunk passes through them; nothing cached is reused
        by or after a hooked prefill."""
        self.sync()
        if hooks is not None or self.hooked:
            self.reset()
        if not ids:
            raise ValueError("the prompt is empty: give at least one token (e.g. add_bos=True)")
        mm = mm or []
        # the whole prompt, before the cache is cut back or fed (the cached prefix is fed again
        # if the cache cannot be truncated: room and ids are those of the whole prompt anyway)
        self.check_prompt(ids, mm)
        self.epoch += 1
        # the longest usable prefix from the live sequence or a saved State, cut back within
        # the rings' margin or from a ring checkpoint (at least one token is fed to get logits)
        # (a hooked prefill starts from nothing: its hooks must see the whole prompt)
        common = 0 if hooks is not None else _state.rewind(self, ids, mm, len(ids) - 1)
        rest_mm = [sp for sp in mm if sp.start >= common]
        rest = np.asarray(ids[common:], np.int32)
        if capture_last is None:
            return self._feed(rest, 1, None, rest_mm, hooks)[0]
        if len(rest) > 1:  # everything but the last token as usual, the last one captured
            self._feed(rest[:-1], 0, None, rest_mm, hooks)
        return self._feed(rest[-1:], 1, capture_last(len(self.ids) + 1), None, hooks)[0]

    # -- the sequence pool ----------------------------------------------------------------------
    @contextmanager
    def slots(self, n: int) -> Iterator[list[int]]:
        """Lends n empty scratch sequences (1..n; sequence 0 stays the interactive context),
        allocating them on first use (lazily-touched memory), and resets them afterwards."""
        core = self.core
        if core.n_seq < n + 1:
            core.set_n_seq(n + 1)
        seqs = list(range(1, n + 1))
        for s in seqs:
            core.reset(s)
        try:
            yield seqs
        finally:
            for s in seqs:
                core.reset(s)

    def run_packed(self, streams: Sequence[tuple[int, Sequence[int]]], budget: int,
                   logits: int) -> Iterator[tuple[list[tuple[int, int, int]], np.ndarray | None]]:
        """Feeds several sequences' tokens, ``streams = [(seq, tokens)]``, in forward calls of at
        most ``budget`` tokens: each call takes the next tokens of every unfinished stream in
        order until the budget is spent. Yields ``(pieces, out)`` per call, ``pieces`` = [(k,
        start, stop)] (stream k's tokens[start:stop], in the call's order). ``logits``: 0 none;
        1 one row per piece, computed only in calls where some stream ends (its last token's
        row predicts what follows); 2 every token's row."""
        pos = [0] * len(streams)
        core = self.core
        while True:
            ids: list[int] = []
            seqs, lens, pieces, room, ends = [], [], [], budget, False
            for k, (s, toks) in enumerate(streams):
                n = min(len(toks) - pos[k], room)
                if n <= 0:
                    continue
                ids += toks[pos[k]:pos[k] + n]
                seqs.append(s)
                lens.append(n)
                pieces.append((k, pos[k], pos[k] + n))
                pos[k] += n
                ends = ends or pos[k] == len(toks)
                room -= n
                if not room:
                    break
            if not pieces:
                return
            mode = 2 if logits == 2 else (1 if logits == 1 and ends else 0)
            out = core.forward(np.asarray(ids, np.int32), mode, seqs=np.asarray(seqs, np.int32),
                               lens=np.asarray(lens, np.int64))
            yield pieces, out
