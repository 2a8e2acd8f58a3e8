"""Speculative decoding: a cheap drafter proposes k tokens, one forward pass of the model checks
them all (k + 1 rows of logits for about the price of one decode step: the weights are read
once), and the KV cache is cut back past the rejected ones (free: csrc/model/state.h's margin).

Drafters:

* :class:`PromptLookup` (``draft="prompt_lookup"``): the continuation of the most recent earlier
  occurrence of the context's last n tokens (n from ``max_ngram`` down to ``min_ngram``), for
  input-grounded text (editing, summarising, code with repeated identifiers);
* :class:`DraftModel` (``draft=<another loaded Model>``): a smaller model with the same tokenizer
  (Gemma 3 270M for 1B-27B) decoding k tokens on its own KV cache.

Verification:

* greedy (``temperature=0``): each row goes through the same :class:`~gemma3.generation.Sampler`
  as plain decoding (logit bias and repetition penalty included, its history holding exactly the
  accepted tokens). Rows of one forward call below 32 tokens get the same bits as one-token calls
  (csrc/kernels/matmul.h), so the output equals plain greedy token for token;
* sampling: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft token
  x drawn from q is kept with probability min(1, p(x) / q(x)), p being the model's processed
  distribution (temperature, top-k/p, min-p, penalty, bias: ``Sampler.probs``); the first
  rejection draws from normalize(max(p - q, 0)); if all k are kept one more token is drawn from
  the last row's p. Every emitted token is then distributed exactly as in plain sampling. Prompt
  lookup drafts are deterministic (q is one-hot). **Seeds**: in speculative sampling every random
  number (the draft model's draws, the acceptance tests and the replacement draws) comes from one
  ``numpy.random.Generator`` seeded with ``seed``: a given (seed, draft, k) reproduces its
  output, but it is not the sample plain decoding draws with that seed (that uses the C
  sampler's stream, one draw per token); the distributions are the same.

Draft length: ``num_draft_tokens`` is the most drafted per pass; after a pass that rejected a
draft the next one asks for one fewer (at least 1), after a pass that kept them all two more (the
schedule of transformers' assisted generation), so a drafter that is often wrong costs little
(a verify pass of k + 1 tokens costs more than one step: ``bench_speculative.py``). Which k is
used depends only on past passes, so the exactness of both checks is unaffected.

Stop tokens, stop strings (the text layer above is unchanged), ``max_new_tokens`` (never more
drafted than may be emitted), Ctrl-C (between forward calls: ``Engine.sync`` reconciles) and the
one-call-at-a-time rule (each step takes the engine's lock; a draft model takes its own) hold as
in plain decoding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import _check, _core
from .generation import GenerationConfig, Sampler, check_room

# k + 1 rows per verify pass stay under the matmul's BLAS threshold (32, bit-identical rows) and
# k positions within the rings' rollback margin (KV_RING_MARGIN + 1)
MAX_DRAFT = min(30, _core.KV_RING_MARGIN + 1)


@dataclass
class Stats:
    """Acceptance statistics, filled in place (``stats=`` of generate/stream/chat); one object
    passed to several calls sums them."""

    drafted: int = 0  # draft tokens proposed and checked
    accepted: int = 0  # of those, kept
    verify_calls: int = 0  # forward passes of the model after the prompt
    emitted: int = 0  # tokens produced (accepted drafts + one per verify call + the first)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        return (self.emitted - 1) / self.verify_calls if self.verify_calls else 0.0


class PromptLookup:
    """n-gram lookup in the context: proposes what followed the most recent earlier occurrence
    of the context's last n tokens, trying n = max_ngram down to min_ngram. The default 4 drafts
    more tokens per verify pass than 2 or 3 on every prompt of benchmarks/bench_speculative.py
    (270M, k=4: rewrite 4.52 vs 4.13 with 3, summarise 3.06 vs 2.88, code 2.50 vs 2.44); longer
    n-grams change nothing there."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        self.max_ngram = _check.integer("max_ngram", max_ngram, 1, 64)
        self.min_ngram = _check.integer("min_ngram", min_ngram, 1, self.max_ngram)

    def start(self, ctx: list[int]) -> _LookupIndex:
        return _LookupIndex(self, ctx)


