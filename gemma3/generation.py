"""Generation: sampling settings, the sampler, stop strings, and the decode loops.

The generate loop is Python (one C forward per token, GIL released inside), so Ctrl-C stops it
between tokens and leaves the model usable. Settings are validated once per public call (by the
caller, :func:`settings`); the loops here take validated :class:`GenerationConfig` objects.
One :class:`StopMatcher` decides stop strings for :func:`stream_text` and :func:`generate_batch`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import _check, _core
from .engine import PREFILL_CHUNK, Engine


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


def settings(vocab: int, **kwargs) -> GenerationConfig:
    """A validated GenerationConfig: the one validation of a public call."""
    gc = GenerationConfig(**kwargs)
    gc.validate(vocab)
    return gc


@dataclass
class Generation:
    """Result of ``generate(..., return_attention=True)``."""

    text: str
    ids: list[int]
    attention: list[dict[int, np.ndarray]]  # per new token: {layer: (heads, n_ctx)}


class Sampler:
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

    def _args(self) -> dict:
        g = self.gc
        return dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                    repetition_penalty=g.repetition_penalty,
                    history=None if self._hist is None else self._hist[:self._n],
                    bias_ids=self.bias_ids, bias_values=self.bias_vals)

    @property
    def raw_argmax(self) -> bool:
        """True if a greedy :meth:`draw` is the arg-max of the raw logits (no bias, no penalty)."""
        return self.bias_ids is None and self._hist is None

    def draw(self, logits: np.ndarray) -> int:
        return _core.sample(logits, self.rng, **self._args())

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution :meth:`draw` samples from now: (vocab,) float32, 0 where filtered
        (speculative sampling, gemma3.speculative)."""
        return _core.sample_probs(logits, None, **self._args())[0]

    def accept(self, tok: int) -> None:
        if self._hist is not None:
            self._hist[self._n] = tok
        self._n += 1


