"""Whole-model tests: logits and greedy generations against the committed transformers fixtures,
the NumPy twin, our own GGUF conversion; cache behaviour, argument errors and the chat format.

Fixtures (tests/fixtures/, written by transformers in float32, see the make_*.py scripts there):
  tiny/{tiny,tiny-scaled}/   seeded random HF checkpoints + reference.npz (no tokenizer)
  ref_270m.npz / .json       the real 270M GGUF's dequantized weights run by transformers
The 270M tests need ``gemma3.default_model_path()`` (the ``model`` extra) and skip without it.
Tests that need text in and out use the tiny checkpoint converted to GGUF together with the
Gemma 3 tokenizer (from /work/shared/data), else the 270M model.
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3.convert import hf_to_gguf, tokenizer_metadata

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402
from reference import gemma3_ref as ref  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
TINY = ["tiny", "tiny-scaled"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
TOKENIZER_JSON = SHARED / "gemma3-tokenizer.json.xz"
TOKENIZER_CONFIG = SHARED / "gemma3-tokenizer_config.json.xz"


def tiny_dir(name: str) -> Path:
    return FIX / "tiny" / name


def tiny_ref(name: str):
    return np.load(tiny_dir(name) / "reference.npz")


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    name = request.param
    return name, gemma3.load(tiny_dir(name)), tiny_ref(name)


def _first_diff(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (or the shorter length)."""
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


# ---- tiny models: logits and greedy generation ----------------------------------------------


def test_tiny_logits_vs_transformers(tiny):
    name, m, z = tiny
    got = m.logits(z["input_ids"])
    d = float(np.abs(got - z["logits"]).max())
    print(f"\n{name}: max |Δlogit| vs transformers {d:.3g} over {got.shape}")
    assert d < tol.TINY_LOGITS_ABS, f"{name}: max |Δlogit| {d:.3g}"
    np.testing.assert_array_equal(got.argmax(-1), z["logits"].argmax(-1))


def test_tiny_logits_vs_twin(tiny):
    name, m, z = tiny
    twin = ref.forward(ref.hf_weights(tiny_dir(name)), ref.hf_config(tiny_dir(name)),
                       z["input_ids"])
    d_ours = float(np.abs(m.logits(z["input_ids"]) - twin).max())
    d_hf = float(np.abs(z["logits"] - twin).max())
    print(f"\n{name}: max |Δlogit| ours vs twin {d_ours:.3g}; transformers vs twin {d_hf:.3g}")
    assert d_hf < tol.TINY_LOGITS_ABS, "the twin disagrees with transformers"
    assert d_ours < tol.TINY_LOGITS_ABS


def test_tiny_gguf_conversion_same_logits(tiny, tmp_path):
    name, m, z = tiny
    out = tmp_path / f"{name}.gguf"
    hf_to_gguf(tiny_dir(name), out)
    g = gemma3.load(out)
    assert g.tokenizer is None  # the fixture ships no tokenizer.json: no tokenizer keys
    a, b = m.logits(z["input_ids"]), g.logits(z["input_ids"])
    d = float(np.abs(a - b).max())
    print(f"\n{name}: safetensors vs converted GGUF max |Δlogit| {d:.3g} "
          f"({'bit-identical' if np.array_equal(a, b) else 'not bit-identical'})")
    assert d <= tol.GGUF_VS_SAFETENSORS_ABS
    for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "sliding_window", "layer_types", "rope_theta",
              "rope_local_base_freq", "rope_scaling_factor", "query_pre_attn_scalar"):
        assert getattr(g.config, f) == getattr(m.config, f), f
    assert g.generate(z["gen_prompt_ids"], max_new_tokens=len(z["gen_new_ids"]), temperature=0,
                      return_ids=True, stop_token_ids=[]) == z["gen_new_ids"].tolist()


