"""The user-facing model: loading, logits, generation, streaming and chat.

The KV cache lives in C; this class keeps the token ids it holds (``_ids``) so that a new prompt
that extends the cached one — the next turn of a chat, a longer prompt — only feeds the new tokens.
The generate loop is Python (one C forward per token, GIL released inside), so Ctrl-C stops it
between tokens and leaves the model usable.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _check, _core
from . import chat as _chat
from . import inspect as _inspect
from . import vision as _vision
from .config import Gemma3Config
from .loader import build_core, is_hf_dir, load_gguf, load_hf_dir
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # tokens per forward call while prefilling (interruptible between chunks)
LOGITS_CHUNK = 128  # tokens per call when every position's logits are wanted


@dataclass
class GenerationConfig:
    """Sampling settings (Hugging Face names). temperature <= 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: Sequence[int] | None = None

    def validate(self, vocab: int) -> None:
        """Checks every field (TypeError for a wrong kind of value, ValueError out of range,
        naming the argument) and normalizes ``stop`` to a tuple, ``logit_bias`` to a dict of
        ints to floats and ``stop_token_ids`` to a tuple of ints."""
        self.max_new_tokens = _check.integer("max_new_tokens", self.max_new_tokens, 0)
        self.temperature = _check.number("temperature", self.temperature, 0)
        self.top_k = _check.integer("top_k", self.top_k, 0)
        self.top_p = _check.number("top_p", self.top_p, 0, 1, lo_open=True)
        self.min_p = _check.number("min_p", self.min_p, 0, 1)
        self.repetition_penalty = _check.number("repetition_penalty", self.repetition_penalty,
                                                0, lo_open=True)
        if self.seed is not None:
            self.seed = _check.integer("seed", self.seed, 0, 2**64 - 1)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)):
            raise TypeError(f"stop must be a str or a list of str, got {type(self.stop).__name__}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        self.stop = tuple(self.stop)
        bias = {} if self.logit_bias is None else self.logit_bias
        if not isinstance(bias, Mapping):
            raise TypeError(f"logit_bias must be a dict {{token_id: bias}}, got "
                            f"{type(bias).__name__}")
        self.logit_bias = {
            _check.integer("logit_bias token id", t, 0, vocab - 1):
                _check.number(f"logit_bias[{t}]", b, finite=False) for t, b in bias.items()}
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
                    self.stop_token_ids, (Sequence, np.ndarray, set, frozenset)):
                raise TypeError(f"stop_token_ids must be a list of token ids, got "
                                f"{type(self.stop_token_ids).__name__}")
            self.stop_token_ids = tuple(_check.integer("stop_token_ids item", t, 0, vocab - 1)
                                        for t in self.stop_token_ids)


def _as_ids(seq: Sequence[int] | np.ndarray, flatten: bool = False, what: str = "token ids"
            ) -> list[int]:
    """Token ids as Python ints; floats, bools and strings raise ValueError (never truncated).
    ``flatten`` also takes a (1, n) batch of one. ``what`` names the argument in messages."""
    if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
        raise TypeError(f"{what} must be a str or a sequence of token ids, got "
                        f"{type(seq).__name__}")
    if not isinstance(seq, np.ndarray) and any(isinstance(t, (bool, np.bool_)) for t in seq):
        raise ValueError(f"{what} must be integers, got a bool")
    arr = np.asarray(seq)
    if flatten and arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of integers, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    return arr.tolist()


