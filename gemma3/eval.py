"""Batch evaluation: log-likelihood scoring, rolling log-likelihood, perplexity, and the
``python -m gemma3 eval`` job runner (local process pool or Ray).

Everything here reduces to one request type, lm-eval-harness's: the log-probability of a
continuation given a context,

    log p(cont | ctx) = sum_i  logits[i, cont_i] - logsumexp(logits[i, :]),

where row i is the model's output at the position just before ``cont_i``. Requests run on the
engine's extra KV sequences (1 .. n; sequence 0 is :class:`Model`'s interactive context and is
never touched), several per forward call as groups. Requests with the same context share it: the
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
from typing import TYPE_CHECKING

import numpy as np

from . import _check

if TYPE_CHECKING:
    from .model import Model

PREFILL_TOKENS = 512  # tokens per forward call while prefilling contexts (no logits)
LOGITS_ROWS = 128  # rows of logits per forward call while scoring continuations
SOFTMAX_ROWS = 32  # rows per log-softmax reduction (a 32 x 262144 float32 temporary: 32 MiB)
MAX_SEQS = 16  # KV sequences used at once (each is allocated lazily by the engine)

Text = str | Sequence[int]


# -- tokenization ------------------------------------------------------------------------------
def _ids(x: Sequence[int], what: str = "token ids") -> list[int]:
    from .model import _as_ids

    return _as_ids(x, what=what)


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
    model._check_ids(ctx)
    model._check_ids(cont)
    return ctx, cont


def _encode_text(model: Model, text: Text, add_bos: bool) -> list[int]:
    if isinstance(text, str):
        if model.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids")
        return model.tokenizer.encode(text, add_bos=add_bos)
    ids = _ids(text, "text")
    model._check_ids(ids)
    return ids


# -- the scoring engine ------------------------------------------------------------------------
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
    with model._exclusive():
        core = model._core
        if core.n_seq < max_seqs + 1:
            core.set_n_seq(max_seqs + 1)
        u = 0
        while u < len(units):
            wave, used = [], 0
            while u < len(units) and used + len(units[u].reqs) <= max_seqs:
                units[u].seqs = list(range(used + 1, used + 1 + len(units[u].reqs)))
                used += len(units[u].reqs)
                wave.append(units[u])
                u += 1
            try:
                _run_wave(core, wave, pairs, out)
            finally:
                for s in range(1, used + 1):
                    core.reset(s)
            if progress is not None:
                progress.update(sum(len(w.reqs) for w in wave))
    return out


def _run_wave(core, wave: list[_Unit], pairs, out: list) -> None:
    # 1. prefill each context once (no logits), several contexts per call
    todo = [(w.seqs[0], w.prefix) for w in wave if w.prefix]
    pos = [0] * len(todo)
    while any(p < len(t[1]) for p, t in zip(pos, todo, strict=True)):
        ids, seqs, lens, budget = [], [], [], PREFILL_TOKENS
        for k, (s, pre) in enumerate(todo):
            n = min(len(pre) - pos[k], budget)
            if n <= 0:
                continue
            ids += pre[pos[k]:pos[k] + n]
            seqs.append(s)
            lens.append(n)
            pos[k] += n
            budget -= n
            if not budget:
                break
        core.forward(np.asarray(ids, np.int32), 0, seqs=np.asarray(seqs, np.int32),
                     lens=np.asarray(lens, np.int64))
    # 2. fork the prefilled context into the sequences of the other continuations
    for w in wave:
        for s in w.seqs[1:]:
            core.copy_seq(w.seqs[0], s)
    # 3. feed [ctx[-1]] + cont[:-1] on every sequence with logits; row j predicts cont[j]
    feeds = []  # (request, seq, tokens fed, targets)
    for w in wave:
        for r, s in zip(w.reqs, w.seqs, strict=True):
            cont = list(pairs[r][1])
            feeds.append((r, s, [w.last] + cont[:-1], np.asarray(cont, np.int64)))
    got = {r: ([], []) for r, *_ in feeds}
    pos = [0] * len(feeds)
    while any(p < len(f[2]) for p, f in zip(pos, feeds, strict=True)):
        ids, seqs, lens, where, budget = [], [], [], [], LOGITS_ROWS
        for k, (r, s, fed, tgt) in enumerate(feeds):
            n = min(len(fed) - pos[k], budget)
            if n <= 0:
                continue
            ids += fed[pos[k]:pos[k] + n]
            seqs.append(s)
            lens.append(n)
            where.append((r, tgt[pos[k]:pos[k] + n]))
            pos[k] += n
            budget -= n
            if not budget:
                break
        logits = core.forward(np.asarray(ids, np.int32), 2, seqs=np.asarray(seqs, np.int32),
                              lens=np.asarray(lens, np.int64))
        row = 0
        for r, tgt in where:
            lp, g = target_logprobs(logits[row:row + len(tgt)], tgt)
            got[r][0].append(lp)
            got[r][1].append(g)
            row += len(tgt)
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


# -- the eval job: records in, results out ------------------------------------------------------
# A task file is JSON Lines, one record per line:
#   {"id": ..., "type": "loglikelihood", "context": str|ids, "continuation": str|ids}
#       -> {"logprob", "is_greedy", "n_tokens"}
#   {"id": ..., "type": "multiple_choice", "context": str|ids, "choices": [str|ids, ...],
#    "answer": int (optional)}
#       -> {"logprobs", "is_greedy", "pred", "pred_norm", "correct", "correct_norm"}
#   {"id": ..., "type": "perplexity", "text": str|ids, "n_ctx": int, "stride": int (optional),
#    "protocol": "llama.cpp"|"hf" (optional)}
#       -> {"ppl", "nll", "nll_sum", "n_tokens", "bits_per_byte"}
#   {"id": ..., "type": "generate", "prompt": str|ids, "max_new_tokens": int (default 64),
#    sampling arguments as Model.generate (default temperature 0: greedy), "stop": [str],
#    "expected": str (optional)}
#       -> {"text" (or "ids" for an id prompt), "n_tokens", "correct": stripped text == expected}
# Every result also has "id" and "type"; a record that fails gets "error": message.
# "id" (a string or an integer, unique in the file) defaults to the record's line number (0-based).
RECORD_TYPES = ("generate", "loglikelihood", "multiple_choice", "perplexity")
GEN_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "seed", "stop")
SHARD = 8  # records per work unit sent to a worker


def read_tasks(path: str) -> list[dict]:
    """Records of a task file, each with an "id" (checked unique) and a known "type"."""
    import json

    recs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not JSON: {e}") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n + 1}: a record must be a JSON object")
            r.setdefault("id", n)
            if r.get("type") not in RECORD_TYPES:
                raise ValueError(f"{path}:{n + 1}: type must be one of {RECORD_TYPES}, got "
                                 f"{r.get('type')!r}")
            key = json.dumps(r["id"])
            if key in seen:
                raise ValueError(f"{path}:{n + 1}: duplicate id {r['id']!r}")
            seen.add(key)
            recs.append(r)
    return recs


def _text(model: Model, v):
    return v if isinstance(v, str) else [int(t) for t in v]


def run_records(model: Model, recs: Sequence[dict]) -> list[dict]:
    """Results of a shard of records, in order: the scoring requests of all its records are
    batched together, generation records decode together (generate_batch). Each result also
    carries "_tokens", the tokens its record put through the model (for tokens/s; removed before
    writing)."""
    out: list = [None] * len(recs)
    ll = [i for i, r in enumerate(recs) if r["type"] in ("loglikelihood", "multiple_choice")]
    pairs, owner = [], []
    for i in ll:
        r = recs[i]
        try:
            if r["type"] == "loglikelihood":
                ps = [encode_pair(model, _text(model, r["context"]),
                                  _text(model, r["continuation"]))]
            else:
                if not r.get("choices"):
                    raise ValueError("multiple_choice needs a non-empty 'choices' list")
                ps = [encode_pair(model, _text(model, r["context"]), _text(model, c))
                      for c in r["choices"]]
        except (KeyError, TypeError, ValueError) as e:
            out[i] = {"error": _err(e)}
            continue
        pairs += ps
        owner += [i] * len(ps)
    scored: list = []
    try:
        scored = score_tokens(model, pairs)
    except ValueError:  # one bad request (e.g. too long): score record by record
        scored = []
        for p in pairs:
            try:
                scored += score_tokens(model, [p])
            except ValueError as e:
                scored.append(e)
    per: dict[int, list] = {}
    for k, i in enumerate(owner):
        per.setdefault(i, []).append((pairs[k], scored[k]))
    for i, items in per.items():
        r = recs[i]
        bad = [s for _, s in items if isinstance(s, Exception)]
        if bad:
            out[i] = {"error": _err(bad[0])}
            continue
        toks = sum(len(c) + len(x) for (c, x), _ in items)
        lps = [float(s[0].sum()) for _, s in items]
        greedy = [bool(s[1].all()) for _, s in items]
        if r["type"] == "loglikelihood":
            out[i] = {"logprob": lps[0], "is_greedy": greedy[0],
                      "n_tokens": len(items[0][0][1]), "_tokens": toks}
        else:
            lens = [len(c) for c in r["choices"]]
            pred = int(np.argmax(lps))
            pred_norm = int(np.argmax([lp / max(n, 1) for lp, n in zip(lps, lens, strict=True)]))
            res = {"logprobs": lps, "is_greedy": greedy, "pred": pred, "pred_norm": pred_norm}
            if r.get("answer") is not None:
                res["correct"] = pred == int(r["answer"])
                res["correct_norm"] = pred_norm == int(r["answer"])
            res["_tokens"] = toks
            out[i] = res
    gens = [i for i, r in enumerate(recs) if r["type"] == "generate"]
    _run_generate(model, recs, gens, out)
    for i, r in enumerate(recs):
        if r["type"] == "perplexity":
            try:
                p = perplexity(model, _text(model, r["text"]), int(r["n_ctx"]), r.get("stride"),
                               r.get("protocol", "llama.cpp"))
                out[i] = {"ppl": p.ppl, "nll": p.nll, "nll_sum": p.nll_sum,
                          "n_tokens": p.n_tokens, "bits_per_byte": p.bits_per_byte,
                          "_tokens": p.n_windows * p.n_ctx}
            except (KeyError, TypeError, ValueError) as e:
                out[i] = {"error": _err(e)}
    return [{"id": r["id"], "type": r["type"], **o} for r, o in zip(recs, out, strict=True)]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _run_generate(model: Model, recs: Sequence[dict], idx: list[int], out: list) -> None:
    """Generation records, decoded together with Model.generate_batch (greedy results equal
    one-by-one generation exactly)."""
    ok, settings, prompts = [], [], []
    for i in idx:
        r = recs[i]
        try:
            s = {k: r[k] for k in GEN_KEYS if k in r}
            s.setdefault("max_new_tokens", 64)
            s.setdefault("temperature", 0.0)
            p = _text(model, r["prompt"])
            model.encode(p)
        except (KeyError, TypeError, ValueError) as e:
            out[i] = {"error": _err(e)}
            continue
        ok.append(i)
        settings.append(s)
        prompts.append(p)
    if not ok:
        return
    try:
        ids = model.generate_batch(prompts, settings, return_ids=True)
    except ValueError as e:
        for i in ok:
            out[i] = {"error": _err(e)}
        return
    for i, p, new, s in zip(ok, prompts, ids, settings, strict=True):
        res: dict = {"n_tokens": len(new)}
        if isinstance(p, str) and model.tokenizer is not None:
            text = model.tokenizer.decode(new)
            stops = s.get("stop") or ()
            stops = (stops,) if isinstance(stops, str) else stops
            cut = min((text.find(st) for st in stops if st in text), default=-1)
            res["text"] = text[:cut] if cut >= 0 else text
            if recs[i].get("expected") is not None:
                res["correct"] = res["text"].strip() == str(recs[i]["expected"]).strip()
        else:
            res["ids"] = [int(t) for t in new]
            if recs[i].get("expected") is not None:
                res["correct"] = res["ids"] == [int(t) for t in recs[i]["expected"]]
        n_prompt = len(model.encode(p))
        res["_tokens"] = n_prompt + len(new)
        out[i] = res


def read_results(path: str) -> dict:
    """Results already in a results file, by json-encoded id. A truncated or unreadable last line
    (a run killed mid-write) is cut off the file so that appending continues cleanly."""
    import json
    import os

    done: dict = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        done[json.dumps(r["id"])] = r
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


# worker-process state: one model per process, loaded once
_WORKER_MODEL = None


def _worker_init(model_path: str | None, threads: int | None) -> None:
    global _WORKER_MODEL
    from .model import load

    _WORKER_MODEL = load(model_path, n_threads=threads)


def _pool_worker_init(model_path: str | None, threads: int | None) -> None:
    """Pool workers leave Ctrl-C (which a terminal sends to the whole process group) to the
    parent, which stops the pool; in a worker it would only print a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(model_path, threads)