def test_tiny_gguf_layout(tmp_path):
    """Keys and tensor names as llama.cpp's converter writes them (llama-cpp-gemma3.md §3)."""
    for name in TINY:
        out = tmp_path / f"{name}.gguf"
        hf_to_gguf(tiny_dir(name), out)
        f = gemma3.GGUFFile(out)
        md, t = f.metadata, f.tensors
        hf = json.loads((tiny_dir(name) / "config.json").read_text())
        assert md["general.architecture"] == "gemma3"
        assert md["gemma3.embedding_length"] == hf["hidden_size"]
        assert md["gemma3.block_count"] == hf["num_hidden_layers"]
        assert md["gemma3.attention.key_length"] == hf["head_dim"]
        assert md["gemma3.attention.sliding_window"] == hf["sliding_window"]
        assert md["gemma3.context_length"] == hf["max_position_embeddings"]
        assert not any(k.startswith("tokenizer.") for k in md)
        assert "output.weight" not in t  # tied
        assert len(t) == 2 + 13 * hf["num_hidden_layers"]
        for k, info in t.items():
            assert info.type == "F32", k
        st = gemma3.safetensors.SafetensorsFile(tiny_dir(name) / "model.safetensors")
        np.testing.assert_array_equal(
            f.dequantize("blk.3.attn_q_norm.weight"),
            st.array("model.layers.3.self_attn.q_norm.weight") + np.float32(1))
        np.testing.assert_array_equal(f.dequantize("blk.0.attn_q.weight"),
                                      st.array("model.layers.0.self_attn.q_proj.weight"))
        scaled = name == "tiny-scaled"
        assert ("gemma3.rope.scaling.factor" in md) == scaled
        assert ("gemma3.query_pre_attn_scalar" in md) == scaled  # 24 != head_dim 32
        if scaled:
            assert md["gemma3.rope.scaling.type"] == "linear"
            assert md["gemma3.rope.scaling.factor"] == 8.0
            assert md["gemma3.query_pre_attn_scalar"] == 24.0


def test_tiny_greedy_matches_reference(tiny):
    name, m, z = tiny
    new = m.generate(z["gen_prompt_ids"], max_new_tokens=len(z["gen_new_ids"]), temperature=0,
                     return_ids=True, stop_token_ids=[])
    want = z["gen_new_ids"].tolist()
    assert new == want, (f"{name}: first divergence at step {_first_diff(new, want)}; "
                         f"reference margins {z['gen_margin']}")


def test_tokenizer_metadata_matches_llama_cpp():
    """Our tokenizer.json -> GGUF keys vs the real 270M GGUF (llama.cpp's SentencePiece path)."""
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"{TOKENIZER_JSON.name} not found in {SHARED}")
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError:
        pytest.skip("the 270M GGUF is not installed")
    real = gemma3.GGUFFile(path).metadata
    n = len(real["tokenizer.ggml.tokens"])
    md = tokenizer_metadata(TOKENIZER_JSON, n)
    assert md["tokenizer.ggml.tokens"] == list(real["tokenizer.ggml.tokens"])
    for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
              "add_bos_token", "add_eos_token", "add_space_prefix"):
        assert md[f"tokenizer.ggml.{k}"] == real[f"tokenizer.ggml.{k}"], k
    types, rtypes = md["tokenizer.ggml.token_type"], np.asarray(real["tokenizer.ggml.token_type"])
    # <start_of_image>/<end_of_image> are special in tokenizer.json but USER_DEFINED in the file
    assert np.nonzero(types != rtypes)[0].tolist() in ([], [255999, 256000])
    # scores: identical except single characters (never a merge result, so never compared)
    s, rs = md["tokenizer.ggml.scores"], np.asarray(real["tokenizer.ggml.scores"])
    diff = np.nonzero(s != rs)[0]
    assert all(len(md["tokenizer.ggml.tokens"][i]) == 1 for i in diff)


# ---- cache behaviour and argument errors (tiny model, token ids) ----------------------------


class CountingCore:
    """Wraps a _core.Model and records the length of every forward() batch."""

    def __init__(self, core):
        self._inner = core
        self.fed: list[int] = []

    def forward(self, ids, mode):
        self.fed.append(len(ids))
        return self._inner.forward(ids, mode)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture()
def tm():
    """A fresh tiny model (ids only)."""
    return gemma3.load(tiny_dir("tiny"))


def greedy(m, ids, n, **kw):
    return m.generate(list(ids), max_new_tokens=n, temperature=0, return_ids=True,
                      stop_token_ids=[], **kw)


def test_two_step_generation_equals_one_shot(tm, monkeypatch):
    prompt = tiny_ref("tiny")["gen_prompt_ids"].tolist()
    one = greedy(tm, prompt, 24)
    tm.reset()
    a = greedy(tm, prompt, 10)
    counter = CountingCore(tm.engine.core)
    monkeypatch.setattr(tm.engine, "core", counter)
    n_before = tm.n_past
    b = greedy(tm, prompt + a, 14)
    assert a + b == one
    # the cache held prompt + a[:-1]: only a[-1] was fed before decoding one token at a time
    assert n_before == len(prompt) + len(a) - 1
    assert counter.fed == [1] * len(b)


