"""Scoring: log-likelihood of continuations, rolling log-likelihood, perplexity (gemma3.eval
re-exports all of it next to the ``python -m gemma3 eval`` job runner).

Everything here reduces to one request type, lm-eval-harness's: the log-probability of a
continuation given a context,

    log p(cont | ctx) = sum_i  logits[i, cont_i] - logsumexp(logits[i, :]),

where row i is the model's output at the position just before ``cont_i``. Requests run on the
engine's scratch KV sequences (``Engine.slots``; sequence 0, the interactive context, is never
touched), several per forward call as groups. Requests with the same context share it: the
context is prefilled once into one sequence and forked with ``copy_seq`` into one sequence per
continuation, then every continuation is fed in the same calls. Only the rows that predict a
continuation token get logits (at most ``LOGITS_ROWS`` rows per call), and each row is reduced to
its target's log-probability right away, so a ``(n_tokens, vocab)`` matrix never exists.

Batching changes numbers only by float32 rounding: calls of fewer than 32 tokens run a per-row
kernel whose bits do not depend on the batch or the thread count, larger calls go through BLAS
sgemm, whose rounding depends on the call's shape and thread count (about 1e-7 relative on a
log-probability). The eval job therefore cuts the task file into fixed shards by input position,
so a record is always scored in the same calls: with the same ``--threads`` its result is
bit-identical whether the run was interrupted, which worker ran it, or Ray did.

Tokenization of a text pair follows lm-eval-harness (``TemplateLM._encode_pair``): whitespace at
the end of the context is moved to the front of the continuation (``"Q: 2+2 = "``, ``"4"`` is
scored as ``"Q: 2+2 ="``, ``" 4"``, which is how SentencePiece sees a word after a space), the
context is encoded with BOS, ``context + continuation`` is encoded with BOS, and the continuation
tokens are the whole encoding's tokens past the context's length (so no BOS in the continuation).
Token-id inputs are used as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from . import _check
from .config import Gemma3Config
from .engine import Engine
from .tokenizer import Tokenizer


class Model(Protocol):
    """What scoring needs of a model (gemma3.model.Model is one): named here rather than imported,
    so that scoring depends on the engine and not on the facade that calls it."""

    engine: Engine
    config: Gemma3Config
    tokenizer: Tokenizer | None
    max_seq_len: int

PREFILL_TOKENS = 512  # tokens per forward call while prefilling contexts (no logits)
LOGITS_ROWS = 128  # rows of logits per forward call while scoring continuations
SOFTMAX_ROWS = 32  # rows per log-softmax reduction (a 32 x 262144 float32 temporary: 32 MiB)
MAX_SEQS = 16  # KV sequences used at once (each is allocated lazily by the engine)

Text = str | Sequence[int]


# -- tokenization ------------------------------------------------------------------------------
def _ids(x: Sequence[int], what: str = "token ids") -> list[int]:
    return _check.as_ids(x, what=what)


def _bos_id(model: Model) -> int:
    tok = model.tokenizer
    if tok is not None and tok.bos_id is not None:
        return int(tok.bos_id)
    return int(model.config.bos_token_id)


def encode_pair(model: Model, context: Text, continuation: Text) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair, as lm-eval-harness makes them (see module
    docstring). Token-id lists pass through unchanged; the context must then be non-empty
    (give BOS yourself)."""
    if isinstance(context, str) and isinstance(continuation, str):
        if model.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = model.tokenizer.encode(context, add_bos=True)
        whole = model.tokenizer.encode(context + continuation, add_bos=True)
        return ctx, whole[len(ctx):]
    if isinstance(context, str) or isinstance(continuation, str):
        raise ValueError("give context and continuation both as text or both as token ids")
    ctx, cont = _ids(context, "context"), _ids(continuation, "continuation")
    if not ctx:
        raise ValueError("the context is empty: a token-id context needs at least BOS")
    model.engine.check_ids(ctx)
    model.engine.check_ids(cont)
    return ctx, cont


def _encode_text(model: Model, text: Text, add_bos: bool) -> list[int]:
    if isinstance(text, str):
        if model.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        return model.tokenizer.encode(text, add_bos=add_bos)
    ids = _ids(text, "text")
    model.engine.check_ids(ids)
    return ids