def _worker_run(shard: list[dict]) -> list[dict]:
    return run_records(_WORKER_MODEL, shard)


def _shards(recs: list[dict], size: int = SHARD) -> list[list[dict]]:
    return [recs[s:s + size] for s in range(0, len(recs), size)]


def summarize(recs: Sequence[dict], results: dict, elapsed: float, n_tokens: int) -> dict:
    """Accuracy (multiple_choice and generate records with an answer/expected), aggregate
    perplexity (token-weighted over perplexity records), counts and throughput of this run."""
    import json

    acc, acc_n, nll, ntok, errors = [], [], 0.0, 0, 0
    by_type: dict[str, int] = {}
    for r in recs:
        res = results.get(json.dumps(r["id"]))
        if res is None:
            continue
        by_type[r["type"]] = by_type.get(r["type"], 0) + 1
        if "error" in res:
            errors += 1
            continue
        if "correct" in res:
            acc.append(res["correct"])
        if "correct_norm" in res:
            acc_n.append(res["correct_norm"])
        if r["type"] == "perplexity":
            nll += res["nll_sum"]
            ntok += res["n_tokens"]
    return {
        "n_records": len(recs),
        "n_done": sum(by_type.values()),
        "by_type": by_type,
        "n_errors": errors,
        "accuracy": float(np.mean(acc)) if acc else None,
        "accuracy_norm": float(np.mean(acc_n)) if acc_n else None,
        "n_scored": len(acc),
        "perplexity": math.exp(nll / ntok) if ntok else None,
        "perplexity_tokens": ntok,
        "elapsed_s": round(elapsed, 3),
        "tokens": n_tokens,
        "tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None,
    }