def test_teacher_forced_equals_cached_decode(tm):
    """Logits of the last position after decoding token by token equal a one-shot forward."""
    z = tiny_ref("tiny")
    ids = z["input_ids"][:20].tolist()
    full = tm.logits(ids)
    tm.reset()
    tm.generate(ids[:5], max_new_tokens=1, temperature=0, return_ids=True)
    last = None
    for t in ids[5:]:
        last = tm.engine.feed([t], 1)[0]
    np.testing.assert_allclose(last, full[-1], atol=tol.TINY_LOGITS_ABS)


def test_reset(tm):
    ids = tiny_ref("tiny")["input_ids"][:12].tolist()
    greedy(tm, ids, 5)
    assert tm.n_past > 0
    tm.reset()
    assert tm.n_past == 0
    np.testing.assert_array_equal(tm.logits(ids), gemma3.load(tiny_dir("tiny")).logits(ids))


def test_context_overflow_raises_and_model_survives():
    m = gemma3.load(tiny_dir("tiny"), max_seq_len=16)
    z = tiny_ref("tiny")
    ids = z["input_ids"].tolist()
    with pytest.raises(ValueError, match="overflow|max_seq_len"):
        m.logits(ids[:17])
    with pytest.raises(ValueError, match="overflow|max_seq_len"):
        m.generate(ids[:16], max_new_tokens=4, temperature=0, return_ids=True)
    out = greedy(m, ids[:10], 20)  # stops when the cache is full, without an error
    assert 1 <= len(out) <= 6
    got = m.logits(ids[:16])
    assert float(np.abs(got - z["logits"][:16]).max()) < tol.TINY_LOGITS_ABS


@pytest.mark.parametrize("bad", [[2, 512], [2, -1], [2, 1.5], [2, True], ["a"],
                                 np.array([2.0, 3.0])])
def test_bad_token_ids_raise_and_model_survives(tm, bad):
    z = tiny_ref("tiny")
    with pytest.raises(ValueError):
        tm.logits(bad)
    with pytest.raises(ValueError):
        tm.generate(bad, max_new_tokens=2, temperature=0, return_ids=True)
    got = tm.logits(z["input_ids"][:8])
    assert float(np.abs(got - z["logits"][:8]).max()) < tol.TINY_LOGITS_ABS


def test_empty_prompt_raises(tm):
    with pytest.raises(ValueError):
        tm.logits([])
    with pytest.raises(ValueError):
        tm.generate([], max_new_tokens=2, return_ids=True)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(top_k=-1), dict(min_p=2), dict(repetition_penalty=0),
                                dict(max_new_tokens=-1), dict(temperature=float("nan")),
                                dict(logit_bias={512: 1.0})])
def test_invalid_sampling_args_raise(tm, kw):
    with pytest.raises(ValueError):
        tm.generate([2, 10, 11], return_ids=True, **kw)
    assert greedy(tm, [2, 10, 11], 3) == greedy(gemma3.load(tiny_dir("tiny")), [2, 10, 11], 3)


def test_logit_bias_forces_greedy_choice(tm):
    plain = greedy(tm, [2, 10, 11], 4)
    forced = 77 if 77 not in plain else 78
    assert greedy(tm, [2, 10, 11], 4, logit_bias={forced: 1e4}) == [forced] * 4


def test_same_seed_same_tokens_tiny(tm):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, return_ids=True,
              stop_token_ids=[])
    a = tm.generate([2, 10, 11], seed=7, **kw)
    b = tm.generate([2, 10, 11], seed=7, **kw)
    c = tm.generate([2, 10, 11], seed=8, **kw)
    assert a == b and a != c


def test_threads_same_greedy_tokens():
    z = tiny_ref("tiny")
    try:
        gemma3.set_num_threads(1)
        one = greedy(gemma3.load(tiny_dir("tiny")), z["gen_prompt_ids"], 30)
        gemma3.set_num_threads(2)
        two = greedy(gemma3.load(tiny_dir("tiny")), z["gen_prompt_ids"], 30)
    finally:
        gemma3.set_num_threads(0)
    assert one == two == z["gen_new_ids"].tolist()


