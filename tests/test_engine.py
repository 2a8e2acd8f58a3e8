"""The engine (gemma3.engine) and generation pieces: each rule decided once, on one side.

* token ids and room in the cache: C's rule (g3_model_check_tokens), asked once before a prompt fed
  in several calls touches the cache;
* the engine's lock and the C object's guard say different things;
* one packing helper (run_packed) respects its budget and gives what single-sequence calls give;
* one StopMatcher; GenerationConfig.validate runs once per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import engine as E
from gemma3 import generation as G

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"


@pytest.fixture(scope="module")
def m():
    return gemma3.load(TINY, max_seq_len=4 * E.PREFILL_CHUNK)


def test_bad_id_in_a_late_chunk_is_refused_before_the_cache_is_touched(m):
    m.reset()
    base = [2] + [(7 * i) % 500 + 3 for i in range(40)]
    m.generate(base, max_new_tokens=1, temperature=0, return_ids=True)
    n0, ids0 = m.n_past, list(m.engine.ids)
    long = base + [5] * (3 * E.PREFILL_CHUNK) + [m.config.vocab_size]  # bad id in chunk 4
    with pytest.raises(ValueError, match=f"token id {m.config.vocab_size} "):
        m.generate(long, max_new_tokens=1, temperature=0, return_ids=True)
    assert m.n_past == n0 and m.engine.ids == ids0  # nothing cut back, nothing fed
    too_long = base + [5] * (4 * E.PREFILL_CHUNK)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.logits(too_long)
    assert m.n_past == n0


def test_check_feed_is_the_forward_rule(m):
    core = m.engine.core
    V = m.config.vocab_size
    bad = np.array([2, 3, V], np.int32)
    with pytest.raises(ValueError) as a:
        core.check_feed(bad, None, 0)
    m.reset()
    with pytest.raises(ValueError) as b:
        core.forward(bad, 1)
    assert str(a.value) == str(b.value)
    mask = np.array([0, 0, 1], np.uint8)
    core.check_feed(bad, mask, 0)  # a soft token's id is replaced by an embedding
    n = m.max_seq_len
    core.check_feed(np.full(n, 2, np.int32), None, 0)
    with pytest.raises(ValueError, match="context overflow"):
        core.check_feed(np.full(n, 2, np.int32), None, 1)
    with pytest.raises(ValueError, match="embd_mask"):
        core.check_feed(bad, np.zeros(2, np.uint8), 0)


def test_the_two_busy_guards_say_different_things(m):
    with m.engine.exclusive():
        with pytest.raises(RuntimeError, match="already running a call in another thread"):
            m.logits([2, 3])
    assert "another thread" in E.BUSY


def test_run_packed_respects_the_budget_and_matches_single_calls(m):
    eng = m.engine
    rng = np.random.default_rng(0)
    toks = [rng.integers(3, 500, n).tolist() for n in (5, 11, 3)]
    with eng.exclusive():
        with eng.slots(3) as seqs:
            rows, calls = {}, []
            for pieces, lg in eng.run_packed(list(zip(seqs, toks, strict=True)), 8, 2):
                calls.append(sum(b - a for _, a, b in pieces))
                r = 0
                for k, a, b in pieces:
                    rows.setdefault(k, []).append(lg[r:r + b - a])
                    r += b - a
        assert all(c <= 8 for c in calls) and sum(calls) == 19
        for k, t in enumerate(toks):
            eng.fresh()
            ref = eng.feed(t, 2)
            got = np.concatenate(rows[k])
            # different call shapes: only the summation order differs (see tolerances)
            np.testing.assert_allclose(got, ref, rtol=0, atol=tol.TINY_LOGITS_ABS)
        assert eng.core.n_seq >= 4 and all(eng.core.seq_n_past(s) == 0 for s in (1, 2, 3))


def test_stop_matcher():
    sm = G.StopMatcher(["STOP", "xy"])
    out = []
    for piece in ["ab", "cS", "TO", "Pzz"]:
        text, stopped = sm.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "abc" and stopped
    sm = G.StopMatcher(["STOP"])
    assert sm.push("abST") == ("a", False)
    assert sm.flush("x") == "bSTx"
    assert G.StopMatcher([]).push("abc") == ("abc", False)
    assert G.StopMatcher(["b"]).cut("abcb") == ("a", True)


def test_generation_config_is_validated_once_per_call(m, monkeypatch):
    calls = []
    orig = G.GenerationConfig.validate

    def counting(self, vocab):
        calls.append(1)
        return orig(self, vocab)

    monkeypatch.setattr(G.GenerationConfig, "validate", counting)
    m.reset()
    m.generate([2, 3, 4], max_new_tokens=2, temperature=0, return_ids=True)
    assert len(calls) == 1
    calls.clear()
    m.generate_batch([[2, 3], [2, 4]], max_new_tokens=2, temperature=0, return_ids=True)
    assert len(calls) == 2  # one per prompt's settings