class _LookupIndex:
    """The n-gram index of one generation's context (which only grows)."""

    def __init__(self, pl: PromptLookup, ctx: list[int]):
        self.ns = range(pl.max_ngram, pl.min_ngram - 1, -1)
        self.last: dict[int, dict[tuple, int]] = {n: {} for n in self.ns}
        self.done = 0  # n-grams ending before this position are indexed

    def propose(self, ctx: list[int], k: int, rng, sampler) -> tuple[list[int], None]:
        # index every n-gram that ends before the current last token's end
        for e in range(max(self.done, 1), len(ctx)):
            for n in self.ns:
                if e >= n:
                    self.last[n][tuple(ctx[e - n:e])] = e
        self.done = max(self.done, len(ctx))
        for n in self.ns:
            if len(ctx) < n:
                continue
            e = self.last[n].get(tuple(ctx[-n:]))
            if e is not None:
                return ctx[e:e + k], None
        return [], None


class DraftModel:
    """Another loaded model with the same tokenizer drafting on its own KV cache (its sequence 0,
    reused across steps by the engine's prefix protocol; rejected drafts are cut back)."""

    def __init__(self, model, target):
        if model is target or model.engine is target.engine:
            raise ValueError("the draft model must be another Model object (load the file "
                             "twice to draft with the same weights)")
        if model.config.vocab_size != target.config.vocab_size or not _same_tokenizer(
                model.tokenizer, target.tokenizer):
            raise ValueError(f"the draft model must share the tokenizer: vocabularies "
                             f"{model.config.vocab_size} and {target.config.vocab_size}")
        self.model = model

    def start(self, ctx: list[int]) -> DraftModel:
        return self

    def propose(self, ctx: list[int], k: int, rng, sampler) -> tuple[list[int], list | None]:
        eng = self.model.engine
        greedy = sampler.gc.temperature <= 0
        out, qs = [], []
        with eng.exclusive():
            lg = eng.prefill(ctx)
            for i in range(k):
                if greedy:
                    out.append(int(np.argmax(lg)))
                else:
                    q = _core.sample_probs(lg, None, **_draft_args(sampler.gc))[0]
                    out.append(_draw(q, rng))
                    qs.append(q)
                if i + 1 < k:
                    lg = eng.step(out[-1])
        return out, (None if greedy else qs)


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None:
        return a is b
    probe = "Speculative decoding: 0123 éà 漢字 <start_of_turn>"
    return (a.encode(probe, add_bos=True) == b.encode(probe, add_bos=True)
            and (a.eos_id, a.eot_id) == (b.eos_id, b.eot_id))


def _draft_args(gc: GenerationConfig) -> dict:
    # the draft's own distribution q: any q keeps the output exact, this one is close to p
    return dict(temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p, min_p=gc.min_p)


def _draw(p: np.ndarray, rng) -> int:
    """One draw from a (not necessarily normalized) non-negative vector."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


@dataclass
class Spec:
    """The speculative settings of one call (validated)."""

    drafter: object  # PromptLookup | DraftModel
    k: int
    stats: Stats | None


def options(model, kwargs: dict) -> Spec | None:
    """Pops ``draft``, ``num_draft_tokens`` and ``stats`` from a call's keyword arguments."""
    draft = kwargs.pop("draft", None)
    k = kwargs.pop("num_draft_tokens", 5)
    stats = kwargs.pop("stats", None)
    if stats is not None and not isinstance(stats, Stats):
        raise TypeError(f"stats must be a gemma3.speculative.Stats, got {type(stats).__name__}")
    if draft is None:
        if stats is not None:
            raise ValueError("stats= needs draft= (speculative decoding)")
        return None
    k = _check.integer("num_draft_tokens", k, 1, MAX_DRAFT)
    if isinstance(draft, str):
        if draft != "prompt_lookup":
            raise ValueError(f"draft must be 'prompt_lookup', a PromptLookup or a loaded Model, "
                             f"got {draft!r}")
        draft = PromptLookup()
    elif not isinstance(draft, PromptLookup):
        if not hasattr(draft, "engine") or not hasattr(draft, "config"):
            raise TypeError(f"draft must be 'prompt_lookup', a PromptLookup or a loaded Model, "
                            f"got {type(draft).__name__}")
        draft = DraftModel(draft, model)
    return Spec(draft, k, stats)