# ---- text in and out: generation, stop strings, streaming, chat -----------------------------


@pytest.fixture(scope="module")
def text_model(request):
    """The tiny checkpoint converted with the Gemma 3 tokenizer (conftest.py), or the 270M
    model without the tokenizer file."""
    if TOKENIZER_JSON.exists():
        return gemma3.load(request.getfixturevalue("tiny_tok_dir") / "tiny-tok.gguf")
    try:
        return gemma3.load(max_seq_len=1024)
    except FileNotFoundError:
        pytest.skip(f"needs {TOKENIZER_JSON.name} or the 270M model for a tokenizer")


def test_stop_strings_cut_text(text_model):
    m = text_model
    full = m.generate("Hello", max_new_tokens=24, temperature=0, stop_token_ids=[])
    assert len(full) >= 6, repr(full)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = m.generate("Hello", max_new_tokens=24, temperature=0, stop_token_ids=[], stop=[stop])
    assert cut == full[: full.find(stop)]
    assert stop not in cut


def test_stream_pieces_join_to_generate(text_model):
    m = text_model
    kw = dict(max_new_tokens=24, temperature=0.9, seed=3, stop_token_ids=[])
    pieces = list(m.stream("Once upon a time", **kw))
    assert "".join(pieces) == m.generate("Once upon a time", **kw)
    assert len(pieces) > 1


def test_same_seed_same_text(text_model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=[])
    a = text_model.generate("abc", seed=11, **kw)
    assert a == text_model.generate("abc", seed=11, **kw)


def _repeatable_token(m, n):
    """A token t whose text repeated n times encodes back to [t] * n (so a reply made of it
    round-trips through the chat template), or None."""
    for ch in "axqzbk!?":
        ids = m.encode(ch, add_bos=False)
        if len(ids) == 1 and m.encode(ch * n, add_bos=False) == ids * n:
            return ids[0]
    return None


def test_chat_second_turn_reuses_cache(text_model, monkeypatch):
    m = text_model
    n_reply = 6
    t = _repeatable_token(m, n_reply)
    if t is None:
        pytest.skip("no single-character token that repeats without merging")
    m.reset()
    msgs = [{"role": "user", "content": "Hi there."}]
    ids1 = m.chat_ids(msgs)
    # force the reply, so that its text re-encodes to the very ids generated
    reply = m.chat(msgs, max_new_tokens=n_reply, temperature=0, logit_bias={t: 1e4})
    n1 = m.n_past
    assert n1 == len(ids1) + n_reply - 1  # the last reply token was sampled, not fed
    msgs2 = msgs + [{"role": "assistant", "content": reply},
                    {"role": "user", "content": "And then?"}]
    ids2 = m.chat_ids(msgs2)
    assert ids2[:n1] == ids1 + [t] * (n_reply - 1)
    counter = CountingCore(m.engine.core)
    monkeypatch.setattr(m.engine, "core", counter)
    m.chat(msgs2, max_new_tokens=3, temperature=0, stop_token_ids=[])
    # only the tokens after the cached prefix were fed, then one per decode step
    assert counter.fed == [len(ids2) - n1, 1, 1]
    assert m.n_past == len(ids2) + 2


def test_chat_role_errors(text_model):
    for bad in ([{"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "system", "content": "s"}],
                []):
        with pytest.raises(ValueError):
            text_model.chat_ids(bad)


# ---- chat template vs the official Jinja template -------------------------------------------

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "  What is 2+2?  "}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
      {"role": "user", "content": "Tell me a joke.\n"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello "}], False),
    ([{"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
      {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                   {"type": "image", "image": "x.png"},
                                   {"type": "text", "text": " what is it?"}]}], True),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "model", "content": "c"}, {"role": "user", "content": "d"}], True),
]


@pytest.fixture(scope="module")
def jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    if not TOKENIZER_CONFIG.exists():
        pytest.skip(f"{TOKENIZER_CONFIG.name} not found in {SHARED}")
    src = json.loads(lzma.open(TOKENIZER_CONFIG).read())["chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(src)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_matches_jinja(jinja_template, i):
    msgs, gen = CONVERSATIONS[i]
    want = jinja_template.render(messages=msgs, bos_token="<bos>", add_generation_prompt=gen)
    assert want.startswith("<bos>")
    assert gemma3.chat.render_text(msgs, gen) == want[len("<bos>"):]


@pytest.mark.parametrize("msgs", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
])
def test_chat_role_alternation_errors(jinja_template, msgs):
    import jinja2

    with pytest.raises(jinja2.TemplateError):
        jinja_template.render(messages=msgs, bos_token="<bos>", add_generation_prompt=True)
    with pytest.raises(ValueError):
        gemma3.chat.render_text(msgs)