def run_job(tasks: str, out: str, model_path: str | None = None, workers: int | None = None,
            ray_address: str | bool | None = None, threads: int | None = None,
            progress: bool = True, ray_init_kwargs: dict | None = None) -> dict:
    """Runs a task file into a results file (see the record format above) and returns the
    summary, also written next to ``out`` as ``<out without .jsonl>.summary.json``.

    While running, results are appended in completion order, one JSON line each, flushed and
    fsynced; records whose id is already in ``out`` are skipped, so an interrupted run resumes
    where it stopped. When every record is done the file is rewritten in input order (atomic
    rename), so an interrupted-and-resumed run ends with the same file as an uninterrupted one.

    ``workers``: processes (default: the CPU count; 1 = in this process). ``ray_address``:
    run on Ray instead (True or "" = start/attach a local Ray, a string = ``ray.init(address)``),
    one actor per worker, each loading the model once."""
    import json
    import os
    import time

    if workers is not None:
        _check.integer("workers", workers, 1)
    if threads is not None:
        _check.integer("threads", threads, 1)
    recs = read_tasks(tasks)
    done = read_results(out)
    known = {json.dumps(r["id"]) for r in recs}
    stray = [k for k in done if k not in known]
    if stray:
        raise ValueError(f"{out} holds results for ids not in {tasks} (e.g. {stray[0]}): use "
                         f"another --out")
    # fixed shards of the input (not of what is left), so a resumed run batches each record
    # exactly as an uninterrupted one; a shard with any result missing is rerun whole
    shards = [sh for sh in _shards(recs) if any(json.dumps(r["id"]) not in done for r in sh)]
    n_left = sum(json.dumps(r["id"]) not in done for sh in shards for r in sh)
    n_cpu = os.cpu_count() or 1
    if workers is None:
        workers = n_cpu
    workers = max(1, min(int(workers), max(1, len(shards))))
    if threads is None:
        threads = max(1, n_cpu // workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(recs), initial=len(recs) - n_left, unit="rec", desc="eval")
    t0 = time.perf_counter()
    n_tokens = 0
    with open(out, "a", encoding="utf-8") as f:
        def write(results: list[dict]) -> None:
            nonlocal n_tokens
            new = 0
            for res in results:
                n_tokens += res.pop("_tokens", 0)
                key = json.dumps(res["id"])
                if key in done:  # written before an interruption
                    continue
                f.write(json.dumps(res) + "\n")
                done[key] = res
                new += 1
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(new)

        if ray_address is not None and ray_address is not False:
            _run_ray(shards, write, model_path, workers, threads, ray_address,
                     ray_init_kwargs or {})
        elif workers == 1:
            from .model import load

            model = load(model_path, n_threads=threads)
            for sh in shards:
                write(run_records(model, sh))
        elif shards:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP state
            with ctx.Pool(workers, _pool_worker_init, (model_path, threads)) as pool:
                for results in pool.imap_unordered(_worker_run, shards):
                    write(results)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if all(json.dumps(r["id"]) in done for r in recs):
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(done[json.dumps(r["id"])]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    summary = summarize(recs, done, elapsed, n_tokens)
    with open(summary_path(out), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def summary_path(out: str) -> str:
    base = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return base + ".summary.json"


def _run_ray(shards, write, model_path, workers, threads, address, init_kwargs) -> None:
    """Shards on Ray actors (one model per actor), results written as they complete."""
    import ray

    if not ray.is_initialized():
        if isinstance(address, str) and address:
            ray.init(address=address, **init_kwargs)
        else:
            ray.init(**init_kwargs)

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, path, n_threads):
            _worker_init(path, n_threads)

        def run(self, shard):
            return _worker_run(shard)

    actors = [Worker.remote(model_path, threads) for _ in range(max(1, workers))]
    pending = {}
    queue = list(shards)
    for a in actors:  # keep every actor busy with one shard at a time
        if queue:
            pending[a.run.remote(queue.pop(0))] = a
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        a = pending.pop(ready[0])
        write(ray.get(ready[0]))
        if queue:
            pending[a.run.remote(queue.pop(0))] = a
    for a in actors:
        ray.kill(a)


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma3 eval tasks.jsonl --out results.jsonl [...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gemma3 eval", description=(
        "Run an evaluation task file (JSON Lines: generate, loglikelihood, multiple_choice, "
        "perplexity records). Results are appended as they finish; rerunning resumes."))
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


def add_arguments(ap) -> None:
    ap.add_argument("tasks", help="task file (JSON Lines)")
    ap.add_argument("--out", "-o", required=True, help="results file (JSON Lines); the summary "
                    "goes to <out>.summary.json")
    ap.add_argument("--model", "-m", default=None, help="GGUF file or HF checkpoint directory")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: CPU count; 1 = in-process)")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray (no ADDRESS: a local Ray; or ray://host:port / auto)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(a) -> int:
    import json

    s = run_job(a.tasks, a.out, a.model, a.workers, a.ray, a.threads, not a.no_progress)
    print(json.dumps(s, indent=2))
    return 0