def generate_ids(engine, prompt_ids: list[int], gc: GenerationConfig, stops: set[int],
                 spec: Spec, mm: list | None = None) -> Iterator[int]:
    """gemma3.generation.generate_ids with drafts verified k at a time. Sequence 0 holds the
    prompt and every yielded id but the last, plus at most the accepted drafts of the current
    step not yet yielded (``engine.ids`` always says what it holds)."""
    sampler = Sampler(gc, prompt_ids)
    greedy = gc.temperature <= 0
    # a greedy draw on raw logits is their arg-max: the verify pass asks for that alone
    argmax = greedy and sampler.raw_argmax
    rng = np.random.default_rng(gc.seed if gc.seed is not None else random.getrandbits(64))
    stats = spec.stats if spec.stats is not None else Stats()
    check_room(len(prompt_ids), engine.max_seq_len)
    with engine.exclusive():
        rows = engine.prefill(prompt_ids, mm)[None]
        epoch = engine.epoch
    if gc.max_new_tokens == 0:
        return
    ctx = list(prompt_ids)  # the prompt and every emitted token
    drafter = spec.drafter.start(ctx)
    drafts, qs, emitted = [], None, 0
    want = spec.k  # drafts asked for: +2 after a pass that kept them all, -1 after a rejection
    while True:
        kept = stats.accepted
        for tok in _accept(rows, drafts, qs, sampler, greedy, rng, stats):
            if tok in stops:
                return
            emitted += 1
            stats.emitted += 1
            yield tok
            ctx.append(tok)
            if emitted == gc.max_new_tokens or len(ctx) >= engine.max_seq_len:
                return
        if drafts:
            full = stats.accepted - kept == len(drafts)
            want = min(spec.k, want + 2) if full else max(1, want - 1)
        # the last emitted token is not in the cache yet; draft after it, then verify
        k = min(want, gc.max_new_tokens - emitted - 1, engine.max_seq_len - 1 - len(ctx))
        with engine.exclusive():
            if engine.epoch != epoch:
                raise RuntimeError("the model was used by another call while this generation "
                                   "was paused; the generation cannot continue")
            engine.sync()
            if len(engine.ids) > len(ctx) - 1:  # accepted drafts the consumer did not take
                engine.truncate(len(ctx) - 1)
            drafts, qs = drafter.propose(ctx, k, rng, sampler) if k > 0 else ([], None)
            drafts = drafts[:k]
            rows = engine.feed([ctx[-1]] + drafts, 3 if argmax else 2, check=False)
            stats.verify_calls += 1
            stats.drafted += len(drafts)


def _accept(rows: np.ndarray, drafts: list[int], qs: list | None, sampler: Sampler,
            greedy: bool, rng, stats: Stats) -> Iterator[int]:
    """The tokens one verify pass emits: the accepted drafts, then a correction or a bonus
    token. ``rows[i]`` are the logits after draft i - 1 (row 0: after the fed last token), or
    for a greedy sampler with ``raw_argmax`` their arg-max (an int array)."""
    for i in range(len(rows)):
        if rows.ndim == 1:  # arg-max ids (engine.feed mode 3)
            y = int(rows[i])
        elif greedy:
            y = sampler.draw(rows[i])
        else:
            p = sampler.probs(rows[i])
            if i < len(drafts):
                x = drafts[i]
                qx = 1.0 if qs is None else float(qs[i][x])
                if qx > 0 and rng.random() * qx < p[x]:
                    y = x
                else:  # rejected: draw from the residual max(p - q, 0)
                    r = p.astype(np.float64)
                    if qs is None:
                        r[x] = 0.0
                    else:
                        r = np.maximum(r - qs[i], 0.0)
                    y = _draw(r, rng) if r.sum() > 0 else _draw(p, rng)
            else:
                y = _draw(p, rng)
        sampler.accept(y)
        if i < len(drafts) and y == drafts[i]:
            stats.accepted += 1
            yield y
            continue
        yield y
        return