# ---- the real 270M model against transformers ------------------------------------------------

REF_PROMPTS = ["short_en", "code", "chat", "long_en"]


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    meta = json.loads((FIX / "ref_270m.json").read_text())
    import hashlib

    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if h != meta["gguf_sha256"]:
        pytest.skip(f"{path} is not the file the fixtures were made from (sha256 {h[:12]})")
    return gemma3.load(path, max_seq_len=1024)


@pytest.fixture(scope="module")
def z270():
    return np.load(FIX / "ref_270m.npz"), json.loads((FIX / "ref_270m.json").read_text())


def logsumexp(x):
    x = x.astype(np.float64)
    mx = x.max(-1, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("name", REF_PROMPTS)
def test_270m_logits(m270, z270, name):
    z, meta = z270
    ids = z[f"{name}__ids"]
    # HF tokenizers parses control-token text (the chat prompt's <start_of_turn>) as the token
    text = meta["prompts"][name]["text"]
    assert m270.tokenizer.encode(text, parse_special=True) == ids.tolist(), "tokenizer differs"
    logits = m270.logits(ids)
    ti, tv = z[f"{name}__top16_ids"], z[f"{name}__top16_logits"]
    ours = np.take_along_axis(logits, ti, axis=1)
    d = float(np.abs(ours - tv).max())
    # KL(ref || ours) of the softmax restricted to the reference's top-16 ids, per position
    p = np.exp(tv - logsumexp(tv)[:, None])
    q_log = ours - logsumexp(ours)[:, None]
    kl = float((p * (np.log(p) - q_log)).sum(-1).max())
    dlse = float(np.abs(logsumexp(logits) - z[f"{name}__logsumexp"]).max())
    top1 = logits.argmax(-1)
    print(f"\n270M {name} ({len(ids)} tokens): top-16 max |Δlogit| {d:.3g}, "
          f"max top-16 KL {kl:.3g}, max |Δlogsumexp| {dlse:.3g}")
    bad = np.nonzero(top1 != ti[:, 0])[0]
    assert not len(bad), (f"top-1 differs at positions {bad.tolist()}; ref top-2 gap there "
                          f"{(tv[bad, 0] - tv[bad, 1]).tolist()}")
    assert d < tol.REF_270M_LOGITS_ABS
    assert kl < tol.REF_270M_TOP16_KL
    assert dlse < tol.REF_270M_LOGSUMEXP_ABS
    key = f"{name}__last_logits"
    if key in z:
        assert float(np.abs(logits[-1] - z[key]).max()) < tol.REF_270M_LOGITS_ABS
    else:  # stored as float16: allow its rounding (half an ulp of |logit| <= 64 is 2^-6)
        last = z[f"{key}_f16"].astype(np.float32)
        assert float(np.abs(logits[-1] - last).max()) < tol.REF_270M_LOGITS_ABS + 2.0**-6


def _check_generation(m, z, name):
    prompt, want = z[f"gen__{name}__prompt_ids"], z[f"gen__{name}__new_ids"]
    got = m.generate(prompt, max_new_tokens=len(want), temperature=0, return_ids=True,
                     stop_token_ids=[])
    if got != want.tolist():
        i = _first_diff(got, want.tolist())
        pytest.fail(f"{name}: greedy diverges at new token {i} (ours {got[i:i + 3]}, ref "
                    f"{want[i:i + 3].tolist()}); the reference top1-top2 margin there is "
                    f"{float(z[f'gen__{name}__margin'][i]):.4g}")


@pytest.mark.parametrize("name", ["short_en", "code", "chat"])
def test_270m_greedy_short(m270, z270, name):
    _check_generation(m270, z270[0], name)


@pytest.mark.slow
def test_270m_greedy_long_crosses_window(m270, z270):
    """155-token prompt + 546 greedy tokens: decoding itself crosses the 512-token window."""
    z = z270[0]
    assert len(z["gen__gen_long__prompt_ids"]) + len(z["gen__gen_long__new_ids"]) > 512 + 100
    _check_generation(m270, z, "gen_long")