class StopMatcher:
    """Stop strings over text that arrives in pieces. :meth:`push` returns the text that is safe
    to hand out (it cannot be the start of a stop string) and whether a stop string completed;
    the stop string and anything after it are never handed out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def cut(self, text: str) -> tuple[str, bool]:
        """(text before the first stop string, whether there was one)."""
        at = min((text.find(s) for s in self.stops if s in text), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    def push(self, piece: str) -> tuple[str, bool]:
        held = self._held + piece
        if not self.stops:
            self._held = ""
            return held, False
        out, self.stopped = self.cut(held)
        if self.stopped:
            self._held = ""
            return out, True
        safe = len(held) - self._keep
        if safe <= 0:
            self._held = held
            return "", False
        self._held = held[safe:]
        return held[:safe], False

    def flush(self, tail: str = "") -> str:
        """What is left (plus ``tail``, the decoder's last bytes), up to a stop string."""
        if self.stopped:
            return ""
        out, self.stopped = self.cut(self._held + tail)
        self._held = ""
        return out


def stop_ids(gc: GenerationConfig, eos: int, tokenizer) -> set[int]:
    if gc.stop_token_ids is not None:
        return set(int(t) for t in gc.stop_token_ids)
    ids = {eos}
    if tokenizer is not None:
        for t in (tokenizer.eos_id, tokenizer.eot_id):
            if t is not None:
                ids.add(t)
    return ids


def attn_capture(attn: tuple | None, n_keys: int):
    """(capture dict recording the last query row's attention on the chosen (layers, heads),
    {layer: (heads, n_keys) view})."""
    if attn is None:
        return None, None
    layers, heads = attn
    core = {L: {"heads": np.asarray(heads, np.int32), "q0": 0, "q1": 1,
                "pattern": np.empty((len(heads), 1, n_keys), np.float32)} for L in layers}
    return core, {L: d["pattern"][:, 0, :] for L, d in core.items()}


def check_room(n_prompt: int, max_seq_len: int, which: str = "the prompt") -> None:
    """Generation's own rule (the cache's is C's, see gemma3.engine): a prompt leaves room for at
    least one new token."""
    if n_prompt + 1 > max_seq_len:
        raise ValueError(f"context overflow: {which} has {n_prompt} tokens and max_seq_len is "
                         f"{max_seq_len}")


def generate_ids(engine: Engine, prompt_ids: list[int], gc: GenerationConfig, stops: set[int],
                 attn: tuple | None = None, attn_out: list | None = None,
                 mm: list | None = None, hooks=None) -> Iterator[int]:
    """Yields new token ids; sequence 0 holds prompt + every yielded id but the last.
    With attn = (layers, heads), attn_out receives for each new token the attention
    pattern {layer: (heads, n_ctx)} of the query that predicted it. ``hooks``: a
    gemma3.hooks.Plan every forward call (prompt chunks and steps) passes through."""
    sampler = Sampler(gc, prompt_ids)
    check_room(len(prompt_ids), engine.max_seq_len)
    last_attn = None

    def capture_last(n_keys):
        nonlocal last_attn
        cap, last_attn = attn_capture(attn, n_keys)
        return cap

    with engine.exclusive():
        logits = engine.prefill(prompt_ids, mm, capture_last if attn is not None else None,
                                hooks)
        epoch = engine.epoch
    for step in range(gc.max_new_tokens):
        tok = sampler.draw(logits)
        if tok in stops:
            return
        if attn_out is not None:
            attn_out.append(last_attn)
        yield tok
        sampler.accept(tok)
        if step + 1 == gc.max_new_tokens or len(engine.ids) + 1 >= engine.max_seq_len:
            return
        with engine.exclusive():
            if engine.epoch != epoch:
                raise RuntimeError("the model was used by another call while this generation "
                                   "was paused; the generation cannot continue")
            engine.sync()
            cap, last_attn = attn_capture(attn, len(engine.ids) + 1)
            logits = engine.step(tok, cap, hooks)


def stream_text(tokens: Iterator[int], tokenizer, stop: Sequence[str]) -> Iterator[str]:
    """Text pieces of generated ids (never a broken UTF-8 sequence; image markers left out),
    up to the first stop string."""
    dec = tokenizer.stream_decoder()
    markup = tokenizer.markup_ids
    match = StopMatcher(stop)
    for tok in tokens:
        if tok in markup:
            continue  # image markers are markup, not text (see Tokenizer.markup_ids)
        piece, stopped = match.push(dec.push(tok))
        if piece:
            yield piece
        if stopped:
            return
    tail = match.flush(dec.flush())
    if tail:
        yield tail


def generate_batch(engine: Engine, ids: list[list[int]], gcs: list[GenerationConfig],
                   stops: list[set[int]], tokenizer, return_ids: bool) -> list:
    """Decodes several prompts together on scratch sequences (one forward call per step reads
    the weights once for every active sequence). The caller holds engine.exclusive()."""
    B = len(ids)
    samplers = [Sampler(g, p) for g, p in zip(gcs, ids, strict=True)]
    out: list[list[int]] = [[] for _ in range(B)]
    markup = tokenizer.markup_ids if tokenizer is not None else frozenset()
    decs = [tokenizer.stream_decoder() if tokenizer is not None else None for _ in range(B)]
    texts = [[] for _ in range(B)]
    matchers = [StopMatcher(g.stop) for g in gcs]
    done = [g.max_new_tokens == 0 for g in gcs]
    logits: dict[int, np.ndarray] = {}
    with engine.slots(B) as seqs:
        first: dict[tuple[int, ...], int] = {}  # a prompt -> the row that computed it first
        for i, s in enumerate(seqs):  # prefill one prompt at a time, as generate() does
            if done[i]:
                continue
            j = first.setdefault(tuple(ids[i]), i)
            if j != i:  # the same prompt again (num_return_sequences): copy, don't recompute
                engine.core.copy_seq(seqs[j], s)
                logits[i] = logits[j]
                continue
            for _, lg in engine.run_packed([(s, ids[i])], PREFILL_CHUNK, 1):
                if lg is not None:
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
                if decs[i] is not None and tok not in markup and (g.stop or not return_ids):
                    piece, stopped = matchers[i].push(decs[i].push(tok))
                    texts[i].append(piece)
                    if stopped:
                        done[i] = True
                        continue
                if len(out[i]) >= g.max_new_tokens or len(ids[i]) + len(out[i]) + 1 > \
                        engine.max_seq_len:
                    done[i] = True
                    continue
                feed.append(i)
            if not feed:
                break
            for pieces, lg in engine.run_packed([(seqs[i], out[i][-1:]) for i in feed],
                                                len(feed), 1):
                for row, (k, _, _) in enumerate(pieces):
                    logits[feed[k]] = lg[row]
    if return_ids:
        return out
    return ["".join(t) + (m.flush(d.flush()) if d is not None else "")
            for t, m, d in zip(texts, matchers, decs, strict=True)]


def visible_text(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids as text, as stream() yields it (image markers left out)."""
    if tokenizer is None:
        return ""
    markup = tokenizer.markup_ids
    return tokenizer.decode([t for t in ids if t not in markup])


def run_batch(model, to_ids, prompts, per_prompt, return_ids: bool, kwargs: dict) -> list:
    """Model.generate_batch: arguments checked (every prompt before any is fed), then decoded
    together under the engine's lock. ``to_ids(prompt, what)``: a prompt as token ids."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError(f"prompts must be a list of prompts (str or token ids), got "
                        f"{type(prompts).__name__}")
    prompts = list(prompts)
    if per_prompt is not None and (not isinstance(per_prompt, Sequence) or not all(
            isinstance(d, Mapping) for d in per_prompt)):
        raise TypeError("settings must be a list of dicts, one per prompt")
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise ValueError(f"settings has {len(per_prompt)} entries for {len(prompts)} prompts")
    if not prompts:
        return []
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    gcs = [settings(vocab, **{**kwargs, **(per_prompt[i] if per_prompt is not None else {})})
           for i in range(len(prompts))]
    ids = [to_ids(p, "prompt") for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        check_room(len(p), model.max_seq_len, f"prompt {i}")
        model.engine.check(p, at=0)  # every prompt, before any is fed
    stops = [stop_ids(g, eos, model.tokenizer) for g in gcs]
    with model.engine.exclusive():
        return generate_batch(model.engine, ids, gcs, stops, model.tokenizer, return_ids)



def return_sequences(model, to_ids, prompt, n, return_ids: bool, kwargs: dict,
                     unsupported: dict) -> list:
    """Model.generate(num_return_sequences=n): n continuations of one prompt, decoded together
    (generate_batch: the prompt is computed once and its KV copied to the other sequences).
    With a seed, sequence i samples with seed + i (so sequence 0 is what generate(seed=seed)
    gives); without, each draws its own."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"num_return_sequences must be an int, got {type(n).__name__}")
    if not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise ValueError(f"num_return_sequences must be 1 to {MAX_RETURN_SEQUENCES}, got {n}")
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise ValueError(f"num_return_sequences > 1 cannot be combined with {', '.join(used)}")
    seed = kwargs.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    per = [{"seed": None if seed is None else seed + i} for i in range(n)]
    return run_batch(model, to_ids, [prompt] * n, per, return_ids, kwargs)


# sequences of one generate() call; each is a KV sequence (lazily-touched memory)
MAX_RETURN_SEQUENCES = 256