# -- scoring on the engine's scratch sequences --------------------------------------------------
def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-softmax of each row at its target, a few rows at a time.

    logits: (n, vocab) float32; targets: (n,) int. Returns (logprobs (n,) float64,
    greedy (n,) bool: the target is the row's argmax)."""
    n = len(targets)
    lp = np.empty(n, np.float64)
    greedy = np.empty(n, bool)
    for s in range(0, n, SOFTMAX_ROWS):
        x = logits[s:s + SOFTMAX_ROWS]
        t = np.asarray(targets[s:s + SOFTMAX_ROWS])
        r = np.arange(len(t))
        m = x.max(axis=1)
        lse = m.astype(np.float64) + np.log(np.exp(x - m[:, None]).sum(axis=1, dtype=np.float64))
        lp[s:s + len(t)] = x[r, t].astype(np.float64) - lse
        greedy[s:s + len(t)] = x.argmax(axis=1) == t
    return lp, greedy


@dataclass
class _Unit:
    """One context prefilled once and shared by up to MAX_SEQS continuations."""

    prefix: list[int]  # ctx[:-1]: fed without logits
    last: int  # ctx[-1]: fed again in front of every continuation (its row predicts cont[0])
    reqs: list[int]  # request indices
    seqs: list[int]  # one sequence per request; seqs[0] also holds the prefilled prefix


def _fit(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    """Left-truncates the context so that context + continuation - 1 tokens fit (lm-eval keeps
    the last max_length + 1 tokens the same way)."""
    if len(cont) > max_len:
        raise ValueError(f"context overflow: the continuation has {len(cont)} tokens and "
                         f"max_seq_len is {max_len}")
    keep = max_len + 1 - len(cont)
    return ctx[-keep:] if len(ctx) > keep else ctx


def score_tokens(model: Model, pairs: Sequence[tuple[list[int], list[int]]],
                 max_seqs: int = MAX_SEQS, progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-token log-probabilities of many (context ids, continuation ids) pairs.

    Returns, per pair, (logprobs (len(cont),) float64, greedy (len(cont),) bool). Pairs with equal
    contexts share one prefill. ``progress``: an object with ``update(n)`` (tqdm), advanced by
    one per pair. Takes the model's lock."""
    out: list = [None] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            out[i] = (np.zeros(0), np.zeros(0, bool))
            continue
        ctx = _fit(list(ctx), list(cont), model.max_seq_len)
        if not ctx:
            raise ValueError(f"request {i}: the context is empty")
        groups.setdefault(tuple(ctx), []).append(i)
    units = []
    for ctx, idx in groups.items():
        for s in range(0, len(idx), max_seqs):
            units.append(_Unit(list(ctx[:-1]), ctx[-1], idx[s:s + max_seqs], []))
    engine = model.engine
    with engine.exclusive():
        u = 0
        while u < len(units):
            wave, used = [], 0
            while u < len(units) and used + len(units[u].reqs) <= max_seqs:
                used += len(units[u].reqs)
                wave.append(units[u])
                u += 1
            with engine.slots(used) as seqs:
                for w in wave:
                    w.seqs, seqs = seqs[:len(w.reqs)], seqs[len(w.reqs):]
                _run_wave(engine, wave, pairs, out)
            if progress is not None:
                progress.update(sum(len(w.reqs) for w in wave))
    return out


def _run_wave(engine, wave: list[_Unit], pairs, out: list) -> None:
    # 1. prefill each context once (no logits), several contexts per call
    for _ in engine.run_packed([(w.seqs[0], w.prefix) for w in wave if w.prefix],
                               PREFILL_TOKENS, 0):
        pass
    # 2. fork the prefilled context into the sequences of the other continuations
    for w in wave:
        for s in w.seqs[1:]:
            engine.core.copy_seq(w.seqs[0], s)
    # 3. feed [ctx[-1]] + cont[:-1] on every sequence with logits; row j predicts cont[j]
    reqs, streams = [], []
    for w in wave:
        for r, s in zip(w.reqs, w.seqs, strict=True):
            cont = list(pairs[r][1])
            reqs.append(r)
            streams.append((s, [w.last] + cont[:-1]))
    got: dict[int, tuple[list, list]] = {r: ([], []) for r in reqs}
    for pieces, logits in engine.run_packed(streams, LOGITS_ROWS, 2):
        row = 0
        for k, a, b in pieces:
            r = reqs[k]
            lp, g = target_logprobs(logits[row:row + b - a], np.asarray(pairs[r][1][a:b], np.int64))
            got[r][0].append(lp)
            got[r][1].append(g)
            row += b - a
        del logits
    for r, (lps, gs) in got.items():
        out[r] = (np.concatenate(lps), np.concatenate(gs))


# -- public scoring API --------------------------------------------------------------------------
def loglikelihood_batch(model: Model, requests: Iterable[tuple[Text, Text]], *,
                        max_seqs: int = MAX_SEQS, progress=None) -> list[tuple[float, bool]]:
    """``[(sum logprob, is_greedy)]`` for many (context, continuation) pairs (text or ids).

    Pairs with the same context (e.g. the choices of a multiple-choice question) share its KV
    cache; ``max_seqs`` sequences are scored together per forward call."""
    _check.integer("max_seqs", max_seqs, 1)
    requests = list(requests)
    for i, r in enumerate(requests):
        if not isinstance(r, (tuple, list)) or len(r) != 2:
            raise TypeError(f"requests[{i}] must be a (context, continuation) pair, got "
                            f"{type(r).__name__}")
    pairs = [encode_pair(model, c, x) for c, x in requests]
    res = score_tokens(model, pairs, max_seqs=max_seqs, progress=progress)
    return [(float(lp.sum()), bool(g.all())) for lp, g in res]


def loglikelihood(model: Model, context: Text, continuation: Text) -> tuple[float, bool]:
    """(sum of the continuation's token log-probabilities given the context, whether greedy
    decoding from the context would produce exactly the continuation)."""
    return loglikelihood_batch(model, [(context, continuation)])[0]


@dataclass(frozen=True)
class ChoiceScores:
    """Scores of a multiple-choice question (lm-eval's acc and acc_norm predictions)."""

    logprobs: list[float]  # sum logprob of each choice
    is_greedy: list[bool]
    n_tokens: list[int]
    pred: int  # argmax logprob
    pred_norm: int  # argmax logprob / len(choice) in characters (lm-eval's acc_norm)


def multiple_choice(model: Model, context: Text, choices: Sequence[Text], *,
                    max_seqs: int = MAX_SEQS) -> ChoiceScores:
    """Scores every choice as a continuation of the context; the context is prefilled once and
    shared (``copy_seq``), all choices are fed in the same forward calls."""
    if not choices:
        raise ValueError("multiple_choice needs at least one choice")
    pairs = [encode_pair(model, context, c) for c in choices]
    res = score_tokens(model, pairs, max_seqs=max_seqs)
    lps = [float(lp.sum()) for lp, _ in res]
    lens = [len(c) if isinstance(c, str) else len(c) for c in choices]
    norm = [lp / max(n, 1) for lp, n in zip(lps, lens, strict=True)]
    return ChoiceScores(lps, [bool(g.all()) for _, g in res], [len(p[1]) for p in pairs],
                        int(np.argmax(lps)), int(np.argmax(norm)))


def rolling_windows(tokens: list[int], prefix: int, max_length: int
                    ) -> list[tuple[list[int], list[int]]]:
    """lm-eval-harness's disjoint rolling windows (``get_rolling_token_windows`` with
    context_len=1, then ``make_disjoint_window``): every token is predicted exactly once; the
    first window is conditioned on ``prefix`` (BOS), later ones on what precedes them within a
    window of at most ``max_length`` input tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        inp = tokens[max(end - max_length - 1, 0):end - 1]
        out.append((inp[:len(inp) - (n - 1)], tokens[end - n:end]))
        done = end
    return out


def loglikelihood_rolling(model: Model, text: Text, max_length: int | None = None) -> float:
    """Log-likelihood of a whole text, lm-eval-harness's ``loglikelihood_rolling``: the text is
    tokenized without BOS, cut into disjoint windows of ``max_length`` tokens (default the
    model's max_seq_len); the first window is conditioned on BOS. Token ids are used as given."""
    tokens = _encode_text(model, text, add_bos=False)
    L = model.max_seq_len if max_length is None else min(
        _check.integer("max_length", max_length), model.max_seq_len)
    wins = rolling_windows(tokens, _bos_id(model), L)
    return float(sum(lp.sum() for lp, _ in score_tokens(model, wins)))


# -- perplexity ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Perplexity:
    """Result of :func:`perplexity`. ``ppl = exp(nll)``; ``bits_per_byte`` = nll_sum / ln 2 over
    the UTF-8 bytes of the scored tokens (None without a tokenizer)."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    nll_sum: float
    n_tokens: int  # tokens scored
    n_bytes: int | None
    bits_per_byte: float | None
    protocol: str
    n_ctx: int
    stride: int | None
    n_windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_windows(tokens: list[int], n_ctx: int, stride: int | None, protocol: str,
                       bos: int) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) pairs a perplexity protocol scores.

    ``"llama.cpp"`` (``llama-perplexity``'s default mode): the tokens (text tokenized with BOS)
    are cut into ``len // n_ctx`` chunks of ``n_ctx`` (the tail is dropped); each chunk's first
    token is replaced by BOS and evaluated from an empty cache; only positions
    ``n_ctx//2 .. n_ctx-2`` are scored, i.e. the tokens at ``n_ctx//2 + 1 .. n_ctx - 1`` (the
    second half of the chunk, ``n_ctx - n_ctx//2 - 1`` tokens). ``stride`` is not used.

    ``"hf"`` (Hugging Face's "Perplexity of fixed-length models" recipe): windows of at most
    ``n_ctx`` tokens start every ``stride`` tokens (default ``n_ctx // 2``); each window scores
    only the tokens past the previous window's end (the others are labels -100), and a window's
    first token is never a target. No BOS is inserted in later windows."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    if protocol == "llama.cpp":
        if stride is not None:
            raise ValueError("stride applies to protocol='hf'; the llama.cpp protocol uses "
                             "disjoint chunks")
        n_chunk = len(tokens) // n_ctx
        if n_chunk < 1:
            raise ValueError(f"the text has {len(tokens)} tokens: the llama.cpp protocol needs at "
                             f"least n_ctx={n_ctx} (llama-perplexity itself wants 2 * n_ctx)")
        first = n_ctx // 2
        out = []
        for i in range(n_chunk):
            chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
            chunk[0] = bos
            out.append((chunk[:first + 1], chunk[first + 1:]))
        return out
    if protocol == "hf":
        stride = n_ctx // 2 if stride is None else _check.integer("stride", stride)
        if not 1 <= stride <= n_ctx:
            raise ValueError(f"stride must be in 1..n_ctx, got {stride}")
        if len(tokens) < 2:
            raise ValueError("the text needs at least 2 tokens")
        out, prev_end = [], 0
        for begin in range(0, len(tokens), stride):
            end = min(begin + n_ctx, len(tokens))
            trg = end - prev_end
            win = tokens[begin:end]
            c = max(1, len(win) - trg)
            if c < len(win):
                out.append((win[:c], win[c:]))
            prev_end = end
            if end == len(tokens):
                break
        return out
    raise ValueError(f"protocol must be 'llama.cpp' or 'hf', got {protocol!r}")


def perplexity(model: Model, text: Text, n_ctx: int, stride: int | None = None,
               protocol: str = "llama.cpp", progress=None) -> Perplexity:
    """Token perplexity of a text under a named protocol (see :func:`perplexity_windows`).
    Text is tokenized with BOS; token ids are used as given."""
    n_ctx = _check.integer("n_ctx", n_ctx)
    if n_ctx > model.max_seq_len:
        raise ValueError(f"n_ctx={n_ctx} exceeds max_seq_len={model.max_seq_len}")
    tokens = _encode_text(model, text, add_bos=True)
    wins = perplexity_windows(tokens, n_ctx, stride, protocol, _bos_id(model))
    res = score_tokens(model, wins, progress=progress)
    nll_sum = -float(sum(lp.sum() for lp, _ in res))
    n = sum(len(c) for _, c in wins)
    n_bytes = bpb = None
    if model.tokenizer is not None:
        n_bytes = sum(len(model.tokenizer.decode_bytes([t])) for _, c in wins for t in c)
        bpb = nll_sum / math.log(2) / n_bytes if n_bytes else None
    if protocol == "hf" and stride is None:
        stride = n_ctx // 2
    return Perplexity(math.exp(nll_sum / n), nll_sum / n, nll_sum, n, n_bytes, bpb, protocol,
                      n_ctx, stride, len(wins))