class Model:
    """A loaded Gemma 3 model. Create with :func:`gemma3.load`."""

    def __init__(self, core: _core.Model, config: Gemma3Config, tokenizer: Tokenizer | None,
                 path: str, owners: Any, max_seq_len: int):
        self._core = core
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.max_seq_len = max_seq_len
        self._owners = owners  # file mappings the weights point into
        self._ids: list[int] = []
        self._pending: list[int] = []
        # One call at a time: a concurrent call gets RuntimeError instead of corrupting the cache.
        # _epoch changes whenever a call replaces the cached context, so a stream that was
        # paused while another call used the model notices and stops instead of going on from
        # someone else's context.
        self._lock = threading.Lock()
        self._epoch = 0
        self._last_attn = None
        # Vision (gemma3.vision): the tower, and the images in the cached context as
        # (start, digest) — a prompt reuses cached positions only up to the first image whose
        # pixels differ, since every image's soft-token ids are the same id.
        self.vision: _vision.VisionTower | None = None
        self._img: list[tuple[int, str]] = []

    @contextmanager
    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this model is already running a call in another thread; use one "
                               "model per thread or serialize the calls")
        try:
            yield
        finally:
            self._lock.release()

    # -- cache bookkeeping -------------------------------------------------------------------
    def _sync(self) -> None:
        """Reconciles _ids with the C cache after an interrupted or failed call."""
        n = self._core.n_past
        if n == len(self._ids):
            pass
        elif n == len(self._ids) + len(self._pending):
            self._ids += self._pending
        else:
            self._reset()
        self._pending = []

    def reset(self) -> None:
        """Forget the cached context."""
        with self._exclusive():
            self._reset()

    def _reset(self) -> None:
        self._core.reset(0)
        self._ids = []
        self._pending = []
        self._img = []
        self._epoch += 1

    @property
    def n_past(self) -> int:
        """Positions in the KV cache."""
        return self._core.n_past

    @property
    def packed_bytes(self) -> int:
        """Bytes of weights repacked for the integer decode kernels (0 with ``pack=False`` or on
        CPUs without AVX-512 VNNI)."""
        return self._core.packed_bytes

    def _feed(self, ids: Sequence[int], logits: int, capture: dict | None = None,
              mm: list | None = None) -> np.ndarray | None:
        """Runs ids through the model after the cached context. logits: 0 none, 1 last, 2 all.
        A capture dict (see inspect.CapturePlan) needs the ids in one call. ``mm``: image spans
        (gemma3.vision.ImageSpan, positions absolute) whose soft tokens take the image's
        projected embeddings."""
        out = None
        if mm:
            return self._feed_mm(ids, logits, capture, mm)
        if capture is not None:
            self._pending = [int(t) for t in ids]
            out = self._core.forward(np.asarray(ids, dtype=np.int32), logits, capture=capture)
            self._ids += self._pending
            self._pending = []
            return out
        arr = np.asarray(ids, dtype=np.int32)
        if len(self._ids) + len(arr) > self.max_seq_len:
            raise ValueError(f"context overflow: {len(self._ids)} cached + {len(arr)} new tokens "
                             f"exceed max_seq_len={self.max_seq_len}")
        chunk = LOGITS_CHUNK if logits == 2 else PREFILL_CHUNK
        parts = []
        for s in range(0, len(arr), chunk):
            piece = arr[s:s + chunk]
            last = s + chunk >= len(arr)
            mode = logits if (logits == 2 or last) else 0
            self._pending = piece.tolist()
            out = self._core.forward(piece, mode)
            self._ids += self._pending
            self._pending = []
            if logits == 2:
                parts.append(out)
        if logits == 2:
            return np.concatenate(parts) if parts else np.zeros((0, self.config.vocab_size),
                                                                np.float32)
        return out

    def _prefill(self, ids: list[int], attn: tuple | None = None, mm: list | None = None
                 ) -> np.ndarray:
        """Makes the cache hold exactly ids and returns the last position's logits (vocab,).
        With attn, self._last_attn receives the last position's attention (see _attn_capture).
        ``mm``: the prompt's image spans (see _feed)."""
        self._sync()
        if not ids:
            raise ValueError("the prompt is empty: give at least one token (e.g. add_bos=True)")
        mm = mm or []
        self._check_ids(_vision.text_positions(ids, mm, self._mm_tokens()))
        common = 0
        for a, b in zip(self._ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token is fed to get logits
        common = _vision.reusable_prefix(common, self._img, mm, self._mm_tokens())
        self._epoch += 1
        if common < len(self._ids) and not self._core.truncate(common):
            common = 0
            self._reset()
        del self._ids[common:]
        self._img = [(s, d) for s, d in self._img if s < common]
        self._last_attn = None
        rest_mm = [sp for sp in mm if sp.start >= common]
        if attn is None:
            return self._feed(ids[common:], 1, mm=rest_mm)[0]
        rest = ids[common:]
        if len(rest) > 1:  # everything but the last token as usual, the last one captured
            self._feed(rest[:-1], 0, mm=rest_mm)
        cap, self._last_attn = self._attn_capture(attn, len(self._ids) + 1, 0)
        return self._feed(rest[-1:], 1, cap)[0]

    def _mm_tokens(self) -> int:
        return self.vision.config.mm_tokens_per_image if self.vision is not None else 0

    def _feed_mm(self, ids: Sequence[int], logits: int, capture: dict | None, mm: list
                 ) -> np.ndarray | None:
        """_feed with image spans: each image's embeddings are written unscaled at its soft
        tokens (embd / embd_mask), every image its own mask value so that consecutive images are
        separate bidirectional blocks, and no forward call cuts through an image."""
        if self.vision is None:
            raise ValueError("this model has no vision tower: images need a multimodal "
                             "checkpoint (an HF Gemma3ForConditionalGeneration directory, or "
                             "load(text_gguf, mmproj=...))")
        base, M, E = len(self._ids), self._mm_tokens(), self.config.hidden_size
        arr = np.asarray(ids, dtype=np.int32)
        if base + len(arr) > self.max_seq_len:
            raise ValueError(f"context overflow: {base} cached + {len(arr)} new tokens "
                             f"exceed max_seq_len={self.max_seq_len}")
        rel = [sp.start - base for sp in mm]
        if any(r < 0 or r + M > len(arr) for r in rel):
            raise ValueError("an image's soft tokens fall outside the tokens being fed")
        emb = _vision.encode_spans(self.vision, mm)  # before touching the cache
        embd = np.zeros((len(arr), E), np.float32)
        mask = np.zeros(len(arr), np.uint8)
        for k, (r, sp) in enumerate(zip(rel, mm, strict=True)):
            embd[r:r + M] = emb[sp.digest]
            mask[r:r + M] = k % 255 + 1
        chunk = len(arr) if capture is not None else (
            LOGITS_CHUNK if logits == 2 else PREFILL_CHUNK)
        parts, out = [], None
        for s, e in _vision.chunk_bounds(len(arr), rel, M, chunk):
            mode = logits if (logits == 2 or e == len(arr)) else 0
            # recorded before the call: a stale entry past the cache only makes reuse stricter
            self._img += [(sp.start, sp.digest) for sp in mm if s <= sp.start - base < e]
            self._pending = arr[s:e].tolist()
            out = self._core.forward(arr[s:e], mode, embd[s:e], mask[s:e], capture)
            self._ids += self._pending
            self._pending = []
            if logits == 2:
                parts.append(out)
        return np.concatenate(parts) if logits == 2 else out

    def _check_ids(self, ids: Sequence[int]) -> None:
        v = self.config.vocab_size
        for i, t in enumerate(ids):
            if not (isinstance(t, (int, np.integer)) and 0 <= t < v):
                raise ValueError(f"token id {t!r} at index {i} is out of range for a vocabulary "
                                 f"of {v}")

    # -- public API --------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        ids = _as_ids(prompt, what="prompt")
        self._check_ids(ids)
        return ids

    def logits(self, ids: Sequence[int] | np.ndarray | str, last_only: bool = False, *,
               images: Sequence[Any] | None = None, pan_and_scan: bool = False) -> np.ndarray:
        """Logits of a sequence evaluated from an empty context.

        Returns ``(n_tokens, vocab) float32``, or ``(vocab,)`` with ``last_only=True``.
        A string is tokenized with BOS. ``images`` as in :meth:`generate`.
        """
        mm: list = []
        if images is not None:
            ids, mm = self._prompt(ids if isinstance(ids, str) else _as_ids(ids, flatten=True),
                                   images, pan_and_scan)
        ids = self.encode(ids) if isinstance(ids, str) else _as_ids(ids, True, "ids")
        if not ids:
            raise ValueError("logits() needs at least one token")
        self._check_ids(_vision.text_positions(ids, mm, self._mm_tokens()))
        with self._exclusive():
            self._sync()
            self._reset()
            if last_only:
                return self._feed(ids, 1, mm=mm)[0]
            return self._feed(ids, 2, mm=mm)

    def encode_image(self, image: Any, pan_and_scan: bool = False) -> np.ndarray:
        """The projected soft-token embeddings of one picture: ``(M, n_embd)`` float32 (M = 256
        for the released models), or ``(1 + n_crops, M, n_embd)`` with ``pan_and_scan=True``.
        These are what replace the ``<image_soft_token>`` rows, unscaled."""
        if self.vision is None:
            raise ValueError("this model has no vision tower")
        px = _vision.pixel_values(image, pan_and_scan, self.vision.config.image_size)
        out = self.vision.encode(px)
        return out if pan_and_scan or len(px) > 1 else out[0]

    def _stop_ids(self, gc: GenerationConfig) -> set[int]:
        if gc.stop_token_ids is not None:
            return set(int(t) for t in gc.stop_token_ids)
        ids = {self.config.eos_token_id}
        if self.tokenizer is not None:
            for t in (self.tokenizer.eos_id, self.tokenizer.eot_id):
                if t is not None:
                    ids.add(t)
        return ids

    def _attn_capture(self, attn: tuple | None, n_keys: int, q: int):
        """Capture dict recording query row q's attention on the chosen layers/heads."""
        if attn is None:
            return None, None
        layers, heads = attn
        core = {L: {"heads": np.asarray(heads, np.int32), "q0": q, "q1": q + 1,
                    "pattern": np.empty((len(heads), 1, n_keys), np.float32)} for L in layers}
        return core, {L: d["pattern"][:, 0, :] for L, d in core.items()}

    def _generate_ids(self, prompt_ids: list[int], gc: GenerationConfig,
                      attn: tuple | None = None, attn_out: list | None = None,
                      mm: list | None = None) -> Iterator[int]:
        """Yields new token ids; the cache holds prompt + every yielded id but the last.
        With attn = (layers, heads), attn_out receives for each new token the attention
        pattern {layer: (heads, n_ctx)} of the query that predicted it."""
        gc.validate(self.config.vocab_size)
        stop_ids = self._stop_ids(gc)
        sampler = _Sampler(gc, prompt_ids)
        if len(prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"context overflow: the prompt has {len(prompt_ids)} tokens and "
                             f"max_seq_len is {self.max_seq_len}")
        with self._exclusive():
            logits = self._prefill(prompt_ids, attn, mm)
            epoch = self._epoch
            last_attn = self._last_attn
        for step in range(gc.max_new_tokens):
            tok = sampler.draw(logits)
            if tok in stop_ids:
                return
            if attn_out is not None:
                attn_out.append(last_attn)
            yield tok
            sampler.accept(tok)
            if step + 1 == gc.max_new_tokens or len(self._ids) + 1 >= self.max_seq_len:
                return
            with self._exclusive():
                if self._epoch != epoch:
                    raise RuntimeError("the model was used by another call while this generation "
                                       "was paused; the generation cannot continue")
                self._sync()
                cap, last_attn = self._attn_capture(attn, len(self._ids) + 1, 0)
                logits = self._feed([tok], 1, cap)[0]

    def stream(self, prompt: str | Sequence[int], *, images: Sequence[Any] | None = None,
               pan_and_scan: bool = False, **kwargs) -> Iterator[str]:
        """Yields text pieces as they are generated (never a broken UTF-8 sequence).

        Arguments as :meth:`generate`, checked when called (not at the first piece). Stop
        strings end the stream; their text is not yielded.
        """
        gc = GenerationConfig(**kwargs)
        gc.validate(self.config.vocab_size)
        ids, mm = self._prompt(prompt, images, pan_and_scan)
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer (pass return_ids=True to "
                             "generate() for token ids)")
        return self._stream(ids, mm, gc)

    def _prompt(self, prompt: str | Sequence[int], images: Sequence[Any] | None,
                pan_and_scan: bool) -> tuple[list[int], list]:
        """-> (ids, image spans). Text: each ``<start_of_image>`` is expanded as the reference
        processor does and the whole string tokenized with special tokens parsed; ids: the
        images fill the runs of ``<image_soft_token>`` ids in order."""
        if images is None:
            return self.encode(prompt), []
        if isinstance(images, (str, bytes, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if self.vision is None:
            raise ValueError("this model has no vision tower: images need a multimodal "
                             "checkpoint (an HF Gemma3ForConditionalGeneration directory, or "
                             "load(text_gguf, mmproj=...))")
        vc = self.vision.config
        pics = [_vision.pixel_values(im, pan_and_scan, vc.image_size) for im in images]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass token ids")
            return _vision.expand_text(prompt, pics, self.tokenizer, vc)
        ids = _as_ids(prompt)
        return ids, _vision.spans_from_ids(ids, pics, vc)

    def _text(self, ids: Sequence[int]) -> str:
        """Generated ids as text, as stream() yields it (image markers left out)."""
        if self.tokenizer is None:
            return ""
        markup = self.tokenizer.markup_ids
        return self.tokenizer.decode([t for t in ids if t not in markup])

    def _stream(self, ids: list[int], mm: list, gc: GenerationConfig) -> Iterator[str]:
        dec = self.tokenizer.stream_decoder()
        held = ""  # text that could be the start of a stop string
        longest = max((len(s) for s in gc.stop), default=0)
        markup = self.tokenizer.markup_ids
        for tok in self._generate_ids(ids, gc, mm=mm):
            if tok in markup:
                continue  # image markers are markup, not text (see Tokenizer.markup_ids)
            held += dec.push(tok)
            if gc.stop:
                cut = min((held.find(s) for s in gc.stop if s in held), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield held[:cut]
                    return
                safe = len(held) - (longest - 1)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
            elif held:
                yield held
                held = ""
        held += dec.flush()
        if gc.stop:
            cut = min((held.find(s) for s in gc.stop if s in held), default=-1)
            if cut >= 0:
                held = held[:cut]
        if held:
            yield held

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_k: int = 64, top_p: float = 0.95,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), logit_bias: dict[int, float] | None = None,
                 stop_token_ids: Sequence[int] | None = None, return_ids: bool = False,
                 return_attention: bool = False, attention_layers: Sequence[int] | None = None,
                 attention_heads: Sequence[int] | None = None,
                 images: Sequence[Any] | None = None, pan_and_scan: bool = False):
        """Generates a continuation of ``prompt`` (text, tokenized with BOS, or token ids).

        ``images`` (models with a vision tower): one per ``<start_of_image>`` in a text prompt
        (expanded as the reference processor does, ``pan_and_scan`` adding crops), or filling
        the runs of image-token ids of an id prompt; pictures (paths, bytes, PIL, uint8 arrays)
        or pixel_values ``(n, 3, S, S)`` float32.

        Defaults follow Gemma 3's published generation config (temperature 1, top-k 64,
        top-p 0.95); ``temperature=0`` is greedy. Stops on ``<eos>``/``<end_of_turn>``, on any
        of ``stop`` (the stop text is not included) or after ``max_new_tokens``.
        Returns the text, or the new token ids with ``return_ids=True``.

        With ``return_attention=True`` returns a :class:`Generation` (text, ids, attention) where
        ``attention[i][layer]`` is the ``(heads, n_ctx)`` attention of the query that predicted
        new token ``i`` over the whole context before it (``attention_layers``/``_heads`` select;
        default all).
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                  stop=stop, logit_bias=logit_bias, stop_token_ids=stop_token_ids)
        if return_attention:
            cfg = self.config
            layers = list(range(cfg.num_layers)) if attention_layers is None else [
                _check.integer("attention_layers item", x) for x in attention_layers]
            heads = list(range(cfg.num_heads)) if attention_heads is None else [
                _check.integer("attention_heads item", x) for x in attention_heads]
            _inspect.CapturePlan.make(cfg, 1, [], layers, heads, None)  # validates
            gc = GenerationConfig(**kw)
            attn: list = []
            p_ids, mm = self._prompt(prompt, images, pan_and_scan)
            ids = list(self._generate_ids(p_ids, gc, (layers, heads), attn, mm=mm))
            text = self._text(ids)
            return Generation(text, ids, attn)
        if return_ids:
            gc = GenerationConfig(**kw)
            p_ids, mm = self._prompt(prompt, images, pan_and_scan)
            return list(self._generate_ids(p_ids, gc, mm=mm))
        return "".join(self.stream(prompt, images=images, pan_and_scan=pan_and_scan, **kw))

    # -- batches -----------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[str | Sequence[int]],
                       settings: Sequence[dict[str, Any]] | None = None, *,
                       return_ids: bool = False, **kwargs) -> list:
        """Generates continuations of several prompts, decoding them together: one forward
        call per step reads the weights once for every active sequence.

        ``kwargs`` are :meth:`generate`'s sampling arguments, shared by all prompts;
        ``settings`` optionally gives one dict per prompt overriding them (its own seed,
        temperature, stop strings, max_new_tokens...). Each sequence stops on its own. Greedy
        results equal one-by-one :meth:`generate` exactly. Returns texts (or id lists).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
            raise TypeError(f"prompts must be a list of prompts (str or token ids), got "
                            f"{type(prompts).__name__}")
        prompts = list(prompts)
        if settings is not None and (not isinstance(settings, Sequence) or not all(
                isinstance(d, Mapping) for d in settings)):
            raise TypeError("settings must be a list of dicts, one per prompt")
        if settings is not None and len(settings) != len(prompts):
            raise ValueError(f"settings has {len(settings)} entries for {len(prompts)} prompts")
        if not prompts:
            return []
        gcs = []
        for i in range(len(prompts)):
            kw = dict(kwargs)
            kw.update(settings[i] if settings is not None else {})
            if isinstance(kw.get("stop"), str):
                kw["stop"] = (kw["stop"],)
            kw.setdefault("stop", ())
            gc = GenerationConfig(**{k: v for k, v in kw.items()})
            gc.validate(self.config.vocab_size)
            gcs.append(gc)
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + 1 > self.max_seq_len:
                raise ValueError(f"context overflow: prompt {i} has {len(p)} tokens and "
                                 f"max_seq_len is {self.max_seq_len}")
        with self._exclusive():
            return self._generate_batch(ids, gcs, return_ids)

    def _generate_batch(self, ids: list[list[int]], gcs: list[GenerationConfig],
                        return_ids: bool) -> list:
        B = len(ids)
        core = self._core
        if core.n_seq < B + 1:
            core.set_n_seq(B + 1)  # sequence 0 stays the interactive context
        seqs = list(range(1, B + 1))
        samplers = [_Sampler(g, p) for g, p in zip(gcs, ids, strict=True)]
        stops = [self._stop_ids(g) for g in gcs]
        out: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        decs = [self.tokenizer.stream_decoder() if self.tokenizer is not None else None
                for _ in range(B)]
        done = [g.max_new_tokens == 0 for g in gcs]
        logits = {}
        try:
            for i, s in enumerate(seqs):  # prefill one prompt at a time, as generate() does
                core.reset(s)
                if done[i]:
                    continue
                for c in range(0, len(ids[i]), PREFILL_CHUNK):
                    piece = np.asarray(ids[i][c:c + PREFILL_CHUNK], np.int32)
                    last = c + PREFILL_CHUNK >= len(ids[i])
                    lg = core.forward(piece, 1 if last else 0, seqs=np.array([s], np.int32),
                                      lens=np.array([len(piece)], np.int64))
                logits[i] = lg[0]
            while True:
                feed = []
                for i in range(B):
                    if done[i]:
                        continue
                    g = gcs[i]
                    tok = samplers[i].draw(logits[i])
                    if tok in stops[i]:
                        done[i] = True
                        continue
                    out[i].append(tok)
                    samplers[i].accept(tok)
                    if decs[i] is not None and g.stop and tok not in self.tokenizer.markup_ids:
                        texts[i] += decs[i].push(tok)
                        if any(st in texts[i] for st in g.stop):
                            done[i] = True
                            continue
                    n_ctx = len(ids[i]) + len(out[i])
                    if len(out[i]) >= g.max_new_tokens or n_ctx + 1 > self.max_seq_len:
                        done[i] = True
                        continue
                    feed.append((i, tok))
                if not feed:
                    break
                lg = core.forward(np.array([t for _, t in feed], np.int32), 1,
                                  seqs=np.array([seqs[i] for i, _ in feed], np.int32),
                                  lens=np.ones(len(feed), np.int64))
                for row, (i, _) in enumerate(feed):
                    logits[i] = lg[row]
        finally:
            for s in seqs:
                core.reset(s)
        if return_ids:
            return out
        results = []
        for i in range(B):
            text = self._text(out[i])
            cut = min((text.find(st) for st in gcs[i].stop if st in text), default=-1)
            results.append(text[:cut] if cut >= 0 else text)
        return results

    # -- scoring (gemma3.eval) ------------------------------------------------------------------
    def loglikelihood(self, context: str | Sequence[int], continuation: str | Sequence[int]
                      ) -> tuple[float, bool]:
        """(sum log-probability of ``continuation`` given ``context``, whether greedy decoding
        would produce it). Text is tokenized as lm-eval-harness does (see gemma3.eval); runs on
        extra KV sequences, leaving the interactive context alone."""
        from . import eval as _eval

        return _eval.loglikelihood(self, context, continuation)

    def loglikelihood_batch(self, requests: Sequence[tuple[Any, Any]], **kwargs
                            ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of many (context, continuation) pairs, several per forward call;
        pairs with the same context (multiple-choice answers) share its KV cache."""
        from . import eval as _eval

        return _eval.loglikelihood_batch(self, requests, **kwargs)

    def loglikelihood_rolling(self, text: str | Sequence[int], max_length: int | None = None
                              ) -> float:
        """Log-likelihood of a whole text in disjoint windows (lm-eval-harness semantics)."""
        from . import eval as _eval

        return _eval.loglikelihood_rolling(self, text, max_length)

    def perplexity(self, text: str | Sequence[int], n_ctx: int, stride: int | None = None,
                   protocol: str = "llama.cpp"):
        """Token perplexity and bits per byte under ``protocol`` "llama.cpp" (llama-perplexity)
        or "hf" (the Hugging Face strided-window recipe); returns gemma3.eval.Perplexity."""
        from . import eval as _eval

        return _eval.perplexity(self, text, n_ctx, stride, protocol)

    # -- looking inside ----------------------------------------------------------------------
    @property
    def kv_cache(self) -> _inspect.KVCache:
        """The cached context's K/V per layer, in position order (see gemma3.inspect)."""
        with self._exclusive():
            self._sync()
            return _inspect.KVCache(self)

    def run_with_cache(self, text_or_ids: str | Sequence[int], names: Sequence[str] | None = None,
                       layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                       query_range: tuple[int, int] | None = None, logits: str = "all",
                       images: Sequence[Any] | None = None, pan_and_scan: bool = False
                       ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Runs a prompt from an empty context recording activations (TransformerLens names,
        listed in gemma3.inspect). Selects by ``names``, ``layers``, attention ``heads`` and a
        ``query_range`` (rows of the attention maps). ``logits``: "all" (n_tokens, vocab),
        "last" (vocab,) or "none". ``images`` as in :meth:`generate`. Returns (logits, cache
        dict)."""
        mm: list = []
        if images is not None:
            text_or_ids, mm = self._prompt(text_or_ids if isinstance(text_or_ids, str) else
                                           _as_ids(text_or_ids), images, pan_and_scan)
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else _as_ids(text_or_ids)
        if not ids:
            raise ValueError("run_with_cache needs at least one token")
        self._check_ids(_vision.text_positions(ids, mm, self._mm_tokens()))
        if len(ids) > self.max_seq_len:
            raise ValueError(f"context overflow: {len(ids)} tokens, max_seq_len "
                             f"{self.max_seq_len}")
        mode = {"all": 2, "last": 1, "none": 0}.get(logits)
        if mode is None:
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        plan = _inspect.CapturePlan.make(self.config, len(ids), names, layers, heads, query_range)
        core, out = plan.buffers(self.config, len(ids), len(ids))
        with self._exclusive():
            self._sync()
            self._reset()
            lg = self._feed(ids, mode, core, mm=mm)
        if mode == 1:
            lg = lg[0]
        return lg, out

    def logit_lens(self, text_or_ids: str | Sequence[int], k: int = 5,
                   layers: Sequence[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Each layer's residual stream (after the block) through the final norm and the LM
        head: ``{layer: (top_ids (n_tokens, k) int64, top_logprobs (n_tokens, k) float32)}``."""
        layers = list(range(self.config.num_layers)) if layers is None else list(layers)
        names = [f"blocks.{L}.hook_resid_post" for L in layers]
        _, cache = self.run_with_cache(text_or_ids, names=names, logits="none")
        out = {}
        for L in layers:
            resid = cache[f"blocks.{L}.hook_resid_post"]
            ids, lps = [], []
            for s in range(0, len(resid), LOGITS_CHUNK):
                with self._exclusive():
                    lg = self._core.head(resid[s:s + LOGITS_CHUNK], True)
                i, lp = _top_k_logprobs(lg, k)
                ids.append(i)
                lps.append(lp)
            out[L] = (np.concatenate(ids), np.concatenate(lps))
        return out

    def top_logprobs(self, text_or_ids: str | Sequence[int], k: int = 5
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k next-token log-probabilities at every position, computed chunk by chunk
        (never a full (n_tokens, vocab) matrix): (ids (n, k) int64, logprobs (n, k) float32)."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else _as_ids(text_or_ids)
        if not ids:
            raise ValueError("top_logprobs needs at least one token")
        self._check_ids(ids)
        out_i, out_l = [], []
        with self._exclusive():
            self._sync()
            self._reset()
            for s in range(0, len(ids), LOGITS_CHUNK):
                lg = self._feed(ids[s:s + LOGITS_CHUNK], 2)
                i, lp = _top_k_logprobs(lg, k)
                out_i.append(i)
                out_l.append(lp)
        return np.concatenate(out_i), np.concatenate(out_l)

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False,
             pan_and_scan: bool = False, **kwargs):
        """Replies to a conversation (``[{"role": "user"|"assistant"|"system", "content": ...}]``).

        Uses the Gemma chat format; the KV cache of the previous turn is reused when the
        conversation extends it (images included, compared by their pixels). Content may be a
        list of items ``{"type": "text", "text": ...}`` / ``{"type": "image", "image": ...}``.
        Returns the reply text, or an iterator of pieces with ``stream=True``. Keyword
        arguments as :meth:`generate`.
        """
        gc = GenerationConfig(**kwargs)
        gc.validate(self.config.vocab_size)
        ids, mm = self._chat_prompt(messages, pan_and_scan)
        it = self._stream(ids, mm, gc)
        return it if stream else "".join(it)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
                 ) -> list[int]:
        """Token ids of the rendered conversation (with BOS; images expanded to their
        soft-token runs)."""
        return self._chat_prompt(messages, False, add_generation_prompt)[0]

    def _chat_prompt(self, messages: list[dict[str, Any]], pan_and_scan: bool,
                     add_generation_prompt: bool = True) -> tuple[list[int], list]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        segs, images = _chat.render(messages, add_generation_prompt)
        if images:
            if self.vision is None:
                raise NotImplementedError("this model has no vision tower; images need a vision "
                                          "checkpoint")
            vc = self.vision.config
            pics = [_vision.pixel_values(im, pan_and_scan, vc.image_size) for im in images]
            return _vision.expand_segments(segs, pics, self.tokenizer, vc)
        ids = [self.tokenizer.bos_id]
        for text, markup in segs:
            ids += self.tokenizer.encode(text, add_bos=False, parse_special=markup)
        return ids, []

    def close(self) -> None:
        """Releases the weights, the KV cache and the vision tower (and the file mappings once
        no view of the cache or the file is alive). The model cannot be used afterwards."""
        with self._exclusive():
            self._core = _Closed()
            if self.vision is not None:  # an mmproj tower maps its own file
                self.vision = _Closed()
            self._owners = None
            self._ids = []
            self._last_attn = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"<gemma3.Model {c.name or os.path.basename(self.path)!r}: {c.num_layers} layers, "
                f"width {c.hidden_size}, vocab {c.vocab_size}, max_seq_len {self.max_seq_len}>")


class _Sampler:
    """One sequence's sampling state: the seeded RNG, the logit-bias arrays (built once) and the
    token history the repetition penalty reads (a growing int32 buffer, no per-token copy)."""

    def __init__(self, gc: GenerationConfig, prompt_ids: Sequence[int]):
        self.gc = gc
        self.rng = _core.rng_seed(gc.seed if gc.seed is not None else random.getrandbits(64))
        self.bias_ids = np.array(list(gc.logit_bias), np.int32) if gc.logit_bias else None
        self.bias_vals = (np.array(list(gc.logit_bias.values()), np.float32) if gc.logit_bias
                          else None)
        self._hist = None
        if gc.repetition_penalty != 1.0:
            self._hist = np.empty(len(prompt_ids) + gc.max_new_tokens, np.int32)
            self._hist[:len(prompt_ids)] = prompt_ids
        self._n = len(prompt_ids)

    def draw(self, logits: np.ndarray) -> int:
        g = self.gc
        return _core.sample(logits, self.rng, temperature=g.temperature, top_k=g.top_k,
                            top_p=g.top_p, min_p=g.min_p, repetition_penalty=g.repetition_penalty,
                            history=None if self._hist is None else self._hist[:self._n],
                            bias_ids=self.bias_ids, bias_values=self.bias_vals)

    def accept(self, tok: int) -> None:
        if self._hist is not None:
            self._hist[self._n] = tok
        self._n += 1


class _Closed:
    """Stands in for the C model after close(): every use raises a clear error."""

    n_past = 0
    n_seq = 0

    def __getattr__(self, name):
        raise RuntimeError("this model was closed")


@dataclass
class Generation:
    """Result of ``generate(..., return_attention=True)``."""

    text: str
    ids: list[int]
    attention: list[dict[int, np.ndarray]]  # per new token: {layer: (heads, n_ctx)}


def _top_k_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, logits.shape[-1])
    lp = _inspect.log_softmax(logits.astype(np.float64))
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return (np.take_along_axis(idx, order, -1).astype(np.int64),
            np.take_along_axis(vals, order, -1).astype(np.float32))


def load(path: str | os.PathLike | None = None, *, n_threads: int | None = None,
         max_seq_len: int | None = None, dtype: str | None = None,
         mmproj: str | os.PathLike | None = None, pack: bool | None = None) -> Model:
    """Loads a Gemma 3 checkpoint: a GGUF file, or a Hugging Face checkpoint directory.

    Vision: a multimodal HF directory (Gemma3ForConditionalGeneration) brings its SigLIP tower;
    a text GGUF takes llama.cpp's vision file with ``mmproj="mmproj.gguf"``. The tower is
    ``model.vision`` (None for text-only models).

    With no path, the embedded default model (Gemma 3 270M, Q4_K_M) is used.
    ``n_threads``: threads for compute (default: all cores). ``max_seq_len``: positions the
    KV cache holds (default: the model's context length, at most 32768). ``dtype``: convert
    weights on load ("q8_0", "q4_0", "q4_k", "q6_k", "f16", "bf16", "f32"); by default GGUF
    weights are used as stored and HF weights as float32.

    ``pack``: on CPUs with AVX-512 VNNI, repack the Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K matrices
    into 16-row groups for the integer decode kernels (activations quantized to 24 bits per
    32 values, so logits match the float kernels to ~1e-7 relative; about 2x faster decoding).
    It costs a second copy of those weights in memory (``model.packed_bytes``); ``pack=False``
    keeps the float dequantize-and-dot kernels, and the default (None) packs when the copy takes
    at most half of the memory available.
    """
    from ._default import default_model_path

    if path is None:
        path = default_model_path()
    path = _check.path("path", path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such checkpoint file or directory", path)
    if n_threads is not None:
        if not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
        _core.set_num_threads(n_threads)
    if dtype is not None and not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str such as 'q8_0' or None, got {type(dtype).__name__}")
    vision = None
    if is_hf_dir(path):
        if mmproj is not None:
            raise ValueError("mmproj goes with a text GGUF; an HF directory carries its own "
                             "vision tower")
        cfg, weights, hf, owners = load_hf_dir(path, dtype)
        tok_path = os.path.join(path, "tokenizer.json")
        tokenizer = Tokenizer.from_hf_json(tok_path) if os.path.exists(tok_path) else None
        where = {name: s for s in owners for name in s.tensors}
        vision = _vision.load_hf_vision(path, hf, where, cfg.hidden_size, dtype)
    else:
        cfg, weights, md, owners = load_gguf(path, dtype)
        tokenizer = (Tokenizer.from_gguf_metadata(md) if "tokenizer.ggml.tokens" in md
                     else None)
        if mmproj is not None:
            mmproj = _check.path("mmproj", mmproj)
            if not os.path.exists(mmproj):
                raise FileNotFoundError(2, "no such mmproj file", mmproj)
            vision = _vision.load_mmproj(mmproj, cfg.hidden_size, dtype, tokenizer)
    if max_seq_len is None:
        max_seq_len = min(cfg.context_length, 32768)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    check_cache_fits(cfg, max_seq_len)
    if pack is None:
        pack = _pack_fits(weights)
    elif not isinstance(pack, bool):
        raise TypeError(f"pack must be True, False or None, got {pack!r}")
    core = build_core(cfg, weights, max_seq_len, pack=pack)
    model = Model(core, cfg, tokenizer, path, owners, max_seq_len)
    model.vision = vision
    return model


def _pack_fits(weights: dict[str, Any]) -> bool:
    """Whether repacking the matrices for the integer decode kernels takes at most half of the
    memory available now (an upper bound: every matrix of a packable type counts)."""
    need = sum(e[3].nbytes for e in weights.values()
               if isinstance(e, tuple) and _core.packed_supported(e[0]))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need <= avail // 2


def kv_cache_bytes(cfg: Gemma3Config, max_seq_len: int) -> int:
    """Bytes one sequence's KV cache reserves: float32 K and V; global layers hold every
    position, local layers a ring of min(window, max_seq_len) slots."""
    per_pos = 2 * 4 * cfg.num_kv_heads * cfg.head_dim
    n_global = len(cfg.global_layers)
    local = min(cfg.sliding_window, max_seq_len) if cfg.sliding_window else max_seq_len
    return per_pos * (n_global * max_seq_len + (cfg.num_layers - n_global) * local)


def check_cache_fits(cfg: Gemma3Config, max_seq_len: int, n_seq: int = 1) -> None:
    """MemoryError before allocating when the KV cache could never fit in this machine's RAM."""
    need = n_seq * kv_cache_bytes(cfg, max_seq_len)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram:
        raise MemoryError(f"a KV cache for max_seq_len={max_seq_len} needs {need / 2**30:.1f} GiB "
                          f"but this machine has {ram / 2**30:.1f} GiB of RAM; lower max_seq_len")


def set_num_threads(n: int) -> None:
    """Threads used by every model in this process (OpenMP and BLAS). 0 = all cores."""
    _core.set_num_threads(_check.integer("n_threads", n, 0))
